"""Analytic FLOPs of a call, per part (vision tower, projector, LLM, HR projections), in every mode.

A multiply-add counts as 2 FLOPs, as torch's FlopCounterMode counts matmuls; element-wise work (norms, softmax,
rotary, activations) is left out, as FlopCounterMode leaves it out. Attention scores are counted over the full
query x key rectangle, which is what SDPA kernels compute.

Per pass, FlexAttention adds to the ordinary layer over the N text+LR tokens (R = 1 query row, M_i selected):
  * layers >= S: the row's scores over N keys again, to get its probabilities:    2 N D
  * layers  > S: HR key and value projections                                     2 * 2 M_i D D_kv
                 the row's scores on HR keys and its weighted sum over N + M_i:   2 M_i D + 2 (N + M_i) D
`naive_hd` instead runs every layer over N + G*G tokens (every HR token as an ordinary input token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .settings import COST_MODES, check_mode


@dataclass
class Flops:
    """FLOPs of one answer by part (see the module docstring); `total` is their sum."""

    vision: int = 0
    projector: int = 0
    llm: int = 0
    hr_attention: int = 0
    avl_scoring: int = 0  # A-VL's own scoring of the last row (0 without A-VL)
    total: int = field(init=False)

    def __post_init__(self):
        self.total = self.vision + self.projector + self.llm + self.hr_attention + self.avl_scoring

    def __sub__(self, other: "Flops") -> "Flops":
        return Flops(*(getattr(self, k) - getattr(other, k) for k in PARTS))

    def scaled(self, factor: float) -> "Flops":
        return Flops(*(round(getattr(self, k) * factor) for k in PARTS))


PARTS = ("vision", "projector", "llm", "hr_attention", "avl_scoring")


def vision_flops(vision_config, n_images: int) -> int:
    p, size = vision_config.patch_size, vision_config.image_size
    patches = (size // p) ** 2
    t = patches + 1  # + CLS
    d, f = vision_config.hidden_size, vision_config.intermediate_size
    embed = 2 * patches * 3 * p * p * d
    layer = 2 * t * d * 4 * d + 2 * 2 * t * t * d + 2 * 2 * t * d * f
    return n_images * (embed + vision_config.num_hidden_layers * layer)


def projector_flops(config, n_images: int) -> int:
    v = config.vision_config
    tokens = (v.image_size // v.patch_size) ** 2
    d_v, d = v.hidden_size, config.text_config.hidden_size
    return n_images * (2 * tokens * d_v * d + 2 * tokens * d * d)


def _dims(text_config):
    d = text_config.hidden_size
    head_dim = getattr(text_config, "head_dim", None) or d // text_config.num_attention_heads
    d_attn = text_config.num_attention_heads * head_dim
    d_kv = text_config.num_key_value_heads * head_dim
    return d, d_attn, d_kv, text_config.intermediate_size


def llm_layer_flops(text_config, q_len: int, kv_len: int) -> int:
    """One ordinary decoder layer: q_len new tokens attending to kv_len keys (cache included)."""
    d, d_attn, d_kv, f = _dims(text_config)
    proj = 2 * q_len * d * (2 * d_attn + 2 * d_kv)
    attn = 2 * 2 * q_len * kv_len * d_attn
    mlp = 3 * 2 * q_len * d * f
    return proj + attn + mlp


def flex_layer_extra_flops(text_config, layer: int, kv_len: int, selection_layer: int, hr_attended: int,
                           hr_projected: int | None = None) -> int:
    """What FlexAttention adds to one layer of one pass (0 before the selection layer). `hr_projected`: HR tokens
    whose keys/values this pass computed (default all attended, as the released code recomputes them every pass)."""
    d, d_attn, d_kv, _ = _dims(text_config)
    if layer < selection_layer:
        return 0
    total = 2 * kv_len * d_attn  # the row's probabilities over text + LR
    if layer > selection_layer:
        m = hr_attended
        p = m if hr_projected is None else hr_projected
        total += 2 * 2 * p * d * d_kv + 2 * m * d_attn + 2 * (kv_len + m) * d_attn
    return total


def call_flops(
    config,
    mode: str,
    prompt_len: int,
    new_tokens: int,
    hr_attended: Sequence[Sequence[int]] | None = None,
    selection_layer: int | None = None,
    zoom: int | None = None,
    hr_crops: int | None = None,
    avl_keys: Sequence[Sequence[tuple[int, int]]] | None = None,
    hr_projected: Sequence[Sequence[int]] | None = None,
) -> Flops:
    """FLOPs of one answer: prefill of `prompt_len` tokens (LR image included) and `new_tokens` - 1 decoding steps
    (the last generated token is never fed back). hr_attended[pass][layer] comes from the run (flex) or is
    computed here (select_all: every HR token from layer S+1 on). `hr_crops` is how many of the zoom**2 HR crops
    the vision tower encoded (fewer with lazy HR encoding; default all). `avl_keys[pass][layer]` = (keys attended,
    extra keys scored for the selection map) as A-VL recorded them: decoding attention then covers only those keys,
    and A-VL's own scoring of the row (at layers where FlexAttention does not already compute it) is counted in
    `avl_scoring`. `hr_projected[pass][layer]`: HR tokens whose keys/values that pass projected (flexattn caches
    them per image; default: every attended token in every pass, as in the released code).
    """
    check_mode(mode, COST_MODES)
    flex = getattr(config, "flex_attention", {}) or {}
    zoom = zoom or flex.get("zoom", 3)
    sel = flex.get("selection_layer", 8) if selection_layer is None else selection_layer
    text = config.text_config
    v = config.vision_config
    hr_tokens = ((v.image_size // v.patch_size) * zoom) ** 2
    n_images = 1 if mode == "lowres" else 1 + (zoom * zoom if hr_crops is None else hr_crops)
    n_layers = text.num_hidden_layers

    extra_prompt = hr_tokens if mode == "naive_hd" else 0
    d_attn = _dims(text)[1]
    flexy = mode in ("flex", "select_all")
    llm = hr = avl_scoring = 0
    for step in range(max(new_tokens, 1)):  # pass 0 is the prefill
        q_len = prompt_len + extra_prompt if step == 0 else 1
        full_kv = prompt_len + extra_prompt + step
        if mode == "select_all":
            counts = [hr_tokens if layer > sel else 0 for layer in range(n_layers)]
        else:
            counts = hr_attended[step] if hr_attended and step < len(hr_attended) else [0] * n_layers
        for layer in range(n_layers):
            kv, extra = avl_keys[step][layer] if avl_keys else (full_kv, 0)
            llm += llm_layer_flops(text, q_len, kv)
            if flexy:
                projected = hr_projected[step][layer] if hr_projected and step < len(hr_projected) else None
                hr += flex_layer_extra_flops(text, layer, kv, sel, counts[layer], projected)
            if avl_keys:
                selecting = flexy and layer >= sel
                avl_scoring += (0 if selecting else 2 * kv * d_attn) + 2 * extra * d_attn
        llm += 2 * text.hidden_size * text.vocab_size  # LM head, last row
    return Flops(vision_flops(v, n_images), projector_flops(config, n_images), llm, hr, avl_scoring)


# ---- full depth: counts measured on a shallower copy of a model, at every layer of the full-depth one ---------
# A random-weight cost run measures a model whose LLM keeps the full model's widths but only some of its layers
# (with the selection layer scaled alike). Per-layer counts from that run are spread over the full-depth model's
# layers by the split at the selection layer; the call's FLOPs are then taken for the full-depth config.


def full_depth_hr_counts(attended: Sequence[int], measured_selection_layer: int, num_layers: int,
                         selection_layer: int) -> list[int]:
    """HR tokens attended per layer of a `num_layers`-layer model selecting at `selection_layer`, from one pass's
    per-layer counts `attended` measured on a shallower copy selecting at `measured_selection_layer`: the measured
    mean over the HR layers (those after the selection layer) at every HR layer of the deeper model, 0 before."""
    hr_layers = list(attended[measured_selection_layer + 1 :])
    mean = round(sum(hr_layers) / len(hr_layers)) if hr_layers else 0
    return [0 if layer <= selection_layer else mean for layer in range(num_layers)]


def full_depth_avl_keys(keys_scored: Sequence[Sequence[tuple[int, int]]], measured_selection_layer: int,
                        num_layers: int, selection_layer: int) -> list[list[tuple[int, int]]]:
    """A-VL's (keys attended, extra keys scored) per pass and layer for a `num_layers`-layer model selecting at
    `selection_layer`, from `keys_scored[pass][layer]` measured on a shallower copy selecting at
    `measured_selection_layer`: per pass, the measured mean below the selection layer at every layer below the deeper
    model's, and the mean from the selection layer on at every layer from there. (A-VL keeps the same number of
    entries in every layer; FlexAttention's selection scoring adds keys only from the selection layer on.)"""

    def mean(items):
        return tuple(round(sum(k[i] for k in items) / len(items)) for i in (0, 1))

    out = []
    for per_layer in keys_scored:
        below, above = per_layer[:measured_selection_layer], per_layer[measured_selection_layer:]
        low = mean(below) if below else mean(above)
        high = mean(above) if above else low
        out.append([low if layer < selection_layer else high for layer in range(num_layers)])
    return out


