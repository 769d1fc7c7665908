"""FlexAttention as a registered transformers attention function plus an explicit per-call state.

How a forward pass runs (prefill or one decoding step alike):
  * every query row gets ordinary causal attention (SDPA);
  * from the selection layer S on, the "HR rows" (the last row of the pass at inference; the answer rows in
    training) also compute their softmax over text + LR keys, sum it over heads on the LR image columns and turn
    that g x g map into a selected-HR mask (`select_hr_tokens`) for the next layer;
  * in layers > S those rows attend to text + LR + the HR tokens selected by the previous layer, whose keys and
    values come from the layer's own `k_proj_hd` / `v_proj_hd` applied to the projected HR features, with
    rotary tables bicubically interpolated from the LR grid.

Nothing is stored on modules: the model passes `flex_state=FlexState(...)` through `generate`/`forward` kwargs,
and transformers hands it to this function at every layer. Training and controls (which rows see HR, planted or
shifted selections, maps kept with their gradients) travel apart from it, in `FlexHooks`. HR keys/values never enter the KV cache; they are
projected once per image and layer and kept with the image's HR features (`HRFeatures.keys_values`). With A-VL
(`FlexState.avl`), decoding steps attend to the subset of cache entries A-VL keeps in its core.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.models.llama.modeling_llama import repeat_kv, rotate_half

from .hr_features import HRFeatures
from .image import padded_margin_cells
from .settings import FlexSettings, check_mode

ATTN_IMPLEMENTATION = "flexattn"


def select_hr_tokens(
    lr_map: torch.Tensor,
    original_size: tuple[int, int],
    threshold: float,
    pool_size: int,
    hr_grid: int,
) -> torch.Tensor:
    """Turn head-summed LR attention maps (R, g, g) into selected-HR masks (R, hr_grid**2), bool.

    Padded margins (from padding a w x h image to square) are zeroed first so they are never selected; the map
    is min-max normalised, thresholded on a 0-255 scale, max-pooled to a coarse pool_size grid and
    nearest-upsampled to the HR grid. A flat map normalises to NaN and selects nothing, as in the reference.
    """
    g = lr_map.shape[-1]
    attn = lr_map.clone()
    w, h = original_size
    margin = padded_margin_cells(original_size, g)
    if margin:
        if w > h:
            attn[:, :margin, :] = 0
            attn[:, -margin:, :] = 0
        else:
            attn[:, :, :margin] = 0
            attn[:, :, -margin:] = 0
    flat = attn.flatten(1)
    low = flat.min(1, keepdim=True).values
    high = flat.max(1, keepdim=True).values
    normalised = (flat - low) / (high - low)
    keep = ((normalised * 255) > threshold).float().reshape(-1, 1, g, g)
    coarse = F.adaptive_max_pool2d(keep, pool_size)
    return F.interpolate(coarse, size=hr_grid, mode="nearest").bool().flatten(1)


def interpolate_rotary(cos: torch.Tensor, sin: torch.Tensor, hr_grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (g*g, d) of the LR image positions -> (hr_grid**2, d) by bicubic interpolation of the tables."""
    g = int(round(cos.shape[0] ** 0.5))

    def resize(table):
        grid = table.float().reshape(g, g, -1).permute(2, 0, 1).unsqueeze(0)  # (1, d, g, g)
        grid = F.interpolate(grid, size=hr_grid, mode="bicubic")
        return grid[0].flatten(1).T.to(table.dtype)  # (hr_grid**2, d)

    return resize(cos), resize(sin)


