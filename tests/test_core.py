"""FlexAttention semantics on tiny random models: equal to LLaVA when HR is off, equal to an independent
reference of the released semantics when it is on, token for token and mask for mask."""

import copy

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlavaForConditionalGeneration

from flexattn.attention import select_hr_tokens
from flexattn.settings import FlexSettings
from flexattn.trace import TraceRecorder

from .conftest import make_vlm, random_image
from .reference import ReferenceDecoder

QUESTION = "what letter is on the red circle ?"


def stock_copy(vlm):
    stock = LlavaForConditionalGeneration(copy.deepcopy(vlm.model.config)).eval()  # own config: own attention
    stock.set_attn_implementation("sdpa")
    weights = {k: v for k, v in vlm.model.state_dict().items() if "_proj_hd" not in k}
    stock.load_state_dict(weights, strict=True)
    return stock


def stock_inputs(vlm, prepared):
    """input_ids with the image token repeated g*g times, as stock LLaVA expects."""
    embeds, start = vlm.prompt_embeds(prepared, QUESTION)
    from flexattn.prompt import conversation, tokenize_around_image

    before, after = tokenize_around_image(vlm.tokenizer, conversation(QUESTION))
    n = prepared.lr_grid**2
    ids = torch.tensor([before + [vlm.model.config.image_token_id] * n + after])
    return ids, embeds, start


@torch.no_grad()
def test_lowres_logits_equal_stock_llava_prefill_and_cached_decode(tiny_vlm):
    vlm = tiny_vlm
    stock = stock_copy(vlm)
    prepared = vlm.prepare(random_image(90, 60), highres=False)
    ids, embeds, start = stock_inputs(vlm, prepared)
    state = vlm.flex_state(prepared, "lowres", vlm.settings, start)
    cache_a, cache_b = DynamicCache(config=stock.config), DynamicCache(config=stock.config)
    a = stock(input_ids=ids, pixel_values=prepared.views.lowres, past_key_values=cache_a, use_cache=True).logits
    b = vlm.model(inputs_embeds=embeds, past_key_values=cache_b, use_cache=True, flex_state=state).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for token in (5, 17, 33):
        step = torch.tensor([[token]])
        a = stock(input_ids=step, past_key_values=cache_a, use_cache=True).logits
        b = vlm.model(input_ids=step, past_key_values=cache_b, use_cache=True, flex_state=state).logits
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


def test_lowres_generation_equals_stock_generate(tiny_vlm):
    vlm = tiny_vlm
    stock = stock_copy(vlm)
    image = random_image(64, 96, seed=3)
    prepared = vlm.prepare(image, highres=False)
    ids, _, _ = stock_inputs(vlm, prepared)
    expected = stock.generate(
        input_ids=ids, pixel_values=prepared.views.lowres, max_new_tokens=6, do_sample=False,
        eos_token_id=vlm.tokenizer.eos_token_id, pad_token_id=0,
    )[0, ids.shape[1]:].tolist()
    got = vlm.answer(image, QUESTION, mode="lowres", max_new_tokens=6)
    assert got.token_ids == [t for t in expected if t != vlm.tokenizer.eos_token_id]


@torch.no_grad()
def test_lowres_generation_with_cache_equals_without(tiny_vlm):
    vlm = tiny_vlm
    prepared = vlm.prepare(random_image(80, 80, seed=4), highres=False)
    embeds, start = vlm.prompt_embeds(prepared, QUESTION)
    runs = []
    for use_cache in (True, False):
        state = vlm.flex_state(prepared, "lowres", vlm.settings, start)
        out = vlm.model.generate(inputs_embeds=embeds, max_new_tokens=6, do_sample=False, use_cache=use_cache,
                                 eos_token_id=2, pad_token_id=0, flex_state=state)
        runs.append(out[0].tolist())
    assert runs[0] == runs[1]


