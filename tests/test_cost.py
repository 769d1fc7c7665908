"""The analytic cost model agrees with torch's FlopCounterMode on real forwards, in every mode."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

from flexattn import cost

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
    predicted = answer.stats["flops"]["total"]
    assert answer.stats["generated_tokens"] == new_tokens
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)
    if mode == "flex":
        assert 0 < answer.stats["hr_attended_mean"] < answer.stats["hr_tokens"]
    if avl:
        assert answer.stats["flops"]["avl_scoring"] > 0


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
    predicted = cost.call_flops(vlm.model.config, "naive_hd", embeds.shape[1], 1)["total"]
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


def test_flex_costs_sit_between_lowres_and_naive_at_7b_shape():
    from flexattn.presets import llava_7b_config

    config = llava_7b_config()
    prompt = 40 + 576
    hr = 72 * 72
    ten_percent = [[0] * 9 + [hr // 10] * 23]
    lowres = cost.call_flops(config, "lowres", prompt, 1)["total"]
    flex = cost.call_flops(config, "flex", prompt, 1, ten_percent)["total"]
    naive = cost.call_flops(config, "naive_hd", prompt, 1)["total"]
    assert lowres < flex < naive
    assert flex / naive < 0.15
    # A compact 10 % selection touches ~2 of the 9 crops: encoding only those keeps flex near plain LLaVA.
    lazy = cost.call_flops(config, "flex", prompt, 1, ten_percent, hr_crops=2)["total"]
    assert lazy < flex and lazy / lowres < 1.3