@dataclass
class FlexHooks:
    """Training and control hooks of one call, apart from the inference state (`FlexState`).

    rows: (B, R) query rows that see HR; None means the last row of each pass (inference). Training marks every row
        that predicts an answer token (with teacher forcing each is the "last row" it would be while decoding).
    row_valid: (B, R) bool, False for padding entries of `rows` (batches whose rows differ in number).
    keep_lr_maps: keep each selecting layer's (B, R, g, g) LR maps, with grad, in `lr_maps` (training); with
        `lr_maps_from`, from that layer on instead (layers before selection have maps too: where the row looks).
    keep_hr_maps: keep each HR-attending layer's (B, H, R, G*G) attention probabilities over the HR tokens, with
        grad, in `hr_maps` (training with a batch tensor of HR features, whose tokens are all G*G in order).
    planted_selection: a (G*G,) or per-row (B, R, G*G) bool mask that flex mode selects at every selecting layer
        instead of the attention-driven one: for cost runs of random-weight models (which would select nearly
        everything), and in training to teach reading HR tokens before selection finds them.
    shift_selection: (rows, cols) by which every selected mask is rolled over the HR grid: a control showing that
        answers depend on *where* the selection is, not on how much is selected.
    """

    rows: torch.Tensor | None = None
    row_valid: torch.Tensor | None = None
    keep_lr_maps: bool = False
    lr_maps_from: int | None = None
    keep_hr_maps: bool = False
    planted_selection: torch.Tensor | None = None
    shift_selection: tuple[int, int] | None = None
    lr_maps: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (layer, map), filled by the call
    hr_maps: list[tuple[int, torch.Tensor]] = field(default_factory=list)


class FlexState:
    """What one call (one `generate` or one training forward) needs, and what its layers hand to each other.

    Args:
        mode: "lowres" (plain LLaVA), "flex" (FlexAttention) or "select_all" (every HR token, no selection).
        settings: thresholds, layers and sizes (see FlexSettings).
        image_start: index of the first LR image token in the sequence (same for every batch row).
        lr_grid: g, the LR token grid side.
        hr_features: HRFeatures of one image (inference; crops may be encoded lazily), or a (B, G*G, D) tensor of
            projected HR features, row-major (training); None in lowres mode.
        hr_cos, hr_sin: (G*G, head_dim) interpolated rotary tables for the HR keys.
        original_sizes: per batch row, the (width, height) of the image before padding to square.
        recorder: optional trace recorder (flexattn.trace.TraceRecorder).
        avl: the call's flexattn.avl.AVLCache (also passed to generate as past_key_values), or None.
        hooks: training and control hooks (FlexHooks); None for a plain inference call.
    """

    def __init__(
        self,
        *,
        mode: str,
        settings: FlexSettings,
        image_start: int,
        lr_grid: int,
        hr_features: HRFeatures | torch.Tensor | None = None,
        hr_cos: torch.Tensor | None = None,
        hr_sin: torch.Tensor | None = None,
        original_sizes: list[tuple[int, int]] | None = None,
        recorder=None,
        avl=None,
        hooks: FlexHooks | None = None,
    ):
        self.mode = check_mode(mode)
        if self.mode != "lowres" and hr_features is None:
            raise ValueError(f"mode {mode!r} needs HR features")
        self.settings = settings
        self.image_start = image_start
        self.lr_grid = lr_grid
        self.hr_features = hr_features
        self.hr_cos, self.hr_sin = hr_cos, hr_sin
        self.hr_grid = lr_grid * settings.zoom
        self.original_sizes = original_sizes
        self.recorder = recorder
        self.avl = avl
        self.hooks = hooks if hooks is not None else FlexHooks()
        self.pass_index = -1
        self.hr_mask: torch.Tensor | None = None  # (B, R, G*G), computed by the previous layer of this pass
        self._attended: dict[tuple[int, int], torch.Tensor] = {}  # (pass, layer) -> HR tokens the last row saw
        self._projected: dict[tuple[int, int], int] = {}  # (pass, layer) -> HR tokens projected (not cached)

    def begin_pass(self) -> None:
        self.pass_index += 1
        self.hr_mask = None
        if self.avl is not None:
            self.avl.step = self.pass_index

    def query_rows(self, batch: int, q_len: int, device) -> torch.Tensor:
        if self.hooks.rows is not None:
            return self.hooks.rows.to(device)
        return torch.full((batch, 1), q_len - 1, dtype=torch.long, device=device)

    @property
    def maps_from(self) -> int:
        """The first layer whose LR maps the hooks keep."""
        first = self.hooks.lr_maps_from
        return self.settings.selection_layer if first is None else first

    def needs_rows(self, layer: int) -> bool:
        from_selection_layer = layer >= self.settings.selection_layer
        selecting = self.mode != "lowres" and from_selection_layer
        keeping = self.hooks.keep_lr_maps and layer >= self.maps_from
        return selecting or keeping or self.recorder is not None or self.avl is not None

    def hr_attended(self, num_layers: int) -> list[list[int]]:
        """HR tokens the last query row attended, per pass and layer (batch row 0); 0 where none."""
        return self._per_pass(self._attended, num_layers)

    def hr_projected(self, num_layers: int) -> list[list[int]]:
        """HR tokens whose keys/values were projected, per pass and layer (the others came from the image's cache)."""
        return self._per_pass(self._projected, num_layers)

    def _per_pass(self, counts: dict, num_layers: int) -> list[list[int]]:
        passes = [[0] * num_layers for _ in range(self.pass_index + 1)]
        values = list(counts.values())
        if values and isinstance(values[0], torch.Tensor):  # device counts: one transfer for all of them
            values = torch.stack(values).tolist()
        for (p, layer), count in zip(counts, values):
            passes[p][layer] = int(count)
        return passes

    def select(self, lr_map: torch.Tensor) -> torch.Tensor:
        """(B, R, g, g) maps -> (B, R, G*G) masks for the next layer."""
        b, r = lr_map.shape[:2]
        if self.mode == "select_all":
            return torch.ones(b, r, self.hr_grid**2, dtype=torch.bool, device=lr_map.device)
        hooks = self.hooks
        if hooks.planted_selection is not None:
            return hooks.planted_selection.to(lr_map.device).expand(b, r, -1)
        s = self.settings
        masks = torch.stack([
            select_hr_tokens(lr_map[i], self.original_sizes[i], s.threshold, s.pool_size, self.hr_grid)
            for i in range(b)
        ])
        if hooks.shift_selection is not None:
            G = self.hr_grid
            masks = masks.reshape(b, r, G, G).roll(hooks.shift_selection, dims=(2, 3)).reshape(b, r, G * G)
        return masks