@torch.no_grad()
def test_flex_that_selects_nothing_equals_lowres(tiny_vlm):
    vlm = tiny_vlm
    prepared = vlm.prepare(random_image(100, 70, seed=5))
    embeds, start = vlm.prompt_embeds(prepared, QUESTION)
    nothing = vlm.settings.with_overrides(threshold=255)  # (x * 255) > 255 never holds
    logits = {}
    for mode, settings in (("lowres", vlm.settings), ("flex", nothing)):
        state = vlm.flex_state(prepared, mode, settings, start)
        logits[mode] = vlm.model(inputs_embeds=embeds, flex_state=state).logits
        if mode == "flex":
            assert state.hr_attended(vlm.model.config.text_config.num_hidden_layers) == [[0, 0, 0, 0]]
    torch.testing.assert_close(logits["flex"], logits["lowres"], atol=1e-6, rtol=0)
    lowres = vlm.answer(prepared.image, QUESTION, mode="lowres", max_new_tokens=5)
    flex = vlm.answer(prepared.image, QUESTION, mode="flex", max_new_tokens=5, threshold=255)
    assert flex.token_ids == lowres.token_ids


def test_planted_attention_map_yields_expected_mask_and_margins_are_never_selected():
    g, pool, hr = 6, 6, 18
    planted = torch.zeros(1, g, g)
    planted[0, 2, 3] = 1.0  # the target cell
    planted[0, 0, 0] = 5.0  # a stronger peak, but inside the top padded margin of a wide image
    # 100x40 padded to square: margin = int((60 // 2) / 100 * 6) = 1 row at top and bottom.
    mask = select_hr_tokens(planted, (100, 40), threshold=48, pool_size=pool, hr_grid=hr).reshape(hr, hr)
    expected = torch.zeros(hr, hr, dtype=torch.bool)
    expected[6:9, 9:12] = True
    assert torch.equal(mask, expected)
    # Tall image: columns are the margin instead; the peak at column 0 is dropped the same way.
    tall = select_hr_tokens(planted.transpose(1, 2), (40, 100), 48, pool, hr).reshape(hr, hr)
    assert torch.equal(tall, expected.T)
    # Square image: no margin, so the corner peak normalises to 255 and the target to 51, below threshold 60.
    square = select_hr_tokens(planted, (50, 50), 60, pool, hr).reshape(hr, hr)
    assert square[0:3, 0:3].all() and square.sum() == 9
    # Coarse pooling: 9x9 over a 6x6 map widens each selected cell into a block of neighbours.
    pooled = select_hr_tokens(planted, (100, 40), 48, 9, hr).reshape(hr, hr)
    assert pooled[6:9, 9:12].all() and pooled.sum() > 9 and not pooled[:3].any()


def test_flat_attention_selects_nothing():
    flat = torch.full((1, 4, 4), 0.25)
    assert not select_hr_tokens(flat, (10, 10), 48, 9, 12).any()


@pytest.mark.parametrize(
    "mode,size,kv_heads",
    [("flex", (100, 40), None), ("flex", (40, 100), None), ("flex", (64, 64), 2), ("select_all", (90, 50), None)],
)
def test_cached_decoding_matches_stepwise_reference(mode, size, kv_heads):
    """flex / select_all through `generate` with the KV cache == an explicit pass-by-pass recomputation."""
    vlm = make_vlm(seed=1, num_layers=5, selection_layer=2, lowres_size=84, threshold=90, num_kv_heads=kv_heads)
    image = random_image(*size, seed=7)
    got = vlm.answer(image, QUESTION, mode=mode, max_new_tokens=6)
    prepared = vlm.prepare(image)
    embeds, start = vlm.prompt_embeds(prepared, QUESTION)
    ref = ReferenceDecoder(vlm.model, mode, prepared.hr_features, start, prepared.lr_grid, image.size, vlm.settings)
    tokens, masks = ref.greedy(embeds[0], 6, vlm.tokenizer.eos_token_id)
    assert got.token_ids == [t for t in tokens if t != vlm.tokenizer.eos_token_id]
    assert len(got.trace.passes) == len(masks)
    selected_somewhere = 0
    for token_masks, layers in zip(masks, got.trace.passes):
        for layer, mask in token_masks.items():
            assert np.array_equal(layers[layer].selected.flatten(), mask.numpy()), (layer, token_masks.keys())
            selected_somewhere += int(0 < mask.sum() < mask.numel())
    if mode == "flex":
        assert selected_somewhere > 0  # the comparison covered partial selections, not only all/nothing


