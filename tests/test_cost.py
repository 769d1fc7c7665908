"""The analytic cost model agrees with torch's FlopCounterMode on real forwards, in every mode."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from flexattn import cost
from flexattn.presets import llava_7b_config

from .conftest import make_vlm, random_image

QUESTION = "what letter is on the red circle ?"


@pytest.fixture(scope="module")
def vlm():
    # Wide enough that matmuls dominate, as they do at 7B scale; still fast on a CPU.
    return make_vlm(seed=4, num_layers=4, selection_layer=1, lowres_size=84, threshold=90)


# FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash kernel; give it the same formula, so
# attention is counted here as it is on a GPU.
_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_FLASH not in flop_registry:

    @register_flop_formula(_CPU_FLASH)
    def _cpu_flash_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)  # the registry hands over shapes


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode,avl", [("lowres", False), ("flex", False), ("select_all", False), ("flex", True),
                                      ("lowres", True)])
def test_cost_model_matches_flop_counter(vlm, mode, avl):
    image = random_image(100, 60, seed=1)
    new_tokens = 8 if avl else 4  # with A-VL: past a refresh step
    result = {}

    def run():
        vlm._cache.clear()  # count the vision tower too
        result["answer"] = vlm.answer(image, QUESTION, mode=mode, max_new_tokens=new_tokens, trace=False, avl=avl)

    measured = counted(run)
    answer = result["answer"]
    predicted = answer.stats.flops.total
    assert answer.stats.generated_tokens == new_tokens
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)
    if mode == "flex":
        assert 0 < answer.stats.hr_attended_mean < answer.stats.hr_tokens
    if avl:
        assert answer.stats.flops.avl_scoring > 0


@torch.no_grad()
def test_naive_hd_cost_matches_flop_counter(vlm):
    """naive_hd: every HR token fed to the LLM as an ordinary input token."""
    image = random_image(100, 60, seed=1)
    prepared = vlm.prepare(image)
    embeds, start = vlm.prompt_embeds(prepared, QUESTION)
    naive = torch.cat([embeds[:, :start], prepared.hr_features[None], embeds[:, start:]], dim=1)

    def run():
        vlm.model.encode_lowres(prepared.views)
        vlm.model.highres_features(prepared.views, prepared.lr_grid).full()
        vlm.model(inputs_embeds=naive, logits_to_keep=1)

    measured = counted(run)
    predicted = cost.call_flops(vlm.model.config, "naive_hd", embeds.shape[1], 1).total
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


def test_flex_costs_sit_between_lowres_and_naive_at_7b_shape():
    config = llava_7b_config()
    prompt = 40 + 576
    hr = 72 * 72
    ten_percent = [[0] * 9 + [hr // 10] * 23]
    lowres = cost.call_flops(config, "lowres", prompt, 1).total
    flex = cost.call_flops(config, "flex", prompt, 1, ten_percent).total
    naive = cost.call_flops(config, "naive_hd", prompt, 1).total
    assert lowres < flex < naive
    assert flex / naive < 0.15
    # A compact 10 % selection touches ~2 of the 9 crops: encoding only those keeps flex near plain LLaVA.
    lazy = cost.call_flops(config, "flex", prompt, 1, ten_percent, hr_crops=2).total
    assert lazy < flex and lazy / lowres < 1.3


def test_full_depth_spreads_a_shallow_runs_counts_over_the_deeper_models_layers():
    """Counts measured at 1/8 depth (4 LLM layers selecting at 1) stand for the full-depth 7B (32, selecting at 8)."""
    assert cost.full_depth_hr_counts([0, 0, 529, 531], 1, 32, 8) == [0] * 9 + [530] * 23
    # A-VL's keys per layer: below the selection layer its attended keys, from there on also the keys it scores
    # for selection; spread over the 32 layers by the same split.
    keys = [[(616, 0)] * 4, [(20, 0), (20, 60), (20, 60), (20, 60)]]
    assert cost.full_depth_avl_keys(keys, 1, 32, 8) == [[(616, 0)] * 32, [(20, 0)] * 8 + [(20, 60)] * 24]


def test_full_depth_flops_of_the_7b_shape_from_a_shallow_run():
    """What the bench reports for its 7b-shaped model, from a run at depth 1/8 (no weights needed to check)."""
    config = llava_7b_config(1)
    run = [0, 0, 529, 529]
    common = dict(selection_layer=8, zoom=3, measured_selection_layer=1)
    flex = cost.full_depth_call_flops(config, "flex", 616, [run], hr_crops=1, **common)
    assert flex == cost.call_flops(config, "flex", 616, 1, [[0] * 9 + [529] * 23], selection_layer=8, zoom=3,
                                   hr_crops=1)
    lowres = cost.full_depth_call_flops(config, "lowres", 616, [[0] * 4], hr_crops=0, **common)
    naive = cost.full_depth_call_flops(config, "naive_hd", 616, [[]], hr_crops=9, **common)
    assert lowres == cost.call_flops(config, "lowres", 616, 1) and naive == cost.call_flops(config, "naive_hd", 616, 1)
    assert flex.total / naive.total < 0.15 and flex.total / lowres.total < 1.3
    assert flex.vision == 2 * lowres.vision  # LR view + the one crop the planted square touches
    # counts taken at the model's own depth are used as they are
    assert cost.full_depth_call_flops(config, "flex", 616, [[0] * 9 + [529] * 23], selection_layer=8, zoom=3,
                                      hr_crops=1) == flex
    # A-VL: the same prefill plus its scoring; decoding over fewer keys
    keys = [[(616, 0)] * 4, [(20, 0), (20, 60), (20, 60), (20, 60)]]
    with_avl = cost.full_depth_call_flops(config, "flex", 616, [run, run], hr_crops=1, avl_keys=keys, **common)
    without = cost.full_depth_call_flops(config, "flex", 616, [run, run], hr_crops=1, **common)
    first = cost.full_depth_call_flops(config, "flex", 616, [run], hr_crops=1, avl_keys=keys, **common)
    assert first.total == flex.total + first.avl_scoring and first.avl_scoring > 0
    assert (with_avl - first).total < (without - flex).total
    # select_all: the projected counts become every HR token (72 x 72) where the run projected any
    projected = [[0, 0, 324, 324], [0] * 4]
    sel = cost.full_depth_call_flops(config, "select_all", 616, [[0] * 4] * 2, hr_projected=projected, **common)
    assert sel == cost.call_flops(config, "select_all", 616, 2, selection_layer=8, zoom=3,
                                  hr_projected=[[0] * 9 + [5184] * 23, [0] * 32])