def _row_bias(attention_mask, rows, q_len, kv_len, dtype, device) -> torch.Tensor:
    """Additive bias (B, 1, R, N) for the chosen query rows, from whatever mask transformers passed."""
    if attention_mask is None:  # SDPA skipped the mask: plain causal attention, queries are the last q_len keys
        key_pos = torch.arange(kv_len, device=device)
        query_pos = rows + (kv_len - q_len)
        allowed = key_pos[None, None, :] <= query_pos[:, :, None]  # (B, R, N)
        allowed = allowed[:, None]
    else:
        index = rows[:, None, :, None].expand(-1, attention_mask.shape[1], -1, attention_mask.shape[-1])
        picked = attention_mask.gather(2, index)
        if picked.dtype != torch.bool:
            return picked.to(dtype)
        allowed = picked
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)


def _hr_keys_values(module, state: FlexState, hr_mask: torch.Tensor):
    """Keys/values of the HR tokens the rows may attend to, a (B, 1, R, M) additive mask over them, and how many
    tokens were projected for this call (the rest were cached)."""
    hr = state.hr_features
    d = module.head_dim
    kv_heads = module.k_proj_hd.out_features // d

    def project(features, tokens):  # (M, D) -> keys (rotary with the LR grid's positions) and values, (M, kv_dim)
        keys = module.k_proj_hd(features).view(-1, kv_heads, d)
        cos, sin = state.hr_cos[tokens][:, None], state.hr_sin[tokens][:, None]
        keys = keys * cos + rotate_half(keys) * sin
        return keys.flatten(1), module.v_proj_hd(features)

    if isinstance(hr, HRFeatures):  # inference: the selected tokens (union over rows), projected once per image
        keep = hr_mask[0].any(0).nonzero().squeeze(1)
        keys, values, projected = hr.keys_values(module.layer_idx, keep, project, depends_on=state.image_start)
        keys, values, hr_mask = keys[None], values[None], hr_mask[:, :, keep]
    else:  # training: every HR token of every batch row; rows mask out what they did not select
        tokens = torch.arange(hr.shape[1], device=hr.device)
        keys, values = project(hr.flatten(0, 1), tokens.repeat(hr.shape[0]))
        keys, values = keys.view(*hr.shape[:2], -1), values.view(*hr.shape[:2], -1)
        projected = tokens.numel() * hr.shape[0]
    b, m = keys.shape[:2]
    keys = keys.view(b, m, kv_heads, d).transpose(1, 2)
    values = values.view(b, m, kv_heads, d).transpose(1, 2)
    bias = torch.zeros(hr_mask.shape, dtype=keys.dtype, device=keys.device)
    bias = bias.masked_fill(~hr_mask, torch.finfo(keys.dtype).min)[:, None]
    return keys, values, bias, projected