@torch.no_grad()
def test_select_all_prefill_logits_equal_dense_reference():
    vlm = make_vlm(seed=2, num_layers=4, selection_layer=1, lowres_size=56)
    image = random_image(70, 50, seed=9)
    prepared = vlm.prepare(image)
    embeds, start = vlm.prompt_embeds(prepared, QUESTION)
    state = vlm.flex_state(prepared, "select_all", vlm.settings, start)
    ours = vlm.model(inputs_embeds=embeds, flex_state=state).logits[0, -1]
    ref = ReferenceDecoder(vlm.model, "select_all", prepared.hr_features, start, prepared.lr_grid, image.size,
                           vlm.settings)
    theirs, _ = ref.step(embeds[0])
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_trace_records_every_layer_and_token(tiny_vlm):
    got = tiny_vlm.answer(random_image(120, 80, seed=11), QUESTION, mode="flex", max_new_tokens=4)
    trace = got.trace
    n_layers = tiny_vlm.model.config.text_config.num_hidden_layers
    assert len(trace.passes) == got.stats.generated_tokens >= 1
    S = tiny_vlm.settings.selection_layer
    for layers in trace.passes:
        assert len(layers) == n_layers
        for lt in layers:
            assert lt.lr_attention.shape == (trace.lr_grid, trace.lr_grid)
            assert np.isclose(lt.lr_attention.sum(), lt.lr_attention.sum())  # finite
            assert (lt.selected is not None) == (lt.layer >= S)
            if lt.layer > S:
                assert lt.hr_attended == int(layers[lt.layer - 1].selected.sum())
                assert lt.hr_attention.shape == (trace.hr_grid, trace.hr_grid)
                # attention mass on HR is spent only on tokens the layer attended
                used = layers[lt.layer - 1].selected
                assert np.all(lt.hr_attention[~used] == 0)
    assert got.stats.hr_attended_per_layer == [lt.hr_attended for lt in trace.passes[0]]
    limited = TraceRecorder(4, 12, S, max_passes=1)
    assert limited.max_passes == 1


def test_settings_parse_released_extra():
    s = FlexSettings.from_official_extra(
        {"zoom_ratio": "3", "lowres_size": "336", "highres_size": "1008", "threshold": "48", "warmup": "10"}, 32
    )
    assert (s.zoom, s.lowres_size, s.hr_size, s.threshold, s.selection_layer, s.pool_size) == (3, 336, 1008, 48, 8, 9)
    assert FlexSettings.from_official_extra({}, 32).threshold == 64  # the released code's fallback


def test_per_call_overrides_and_bad_values(tiny_vlm):
    image = random_image(60, 60)
    with pytest.raises(ValueError, match="mode"):
        tiny_vlm.answer(image, QUESTION, mode="hd")
    with pytest.raises(ValueError, match="selection_layer"):
        tiny_vlm.answer(image, QUESTION, selection_layer=99)
    with pytest.raises(ValueError, match="threshold"):
        tiny_vlm.answer(image, QUESTION, threshold=300)
    got = tiny_vlm.answer(image, QUESTION, selection_layer=2, threshold=10, max_new_tokens=2)
    assert got.settings["selection_layer"] == 2 and got.settings["threshold"] == 10
    assert got.trace.passes[0][1].selected is None and got.trace.passes[0][2].selected is not None


def test_stream_yields_text_then_answer(tiny_vlm):
    parts = list(tiny_vlm.stream(random_image(60, 60), QUESTION, max_new_tokens=5))
    final = parts[-1]
    assert all(isinstance(p, str) for p in parts[:-1])
    assert "".join(parts[:-1]).split() == final.text.split()
    with pytest.raises(ValueError, match="empty"):
        list(tiny_vlm.stream(random_image(60, 60), "   "))


def test_hr_features_computed_once_per_image(tiny_vlm, monkeypatch):
    image = random_image(77, 55, seed=21)
    calls = []
    original = tiny_vlm.model.encode_pixels
    monkeypatch.setattr(tiny_vlm.model, "encode_pixels", lambda *a, **k: calls.append(1) or original(*a, **k))
    first = tiny_vlm.answer(image, QUESTION, max_new_tokens=2)
    second = tiny_vlm.answer(image, "which colour is this ?", max_new_tokens=2,
                             history=[(QUESTION, first.text or "red")])
    assert len(calls) == 1 + 9  # LR view + each of the 3x3 HR crops, once
    assert second.stats.latency_s.vision < first.stats.latency_s.vision


