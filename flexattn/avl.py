"""A-VL (Zhang et al., AAAI 2025): modality-aware KV-cache handling during decoding, as a transformers Cache.

Visual tokens are "remote": after prefill each layer keeps the top (1 - vision_evict_rate) image tokens by the last
prompt token's attention (the "secondary" set) and drops the rest; of those, the top (1 - compute_skip_rate) form
the "core". Decoding steps attend to core visual tokens only; every `refresh_every`-th step attends to the whole
secondary set and re-ranks the core by that step's attention. Text tokens after the image are "local": once more
than max(min_text_budget, (1 - text_evict_rate) * n) of them are held, the cache keeps 70 % heavy hitters (by
accumulated attention) and 30 % most recent. Tokens before the image are never evicted. Cached keys keep their
rotary positions, so eviction never shifts anyone's position.

FlexAttention meets A-VL where the LR attention map is formed: a visual token out of the core gets no attention on
ordinary steps, so it could never steer HR selection. With `selection_scores="secondary"` (default) the map that
drives selection is scored over every cached (secondary) visual token, while the output still attends to the core
only; "attended" uses the attended tokens alone (cheaper; selection then sees only the core).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

PREFIX, VISUAL, TEXT = 0, 1, 2  # kinds of cached tokens
SPARE = 16  # free entries a layer's buffers keep past the last one: decoding steps append in place, not by copying


@dataclass(frozen=True)
class AVLSettings:
    vision_evict_rate: float = 0.5
    compute_skip_rate: float = 0.7
    refresh_every: int = 3
    text_evict_rate: float = 0.4
    min_text_budget: int = 20
    heavy_share: float = 0.7
    selection_scores: str = "secondary"  # or "attended"
    prefill_filter_layer: int | None = None  # FastV-style: after this layer keep only `prefill_keep` of the image
    prefill_keep: float = 0.5

    def __post_init__(self):
        for name in ("vision_evict_rate", "compute_skip_rate", "text_evict_rate", "heavy_share", "prefill_keep"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.refresh_every < 1:
            raise ValueError(f"refresh_every must be >= 1, got {self.refresh_every}")
        if self.selection_scores not in ("secondary", "attended"):
            raise ValueError(f"selection_scores must be 'secondary' or 'attended', got {self.selection_scores!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def coerce(cls, avl: "AVLSettings | dict | bool | None") -> "AVLSettings | None":
        """The `avl=` argument of the API: None / False (off), True (the authors' defaults), a dict of fields, or
        AVLSettings."""
        if avl is None or avl is False:
            return None
        if avl is True:
            return cls()
        return avl if isinstance(avl, cls) else cls(**avl)


def layer_nbytes(layer) -> int:
    """Bytes of the keys and values one cache layer holds (0 before its first update)."""
    keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not getattr(layer, "is_initialized", True):
        return 0
    return keys.numel() * keys.element_size() + values.numel() * values.element_size()


def cache_nbytes_per_layer(cache) -> list[int]:
    """Bytes each layer of a transformers cache (DynamicCache, AVLCache) holds."""
    return [layer_nbytes(layer) for layer in cache.layers]


def _kinds(positions: torch.Tensor, image_start: int, image_end: int) -> torch.Tensor:
    """PREFIX / VISUAL / TEXT of the tokens at `positions`."""
    kind = torch.full_like(positions, TEXT)
    kind[positions < image_start] = PREFIX
    kind[(positions >= image_start) & (positions < image_end)] = VISUAL
    return kind


def _top(scores: torch.Tensor, share: float) -> torch.Tensor:
    """Indices of the top ceil(share * n) scores (ties: earlier first), in ascending index order."""
    k = math.ceil(share * scores.numel() - 1e-9)
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return order.sort().values


class AVLLayer(DynamicLayer):
    """One layer's cache: physical keys/values plus each entry's original position, kind and A-VL bookkeeping.

    What a decoding step reads (the attended entries, where the visual ones sit on the LR grid) is kept here and
    changes only when entries are evicted or the core is re-ranked, so ordinary steps rebuild nothing. Keys and
    values are views of buffers with up to SPARE free entries after them (not counted in `layer_nbytes`): a step
    writes its token in place instead of copying the whole layer, as a growing cache would."""

    def __init__(self, image_start: int, image_end: int):
        super().__init__()
        self.image_start, self.image_end = image_start, image_end
        self.seen = 0  # tokens this layer has seen: positions keep counting across evictions
        self.positions = torch.zeros(0, dtype=torch.long)
        self.kind = torch.zeros(0, dtype=torch.long)  # PREFIX / VISUAL / TEXT per entry
        self.core = torch.zeros(0, dtype=torch.bool)  # meaningful for visual entries
        self.score = torch.zeros(0)  # accumulated attention (text heavy hitters)
        self.attended: torch.Tensor | None = None  # entries ordinary steps attend to (None: every one)
        self._cells: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}  # see visual_cells
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None

    def _store(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        """Hold `keys`/`values` in new buffers with `room` + SPARE free entries after them."""
        n = keys.shape[-2]
        self._buffers = tuple(t.new_empty(*t.shape[:-2], n + room + SPARE, t.shape[-1]) for t in (keys, values))
        for buffer, t in zip(self._buffers, (keys, values)):
            buffer[..., :n, :] = t
        self.keys, self.values = (buffer[..., :n, :] for buffer in self._buffers)

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, held = key_states.shape[-2], len(self.positions)
        if self._buffers is None:
            self._store(key_states[..., :0, :], value_states[..., :0, :], n)
        elif held + n > self._buffers[0].shape[-2]:
            self._store(self.keys, self.values, n)
        for buffer, t in zip(self._buffers, (key_states, value_states)):
            buffer[..., held : held + n, :] = t
        self.keys, self.values = (buffer[..., : held + n, :] for buffer in self._buffers)
        positions = torch.arange(self.seen, self.seen + n)
        self.positions = torch.cat([self.positions, positions])
        kind = _kinds(positions, self.image_start, self.image_end)
        self.kind = torch.cat([self.kind, kind])
        self.core = torch.cat([self.core, torch.ones(n, dtype=torch.bool)])
        self.score = torch.cat([self.score, torch.zeros(n)])
        self.seen += n
        if self.attended is not None:  # new entries are core, hence attended
            self.attended = torch.cat([self.attended, torch.arange(held, held + n)])
        if bool((kind == VISUAL).any()):
            self._cells = {}
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen  # position ids of new tokens continue from here

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.keys.shape[-2] + query_length if self.is_initialized else query_length, 0

    def keep(self, index: torch.Tensor) -> None:
        device_index = index.to(self.keys.device)
        self._store(self.keys.index_select(-2, device_index), self.values.index_select(-2, device_index), 0)
        self.positions, self.kind = self.positions[index], self.kind[index]
        self.core, self.score = self.core[index], self.score[index]
        self.core_changed()

    def core_changed(self) -> None:
        """Entries or the core changed: what ordinary steps attend to, found once here."""
        attended = (self.kind != VISUAL) | self.core
        self.attended = None if bool(attended.all()) else attended.nonzero().squeeze(1)
        self._cells = {}

    def visual_cells(self, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(columns, LR cells) of the visual entries among `index` (None: every entry; else this layer's
        `attended`): where a row of attention over those entries lands on the LR grid."""
        key = index is None
        if key not in self._cells:
            kind, positions = (self.kind, self.positions) if index is None else (self.kind[index], self.positions[index])
            columns = (kind == VISUAL).nonzero().squeeze(1)
            self._cells[key] = columns, positions[columns] - self.image_start
        return self._cells[key]


class AVLCache(DynamicCache):
    """KV cache with A-VL eviction; pass as `past_key_values` and give the same object to `FlexState(avl=...)`."""

    def __init__(self, settings: AVLSettings, num_layers: int, image_start: int, image_tokens: int):
        Cache.__init__(self, layers=[AVLLayer(image_start, image_start + image_tokens) for _ in range(num_layers)])
        self.settings = settings
        self.image_start, self.image_end = image_start, image_start + image_tokens
        self.step = 0  # decoding step (0 during prefill); FlexState.begin_pass keeps it in step with the passes
        self.visual_attended: list[list[int]] = []  # [step][layer] visual tokens the query attended
        self.keys_scored: list[list[tuple[int, int]]] = []  # [step][layer] (keys attended, extra keys scored)
        self.prefill_dropped: torch.Tensor | None = None  # image positions the FastV-style filter removed

    # ---- what a pass attends to ---------------------------------------------------------------------------
    def kinds(self, positions: torch.Tensor) -> torch.Tensor:
        return _kinds(positions, self.image_start, self.image_end)

    def is_refresh(self) -> bool:
        return self.step > 0 and self.step % self.settings.refresh_every == 0

    def attended(self, layer: int) -> torch.Tensor | None:
        """Cache entries the decoding query attends to at `layer` (None: all of them)."""
        if self.step == 0 or self.is_refresh():
            return None
        return self.layers[layer].attended

    def prefill_mask(self, layer: int, q_len: int, attention_mask, device) -> torch.Tensor | None:
        """With the prefill filter on, layers after `prefill_filter_layer` no longer see the dropped image tokens."""
        s = self.settings
        if self.step or s.prefill_filter_layer is None or layer <= s.prefill_filter_layer or self.prefill_dropped is None:
            return attention_mask
        n = self.layers[layer].keys.shape[-2]
        allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        dropped = torch.zeros(n, dtype=torch.bool, device=device)
        dropped[self.prefill_dropped.to(device)] = True
        allowed &= ~dropped[None, :] | torch.eye(n, dtype=torch.bool, device=device)  # a dropped row sees itself only
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask[0, 0, -q_len:, :n]
        return allowed[None, None, -q_len:]

    # ---- after a layer's attention: rank, refresh, evict -----------------------------------------------
    def observe(self, layer: int, probs: torch.Tensor, index: torch.Tensor | None, extra_scored: int = 0) -> None:
        """probs: (N_attended,) the last query row's attention over the attended entries (`index`: this layer's
        `attended`, None for all), mean over heads; extra_scored: cached keys scored beyond those (for the
        selection map), for the cost model."""
        cache = self.layers[layer]
        probs = probs.detach().float().cpu()
        visual = len(cache.visual_cells(index)[0])
        if self.step == 0:
            self._after_prefill(layer, probs)
        else:
            if index is None:
                cache.score += probs  # text heavy hitters accumulate the attention they receive
            else:
                cache.score.index_add_(0, index, probs)
            if self.is_refresh():  # (a refresh step attends to every entry: index is None)
                self._rank_core(cache, probs)
            self._evict_text(cache)
        if len(self.visual_attended) <= self.step:
            self.visual_attended.append([])
            self.keys_scored.append([])
        self.visual_attended[self.step].append(visual)
        self.keys_scored[self.step].append((len(probs), extra_scored))

    def _after_prefill(self, layer: int, probs: torch.Tensor) -> None:
        cache = self.layers[layer]
        s = self.settings
        visual = (cache.kind == VISUAL).nonzero().squeeze(1)
        if s.prefill_filter_layer is not None and layer == s.prefill_filter_layer:
            kept = visual[_top(probs[visual], s.prefill_keep)]
            mask = torch.ones(len(visual), dtype=torch.bool)
            mask[torch.isin(visual, kept)] = False
            self.prefill_dropped = cache.positions[visual[mask]]
        if self.prefill_dropped is not None and s.prefill_filter_layer is not None and layer > s.prefill_filter_layer:
            alive = ~torch.isin(cache.positions[visual], self.prefill_dropped)
            visual, probs_visual = visual[alive], probs[visual[alive]]
        else:
            probs_visual = probs[visual]
        secondary = visual[_top(probs_visual, 1 - s.vision_evict_rate)]
        keep = torch.ones(len(cache.positions), dtype=torch.bool)
        keep[cache.kind == VISUAL] = False
        keep[secondary] = True
        self._rank_core(cache, probs, among=secondary)
        cache.keep(keep.nonzero().squeeze(1))

    def _rank_core(self, cache: AVLLayer, scores: torch.Tensor, among: torch.Tensor | None = None) -> None:
        if among is None:
            among = (cache.kind == VISUAL).nonzero().squeeze(1)
        cache.core[among] = False
        cache.core[among[_top(scores[among], 1 - self.settings.compute_skip_rate)]] = True
        cache.core_changed()

    def _evict_text(self, cache: AVLLayer) -> None:
        s = self.settings
        text = (cache.kind == TEXT).nonzero().squeeze(1)
        seen_text = cache.seen - self.image_end
        budget = max(s.min_text_budget, math.ceil((1 - s.text_evict_rate) * seen_text))
        if len(text) <= budget:
            return
        n_recent = budget - int(s.heavy_share * budget)
        recent = text[-n_recent:] if n_recent else text[:0]
        older = text[: len(text) - n_recent]
        heavy = older[_top(cache.score[older], (budget - n_recent) / max(len(older), 1))]
        keep = torch.ones(len(cache.positions), dtype=torch.bool)
        keep[text] = False
        keep[recent] = True
        keep[heavy] = True
        cache.keep(keep.nonzero().squeeze(1))

    # ---- measurements ------------------------------------------------------------------------------------
    def full_cache_nbytes_per_layer(self) -> list[int]:
        """What each layer would hold without eviction: every token it has seen, at its entry size."""
        return [layer.seen * layer_nbytes(layer) // max(layer.keys.shape[-2], 1) for layer in self.layers]

    def visual_states(self, layer: int, lr_tokens: int) -> torch.Tensor:
        """(lr_tokens,) int8 per LR image token: 0 evicted, 1 secondary (cached, not attended), 2 core."""
        cache = self.layers[layer]
        visual = cache.kind == VISUAL
        state = torch.zeros(lr_tokens, dtype=torch.int8)
        cells = cache.positions[visual] - self.image_start
        state[cells] = torch.where(cache.core[visual], 2, 1).to(torch.int8)
        return state
