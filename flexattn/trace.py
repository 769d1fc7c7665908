"""A small per-call trace of what FlexAttention did: grids, never full attention tensors.

For each pass (pass 0 = prefill, which produces the first answer token; pass k produces token k) and each layer:
  * `lr_attention` (g x g): the query row's softmax attention over the LR image tokens, summed over heads;
  * `selected` (G x G bool): the HR mask this layer computed from that map (drives the next layer), or None;
  * `hr_attention` (G x G): the query row's attention on HR tokens at this layer, summed over heads, or None;
  * `hr_attended`: how many HR tokens this layer's query attended (the previous layer's selection).
A 7B trace for one token is ~32 x (24x24 + 2 x 72x72) small numbers, not the tens of GB of full attentions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class LayerTrace:
    layer: int
    lr_attention: np.ndarray  # (g, g) float32
    hr_attended: int = 0
    hr_attention_share: float = 0.0  # mean over heads of the attention mass on HR tokens
    hr_attention: np.ndarray | None = None  # (G, G) float32
    selected: np.ndarray | None = None  # (G, G) bool, computed at this layer
    avl_state: np.ndarray | None = None  # (g, g) int8 with A-VL: 0 evicted, 1 secondary, 2 core (before this pass)
    avl_refresh: bool = False  # this pass attended every cached visual token (prefill or a refresh step)

    @property
    def selected_count(self) -> int:
        return int(self.selected.sum()) if self.selected is not None else 0


@dataclass
class Trace:
    lr_grid: int
    hr_grid: int
    selection_layer: int
    passes: list[list[LayerTrace]] = field(default_factory=list)  # passes[token][layer]

    def layer(self, token: int, layer: int) -> LayerTrace:
        return self.passes[token][layer]

    def hr_attended_per_layer(self, token: int = 0) -> list[int]:
        return [lt.hr_attended for lt in self.passes[token]] if self.passes else []

    def used_mask(self, token: int, layer: int) -> np.ndarray | None:
        """The HR mask that `layer` attended with (computed by the layer before it)."""
        if layer <= self.selection_layer:
            return None
        return self.passes[token][layer - 1].selected


class TraceRecorder:
    """Collects per-layer records during a call; `finish()` turns them into a numpy Trace.

    Records stay on the model's device while a pass runs (no per-layer host round trip: on a GPU each would stall
    the queue); when the next pass starts, the pass's records go to the host in one non-blocking copy.
    `max_passes` bounds memory for long answers (None: every generated token).
    """

    def __init__(self, lr_grid: int, hr_grid: int, selection_layer: int, max_passes: int | None = None):
        self.lr_grid, self.hr_grid, self.selection_layer = lr_grid, hr_grid, selection_layer
        self.max_passes = max_passes
        self._pass: int | None = None
        self._pending: list[tuple[int, str, torch.Tensor]] = []  # (layer, field, flat float32) of this pass
        self._copies: list[tuple[int, list[tuple[int, str, int]], torch.Tensor, object]] = []  # one per pass
        self._records: dict[tuple[int, int], dict] = {}  # host values: (pass, layer) -> field -> value

    def _active(self, state) -> bool:
        return self.max_passes is None or state.pass_index < self.max_passes

    def _entry(self, state, layer: int) -> dict:
        if state.pass_index != self._pass:
            self._flush()
            self._pass = state.pass_index
        return self._records.setdefault((state.pass_index, layer), {})

    def _keep(self, layer: int, field: str, value: torch.Tensor) -> None:
        self._pending.append((layer, field, value.detach().float().reshape(-1)))

    def record(self, state, layer: int, lr_map: torch.Tensor, hr_probs: torch.Tensor | None) -> None:
        if not self._active(state):
            return
        entry = self._entry(state, layer)
        self._keep(layer, "lr", lr_map[0, -1])
        if hr_probs is not None:
            used = state.hr_mask[0].any(0)  # the columns _hr_keys_values kept (all of them when batched)
            per_token = hr_probs[0, :, -1].detach().float().sum(0)  # summed over heads
            full = per_token
            if per_token.numel() != used.numel():  # scatter into the HR grid by gathering: no host sync
                full = torch.zeros(used.numel(), device=per_token.device)
                if per_token.numel():
                    where = (used.cumsum(0) - 1).clamp(min=0)
                    full = torch.where(used, per_token[where], full)
            self._keep(layer, "hr", full)
            self._keep(layer, "hr_attended", state.hr_mask[0, -1].sum())
            self._keep(layer, "hr_mass", per_token.sum())
            entry["heads"] = hr_probs.shape[1]

    def record_avl(self, state, layer: int, visual_states: torch.Tensor, all_attended: bool) -> None:
        if self._active(state):
            entry = self._entry(state, layer)
            entry["avl"] = visual_states.clone()
            entry["avl_refresh"] = all_attended

    def record_selection(self, state, layer: int, mask: torch.Tensor) -> None:
        if self._active(state):
            self._entry(state, layer)
            self._keep(layer, "selected", mask[0, -1])

    def _flush(self) -> None:
        """Send this pass's records to the host: one copy, asynchronous on a GPU (into pinned memory)."""
        if not self._pending:
            return
        flat = torch.cat([value for _, _, value in self._pending])
        layout = [(layer, field, value.numel()) for layer, field, value in self._pending]
        done = None
        if flat.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host = flat.cpu()
        self._copies.append((self._pass, layout, host, done))
        self._pending = []

    def _unpack(self) -> None:
        self._flush()
        for p, layout, host, done in self._copies:
            if done is not None:
                done.synchronize()
            values = host.numpy().copy()  # out of pinned memory: traces outlive the call
            offset = 0
            for layer, field, n in layout:
                self._records[(p, layer)][field] = values[offset : offset + n]
                offset += n
        self._copies = []

    def finish(self) -> Trace:
        self._unpack()
        trace = Trace(self.lr_grid, self.hr_grid, self.selection_layer)
        if not self._records:
            return trace
        n_pass = max(p for p, _ in self._records) + 1
        n_layer = max(l for _, l in self._records) + 1
        g, G = self.lr_grid, self.hr_grid
        for p in range(n_pass):
            layers = []
            for l in range(n_layer):
                e = self._records[(p, l)]
                layers.append(
                    LayerTrace(
                        layer=l,
                        lr_attention=e["lr"].reshape(g, g),
                        hr_attended=int(e["hr_attended"][0]) if "hr_attended" in e else 0,
                        hr_attention_share=float(e["hr_mass"][0]) / e["heads"] if "hr_mass" in e else 0.0,
                        hr_attention=e["hr"].reshape(G, G) if "hr" in e else None,
                        selected=e["selected"].reshape(G, G) > 0.5 if "selected" in e else None,
                        avl_state=e["avl"].reshape(g, g).numpy() if "avl" in e else None,
                        avl_refresh=e.get("avl_refresh", False),
                    )
                )
            trace.passes.append(layers)
        return trace