def flex_attention_forward(
    module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    flex_state: FlexState | None = None,
    **kwargs,
):
    """Registered as attention implementation "flexattn"; with no state (or lowres and no trace) it is SDPA."""
    state, layer = flex_state, module.layer_idx
    avl = state.avl if state is not None else None
    cached_key, attended = key, None
    if avl is not None:
        key, value, attention_mask, attended = _avl_restrict(avl, layer, query, key, value, attention_mask)
    output, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if state is None or not state.needs_rows(layer):
        return output, None

    # The HR rows' own attention over text + LR: it drives selection, and HR attention extends it.
    rows = state.query_rows(query.shape[0], query.shape[2], query.device)  # (B, R)
    q_rows = query.gather(2, rows[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3]))
    values = repeat_kv(value, module.num_key_value_groups)
    secondary = avl is not None and attended is not None and _scores_secondary(state, avl, layer)
    if secondary:  # one product over every cached entry: selection scores them all, the output reads the attended
        cached_scores = (q_rows @ repeat_kv(cached_key, module.num_key_value_groups).transpose(2, 3)) * scaling
        scores = cached_scores.index_select(-1, attended.to(cached_scores.device))
    else:
        scores = (q_rows @ repeat_kv(key, module.num_key_value_groups).transpose(2, 3)) * scaling
    scores = scores + _row_bias(attention_mask, rows, query.shape[2], key.shape[2], scores.dtype, scores.device)
    probs32 = F.softmax(scores, dim=-1, dtype=torch.float32)  # (B, H, R, N)

    # the map is summed and thresholded in float32: half-precision sums would flip masks
    if avl is None:
        g, start = state.lr_grid, state.image_start
        lr_map = probs32[..., start : start + g * g].sum(1).reshape(probs32.shape[0], -1, g, g)
    else:
        map_probs = F.softmax(cached_scores, dim=-1, dtype=torch.float32) if secondary else probs32
        lr_map = _avl_lr_map(state, avl, layer, map_probs, attended, secondary)
        # A-VL ranks by the row's attention in the model's dtype, mean over heads
        scored_extra = map_probs.shape[-1] - probs32.shape[-1]  # cached keys scored beyond the attended ones
        avl.observe(layer, probs32[0, :, -1].to(query.dtype).mean(0), attended, scored_extra)

    settings = state.settings
    hr_probs = None
    if state.mode != "lowres" and layer > settings.selection_layer and state.hr_mask is not None:
        output, hr_probs = _attend_hr(module, state, rows, q_rows, scores, values, output, scaling)
        state._attended[(state.pass_index, layer)] = state.hr_mask[0, -1].sum()
        if state.hooks.keep_hr_maps:
            state.hooks.hr_maps.append((layer, hr_probs))

    if state.recorder is not None:
        state.recorder.record(state, layer, lr_map, hr_probs)
    if state.hooks.keep_lr_maps and layer >= state.maps_from:  # (any mode: lowres training uses them too)
        state.hooks.lr_maps.append((layer, lr_map))
    if state.mode != "lowres" and layer >= settings.selection_layer:
        with torch.no_grad():
            state.hr_mask = state.select(lr_map.detach().float())  # for the next layer of this pass
        if state.recorder is not None:
            state.recorder.record_selection(state, layer, state.hr_mask)
    return output, None


