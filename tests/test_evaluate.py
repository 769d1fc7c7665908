"""The eval runner's JSON has its fields with sane values (the papers' benchmarks: test_eval_benchmarks.py)."""

import json

import numpy as np
import pytest
import torch

from flexattn.evaluate import evaluate_synthetic, format_table
from flexattn.image import ImageProcessor, boxes_cells
from flexattn.loading import LoadedModel
from flexattn.pipeline import FlexVLM
from flexattn.synthetic import build_tokenizer

from .conftest import make_model


@pytest.fixture(scope="module")
def synthetic_vlm():
    tokenizer = build_tokenizer()
    model = make_model(seed=11, num_layers=4, selection_layer=1, lowres_size=112, threshold=120, pool_size=8,
                       vocab_size=len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    return FlexVLM(LoadedModel(model, tokenizer, ImageProcessor(), "tiny-synthetic", "transformers", False))


def test_synthetic_eval_json_fields(synthetic_vlm):
    result = evaluate_synthetic(synthetic_vlm, "synthetic", n=6, seed=10_000_000, progress=False, max_new_tokens=3)
    json.dumps(result)  # plain JSON
    assert set(result["modes"]) == {"lowres", "flex", "select_all"}
    for mode, block in result["modes"].items():
        for key in ("accuracy", "hr_share", "selection_recall", "tflops", "families"):
            assert key in block
        assert 0 <= block["accuracy"] <= 1 and block["tflops"] > 0
        assert set(block["families"]) == {"attribute", "spatial", "multi"}
    assert result["modes"]["lowres"]["hr_share"] == 0 and result["modes"]["lowres"]["selection_recall"] is None
    assert result["modes"]["select_all"]["hr_share"] == 1.0
    assert result["modes"]["select_all"]["selection_recall"] == 1.0
    assert 0 <= result["modes"]["flex"]["selection_recall"] <= 1
    assert 0 <= result["modes"]["flex"]["shifted_mask_accuracy"] <= 1
    assert "flex" in format_table(result)


def test_selection_recall_scores_each_answer_token_against_its_own_target():
    """Token k's mask (the one the last layer attended with) against token k's boxes, then the mean over tokens."""
    from types import SimpleNamespace

    from flexattn.evaluate import selection_recall
    from flexattn.trace import LayerTrace, Trace

    G = 4  # a 4x4 HR grid over a 40x40 image: 10 px cells
    first, second = np.zeros((G, G), bool), np.zeros((G, G), bool)
    first[0, 0] = True  # token 0 looks at the top-left cell
    second[3, 2:] = True  # token 1 at two bottom-right cells
    trace = Trace(lr_grid=2, hr_grid=G, selection_layer=0)
    for mask in (first, second):  # layer 1 attends with the mask layer 0 selected
        trace.passes.append([LayerTrace(0, np.zeros((2, 2)), selected=mask), LayerTrace(1, np.zeros((2, 2)))])
    sample = SimpleNamespace(token_boxes=[[(0, 0, 20, 10)], [(20, 30, 40, 40)]])  # 2 cells, then 2 cells
    assert selection_recall(sample, trace, (40, 40)) == pytest.approx((1 / 2 + 2 / 2) / 2)
    swapped = SimpleNamespace(token_boxes=sample.token_boxes[::-1])  # the same masks, each on the other's target
    assert selection_recall(swapped, trace, (40, 40)) == 0


def test_long_bench_is_the_long_multi_family_and_avl_fields(synthetic_vlm):
    from flexattn.avl import AVLSettings

    result = evaluate_synthetic(synthetic_vlm, "synthetic-long", n=2, modes=("flex",), shifted=False,
                                progress=False, max_new_tokens=6, avl=AVLSettings())
    block = result["modes"]["flex"]
    assert set(block["families"]) == {"multi"}
    assert 0 < block["kv_ratio"] < 1 and 0 <= block["token_agreement"] <= 1
    assert -1 <= block["accuracy_drop"] <= 1 and 0 < block["visual_attention_ratio"] < 1
    zero = evaluate_synthetic(synthetic_vlm, "synthetic-long", n=2, modes=("flex",), shifted=False, progress=False,
                              max_new_tokens=6,
                              avl=AVLSettings(vision_evict_rate=0, compute_skip_rate=0, text_evict_rate=0))
    assert zero["modes"]["flex"]["kv_ratio"] == 1 and zero["modes"]["flex"]["token_agreement"] == 1


def test_hr_cells_follow_square_padding():
    # 336x168 image padded to 336x336 (84 px top margin), 24x24 grid of 14 px cells.
    cells = boxes_cells([(0, 0, 14, 14)], (336, 168), 24)
    assert cells.sum() == 1 and cells[6, 0]
    assert boxes_cells([(10, 10, 30, 20)], (336, 336), 24).sum() == 2 * 3


def test_eval_cli_prints_one_json_object(synthetic_vlm, tmp_path):
    import subprocess
    import sys

    from .conftest import write_transformers_checkpoint

    path = write_transformers_checkpoint(synthetic_vlm, tmp_path / "ckpt")
    out = subprocess.run(
        [sys.executable, "-m", "flexattn", "eval", "--model", str(path), "--bench", "synthetic", "--n", "2",
         "--modes", "lowres,flex", "--max-new-tokens", "2", "--threshold", "200", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert set(result["modes"]) == {"lowres", "flex"} and "shifted_mask_accuracy" in result["modes"]["flex"]
    # --threshold overrides the model's (120): a higher one lets fewer HR tokens through
    assert result["flex_settings"]["threshold"] == 200 and result["flex_settings"]["pool_size"] == 8
    own = evaluate_synthetic(synthetic_vlm, "synthetic", n=2, modes=("flex",), shifted=False, progress=False,
                             max_new_tokens=2)
    assert own["flex_settings"]["threshold"] == 120
    assert 0 < result["modes"]["flex"]["hr_share"] < own["modes"]["flex"]["hr_share"]