def test_lazy_hr_encoding_is_bit_identical_and_encodes_only_touched_crops():
    vlm = make_vlm(seed=6, num_layers=5, selection_layer=2, lowres_size=84, threshold=230, pool_size=6)
    image = random_image(96, 80, seed=13)
    runs = {}
    for lazy in (False, True):
        vlm._cache.clear()
        runs[lazy] = vlm.answer(image, QUESTION, mode="flex", max_new_tokens=5, lazy_hr=lazy)
    eager, lazy = runs[False], runs[True]
    assert lazy.token_ids == eager.token_ids
    for pe, pl in zip(eager.trace.passes, lazy.trace.passes):
        for le, ll in zip(pe, pl):
            assert np.array_equal(le.lr_attention, ll.lr_attention)
            if le.hr_attention is not None:
                assert np.array_equal(le.hr_attention, ll.hr_attention)  # bit-identical, not merely close
    assert eager.stats.hr_crops_encoded == 9
    assert 0 < lazy.stats.hr_crops_encoded < 9
    assert lazy.stats.flops.vision < eager.stats.flops.vision


@pytest.mark.parametrize("mode", ["lowres", "flex", "select_all"])
def test_follow_up_reuses_prompt_prefix_with_identical_answers(mode):
    vlm = make_vlm(seed=7, num_layers=4, selection_layer=1, lowres_size=84, threshold=100)
    image = random_image(88, 66, seed=17)
    first = vlm.answer(image, QUESTION, mode=mode, max_new_tokens=4)
    history = [(QUESTION, first.text)]
    warm = vlm.answer(image, "which colour is this ?", mode=mode, max_new_tokens=4, history=history)
    cold = vlm.answer(image, "which colour is this ?", mode=mode, max_new_tokens=4, history=history,
                      reuse_prefix=False)
    assert first.stats.prefix_tokens_reused == 0
    assert warm.stats.prefix_tokens_reused == first.stats.prompt_tokens - 1
    assert cold.stats.prefix_tokens_reused == 0
    assert warm.token_ids == cold.token_ids
    for pw, pc in zip(warm.trace.passes, cold.trace.passes):
        for lw, lc in zip(pw, pc):
            assert (lw.selected is None) == (lc.selected is None)
            if lw.selected is not None:
                assert np.array_equal(lw.selected, lc.selected)


def test_planted_selection_replaces_attention_driven_masks(tiny_vlm):
    G = 18
    planted = torch.zeros(G * G, dtype=torch.bool)
    planted[: G * 3] = True  # the top three HR rows
    got = tiny_vlm.answer(random_image(70, 70, seed=2), QUESTION, max_new_tokens=3, planted_selection=planted)
    S = tiny_vlm.settings.selection_layer
    for layers in got.trace.passes:
        for lt in layers[S:]:
            assert np.array_equal(lt.selected.flatten(), planted.numpy())
        for lt in layers[S + 1 :]:
            assert lt.hr_attended == G * 3


def test_shift_selection_rolls_every_mask(tiny_vlm):
    image = random_image(72, 72, seed=5)
    plain = tiny_vlm.answer(image, QUESTION, max_new_tokens=2)
    shifted = tiny_vlm.answer(image, QUESTION, max_new_tokens=2, shift_selection=(6, 6))
    S = tiny_vlm.settings.selection_layer
    # the layer that selects first sees the same attention either way; its mask is the plain one rolled
    assert np.array_equal(shifted.trace.passes[0][S].selected, np.roll(plain.trace.passes[0][S].selected, (6, 6), (0, 1)))


def test_hr_keys_values_are_projected_once_per_image():
    vlm = make_vlm(seed=14, num_layers=5, selection_layer=2, lowres_size=84, threshold=120)
    image = random_image(80, 96, seed=23)
    first = vlm.answer(image, QUESTION, max_new_tokens=4, reuse_prefix=False)
    again = vlm.answer(image, QUESTION, max_new_tokens=4, reuse_prefix=False)
    assert first.stats.hr_kv_projected > 0
    assert again.stats.hr_kv_projected == 0  # every selected token's keys/values came from the image's cache
    assert again.token_ids == first.token_ids
    assert again.stats.flops.hr_attention < first.stats.flops.hr_attention
