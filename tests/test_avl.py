"""A-VL: exact with every rate at 0; planted attention patterns evict / keep / re-rank exactly the expected tokens."""

import numpy as np
import pytest
import torch

from flexattn.avl import AVLCache, AVLSettings

from .conftest import make_vlm, random_image

QUESTION = "what letter is on the red circle ?"
ZERO = dict(vision_evict_rate=0, compute_skip_rate=0, text_evict_rate=0)


def fill(cache, layer, n):
    kv = torch.randn(1, 1, n, 4)
    cache.layers[layer].update(kv, kv.clone())


def planted(n, favourites, base=0.01):
    probs = torch.full((n,), base)
    for rank, position in enumerate(favourites):
        probs[position] = 1.0 - 0.1 * rank
    return probs / probs.sum()


def visual_positions(cache, layer, which="all"):
    c = cache.layers[layer]
    visual = cache.kinds(c.positions) == 1
    if which == "core":
        visual &= c.core
    return sorted(c.positions[visual].tolist())


def test_prefill_keeps_top_visual_as_secondary_and_top_of_those_as_core():
    # 3 prefix tokens, 8 image tokens (positions 3..10), 2 question tokens.
    cache = AVLCache(AVLSettings(vision_evict_rate=0.5, compute_skip_rate=0.5, refresh_every=3), 1, 3, 8)
    fill(cache, 0, 13)
    cache.observe(0, planted(13, [9, 4, 6, 10, 3]), None)
    assert visual_positions(cache, 0) == [4, 6, 9, 10]  # top half of the image by attention
    assert visual_positions(cache, 0, "core") == [4, 9]  # top half of those
    kept = cache.layers[0].positions.tolist()
    assert kept == [0, 1, 2, 4, 6, 9, 10, 11, 12]  # prefix and text untouched, positions keep their values


def test_core_is_reranked_on_refresh_steps_only():
    cache = AVLCache(AVLSettings(vision_evict_rate=0.5, compute_skip_rate=0.5, refresh_every=3), 1, 3, 8)
    fill(cache, 0, 13)
    cache.observe(0, planted(13, [9, 4, 6, 10]), None)
    for step in (1, 2, 3, 4):
        cache.step = step
        fill(cache, 0, 1)
        attended = cache.attended(0)
        n = len(cache.layers[0].positions)
        positions = cache.layers[0].positions
        if step == 3:
            assert attended is None  # refresh: every secondary visual token
            favourites = [positions.tolist().index(6), positions.tolist().index(10)]
            cache.observe(0, planted(n, favourites), None)
            assert visual_positions(cache, 0, "core") == [6, 10]
        else:
            attended_positions = positions[attended].tolist()
            assert [p for p in attended_positions if 3 <= p < 11] == visual_positions(cache, 0, "core")
            # ordinary steps attend to the core only, so their attention cannot change it
            probs = planted(len(attended), [0])
            before = visual_positions(cache, 0, "core")
            cache.observe(0, probs, attended)
            assert visual_positions(cache, 0, "core") == before
    assert cache.visual_attended == [[8], [2], [2], [4], [2]]


def test_text_after_the_image_keeps_heavy_hitters_and_recent_tokens():
    settings = AVLSettings(vision_evict_rate=0, compute_skip_rate=0, text_evict_rate=0.5, min_text_budget=4,
                           heavy_share=0.5)
    cache = AVLCache(settings, 1, 2, 2)  # 2 prefix, 2 image tokens, then text
    fill(cache, 0, 4 + 6)
    cache.observe(0, planted(10, []), None)
    for step in range(1, 5):
        cache.step = step
        fill(cache, 0, 1)
        positions = cache.layers[0].positions.tolist()
        heavy = [positions.index(p) for p in (5, 6) if p in positions]
        cache.observe(0, planted(len(positions), heavy), None)
    # 10 text tokens seen (positions 4..13): budget max(4, 5) = 5 -> 3 recent + 2 heavy hitters (5 and 6)
    positions = cache.layers[0].positions.tolist()
    assert positions == [0, 1, 2, 3, 5, 6, 11, 12, 13]


@pytest.mark.parametrize("mode", ["lowres", "flex", "select_all"])
def test_all_rates_zero_equals_full_cache(mode):
    vlm = make_vlm(seed=12, num_layers=4, selection_layer=1, lowres_size=84, threshold=100)
    image = random_image(90, 60, seed=3)
    full = vlm.answer(image, QUESTION, mode=mode, max_new_tokens=10, reuse_prefix=False)
    zero = vlm.answer(image, QUESTION, mode=mode, max_new_tokens=10, avl=ZERO)
    assert zero.token_ids == full.token_ids and len(full.token_ids) == 10
    assert zero.stats.kv_bytes == full.stats.kv_bytes == zero.stats.avl.kv_bytes_full_cache
    for pf, pz in zip(full.trace.passes, zero.trace.passes):
        for lf, lz in zip(pf, pz):
            assert np.array_equal(lf.lr_attention, lz.lr_attention)
            if lf.selected is not None:
                assert np.array_equal(lf.selected, lz.selected)


def test_default_avl_holds_less_and_attends_to_fewer_visual_tokens():
    vlm = make_vlm(seed=12, num_layers=4, selection_layer=1, lowres_size=84, threshold=100)
    image = random_image(90, 60, seed=3)
    full = vlm.answer(image, QUESTION, mode="flex", max_new_tokens=10, reuse_prefix=False)
    avl = vlm.answer(image, QUESTION, mode="flex", max_new_tokens=10, avl=True)
    assert avl.stats.kv_bytes < full.stats.kv_bytes == avl.stats.avl.kv_bytes_full_cache
    assert 0 < avl.stats.avl.visual_attention_ratio < 0.5
    states = avl.trace.passes[1][2].avl_state  # first decoding step, layer 2
    assert states.shape == (6, 6) and set(np.unique(states)) <= {0, 1, 2}
    assert (states == 0).sum() == 18 and (states == 2).sum() == 6  # half evicted; 30 % of the rest is core


def test_prefill_filter_drops_image_tokens_after_its_layer():
    vlm = make_vlm(seed=12, num_layers=4, selection_layer=1, lowres_size=84, threshold=100)
    image = random_image(90, 60, seed=3)
    settings = dict(ZERO, prefill_filter_layer=1, prefill_keep=0.25)
    got = vlm.answer(image, QUESTION, mode="lowres", max_new_tokens=3, avl=settings)
    per_layer = got.stats.kv_bytes_per_layer
    assert per_layer[0] == per_layer[1] > per_layer[2] == per_layer[3]
