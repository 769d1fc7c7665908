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

COST_MODES = ("lowres", "flex", "select_all", "naive_hd")


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
) -> dict[str, int]:
    """FLOPs of one answer: prefill of `prompt_len` tokens (LR image included) and `new_tokens` - 1 decoding steps
    (the last generated token is never fed back). hr_attended[pass][layer] comes from the run (flex) or is
    computed here (select_all: every HR token from layer S+1 on). `hr_crops` is how many of the zoom**2 HR crops
    the vision tower encoded (fewer with lazy HR encoding; default all). `avl_keys[pass][layer]` = (keys attended,
    extra keys scored for the selection map) as A-VL recorded them: decoding attention then covers only those keys,
    and A-VL's own scoring of the row (at layers where FlexAttention does not already compute it) is counted in
    `avl_scoring`. `hr_projected[pass][layer]`: HR tokens whose keys/values that pass projected (flexattn caches
    them per image; default: every attended token in every pass, as in the released code).
    """
    if mode not in COST_MODES:
        raise ValueError(f"unknown mode {mode!r}")
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
    out = {
        "vision": vision_flops(v, n_images),
        "projector": projector_flops(config, n_images),
        "llm": llm,
        "hr_attention": hr,
    }
    if avl_keys:
        out["avl_scoring"] = avl_scoring
    out["total"] = sum(out.values())
    return out