def _attend_hr(module, state: FlexState, rows, q_rows, scores, values, output, scaling):
    """Replace the HR rows' outputs by softmax([q.K_text+LR ; q.K_HR]) . [V_text+LR ; V_HR]."""
    hr_keys, hr_values, hr_bias, projected = _hr_keys_values(module, state, state.hr_mask)
    state._projected[(state.pass_index, module.layer_idx)] = projected
    hr_keys = repeat_kv(hr_keys, module.num_key_value_groups)
    hr_values = repeat_kv(hr_values, module.num_key_value_groups)
    hr_scores = (q_rows @ hr_keys.transpose(2, 3)) * scaling + hr_bias
    joint = F.softmax(torch.cat([scores, hr_scores], dim=-1), dim=-1, dtype=torch.float32).to(q_rows.dtype)
    row_out = joint @ torch.cat([values, hr_values], dim=2)  # (B, H, R, d)
    valid = state.hooks.row_valid if state.hooks.row_valid is not None else torch.ones_like(rows, dtype=torch.bool)
    bi, ri = valid.to(rows.device).nonzero(as_tuple=True)  # padding rows must not write (or get gradient) twice
    output = output.index_put((bi, rows[bi, ri]), row_out.transpose(1, 2)[bi, ri].to(output.dtype))
    return output, joint[..., scores.shape[-1] :]


def _avl_restrict(avl, layer, query, key, value, attention_mask):
    """A-VL: a decoding step attends to the kept text and the core visual tokens only."""
    attended = avl.attended(layer)
    if attended is None:  # prefill (possibly with the prefill filter) or a refresh step: every cached entry
        return key, value, avl.prefill_mask(layer, query.shape[2], attention_mask, query.device), None
    index = attended.to(key.device)
    # one query row, and every attended entry is allowed: no mask
    return key.index_select(2, index), value.index_select(2, index), None, attended


def _scores_secondary(state: FlexState, avl, layer: int) -> bool:
    """Whether this layer's selection map scores every cached (secondary) visual token, not only the core."""
    selecting = state.mode != "lowres" and layer >= state.settings.selection_layer
    return selecting and avl.settings.selection_scores == "secondary"


def _avl_lr_map(state: FlexState, avl, layer, map_probs, attended, secondary):
    """The LR map from probabilities over cache entries (every one if `secondary`, else those attended), whose LR
    cells A-VL keeps per layer."""
    map_index = None if secondary else attended
    columns, cells = avl.layers[layer].visual_cells(map_index)
    summed = map_probs.sum(1)  # (B, R, N)
    image = summed.new_zeros(*summed.shape[:2], avl.image_end - avl.image_start)  # naive_hd's HR tokens follow LR
    image[..., cells.to(summed.device)] = summed[..., columns.to(summed.device)]
    g = state.lr_grid
    lr_map = image[..., : g * g].reshape(*summed.shape[:2], g, g)
    if state.recorder is not None:
        state.recorder.record_avl(state, layer, avl.visual_states(layer, state.lr_grid**2), attended is None)
    return lr_map


AttentionInterface.register(ATTN_IMPLEMENTATION, flex_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