def full_depth_call_flops(
    config,
    mode: str,
    prompt_len: int,
    hr_attended: Sequence[Sequence[int]],
    *,
    selection_layer: int,
    zoom: int,
    measured_selection_layer: int | None = None,
    hr_crops: int | None = None,
    avl_keys: Sequence[Sequence[tuple[int, int]]] | None = None,
    hr_projected: Sequence[Sequence[int]] | None = None,
) -> Flops:
    """`call_flops` for `config` of a call whose per-pass, per-layer counts were measured on a shallower copy of it.

    hr_attended[pass][layer] (the prefill first; one pass per entry, so `len(hr_attended)` passes are counted),
    avl_keys and hr_projected are the run's own, at its depth; `measured_selection_layer` is the run's selection layer
    (None: the counts come from `config` itself and are used as they are). Each pass's counts are spread over
    config's layers (`full_depth_hr_counts`, `full_depth_avl_keys`); select_all's projected counts become every HR
    token of `config`'s grid where the run projected any, as `call_flops` fills select_all's attended counts in.
    HR counts are read in flex mode only (the others' are fixed by the mode); `hr_crops` likewise.
    """
    passes = len(hr_attended)
    n, sel = config.text_config.num_hidden_layers, selection_layer

    def hr(counts):
        if measured_selection_layer is None:
            return list(counts)
        return full_depth_hr_counts(counts, measured_selection_layer, n, sel)

    counts = [hr(c) for c in hr_attended] if mode == "flex" else None
    keys = None
    if avl_keys is not None:
        keys = [[tuple(k) for k in per_layer] for per_layer in avl_keys[:passes]]
        if measured_selection_layer is not None:
            keys = full_depth_avl_keys(keys, measured_selection_layer, n, sel)
    projected = None
    if hr_projected is not None and mode in ("flex", "select_all"):
        projected = [hr(p) for p in hr_projected[:passes]]
        if mode == "select_all":
            v = config.vision_config
            hr_tokens = ((v.image_size // v.patch_size) * zoom) ** 2
            projected = [[hr_tokens if c else 0 for c in p] for p in projected]
    return call_flops(config, mode, prompt_len, passes, counts or None, selection_layer=sel, zoom=zoom,
                      hr_crops=hr_crops if mode == "flex" else None, avl_keys=keys or None,
                      hr_projected=projected or None)
