"""The benchmark runner on tiny random models: its JSON, A-VL rows, lazy HR encoding, follow-up prefix reuse, the CLI.

No timing assertions: speed targets are the bench output's business, not the tests'.
"""

import json
import math

import pytest
import torch

from flexattn import bench
from flexattn.avl import AVLSettings
from flexattn.cli import main

from .conftest import make_vlm, random_image, write_transformers_checkpoint

MODES = ("lowres", "flex", "select_all", "naive_hd")
RATIO_KEYS = ("flops_vs_naive_hd", "flops_vs_lowres", "prefill_time_vs_naive_hd", "prefill_time_vs_lowres")


def tiny_bench_model(share=0.10, **kwargs) -> bench.BenchModel:
    vlm = make_vlm(seed=3, num_layers=4, selection_layer=1, lowres_size=84, threshold=100)
    return bench.BenchModel("tiny", vlm, planted_share=share, image=random_image(100, 80, seed=5), **kwargs)


@pytest.fixture(scope="module")
def result():
    out = bench.run([tiny_bench_model()], [3], repeats=1, warmup=0, decode_steps=2, followup_tokens=2)
    return json.loads(json.dumps(out))  # what --json prints


def test_bench_json_has_required_fields_and_sane_values(result):
    assert set(result["ratios"]) == set(MODES)
    for mode in MODES:
        for key in RATIO_KEYS:
            assert result["ratios"][mode][key] > 0, (mode, key)
        assert result["ratios"][mode]["flops_vs_lowres"] == pytest.approx(
            result["ratios"][mode]["flops_vs_naive_hd"] / result["ratios"]["lowres"]["flops_vs_naive_hd"])
    assert result["ratios"]["naive_hd"]["flops_vs_naive_hd"] == 1.0
    assert result["ratios"]["lowres"]["prefill_time_vs_lowres"] == 1.0
    assert result["followup_speedup"] > 0
    assert result["main"] == {"model": "tiny", "zoom": 3, "avl": False}

    rows = {r["mode"]: r for r in result["runs"] if not r["avl"]}
    assert set(rows) == set(MODES) and all(r["measured"] for r in rows.values())
    total = {m: rows[m]["flops"]["total"] for m in MODES}
    assert total["naive_hd"] > total["flex"] > total["lowres"]  # a planted small selection
    assert total["select_all"] > total["flex"]
    for r in rows.values():
        assert set(r["flops"]) == {"vision", "projector", "llm", "hr_attention", "total"}
        assert r["prefill_s"] > 0 and r["vision_s"] > 0 and r["first_token_s"] >= r["prefill_s"]
        assert r["decode_ms_per_token"] > 0 and r["decode_flops_per_token"] > 0
        assert r["kv_cache_bytes"] > 0
        assert r["peak_memory_bytes"] is None or r["peak_memory_bytes"] >= 0
    # naive_hd feeds every HR token to the LLM as an input token; the others feed text + LR only.
    assert rows["naive_hd"]["llm_tokens"] == rows["lowres"]["llm_tokens"] + rows["naive_hd"]["hr_tokens"]
    assert rows["naive_hd"]["kv_cache_bytes"] > rows["flex"]["kv_cache_bytes"] == rows["lowres"]["kv_cache_bytes"]
    # flex attends exactly the planted square (6x6 of the 18x18 HR grid) and encodes only the crop it lies in.
    planted = result["models"][0]["planted"]["3"]
    assert planted["tokens"] == 36 and planted["crops_touched"] == 1
    assert rows["flex"]["hr_attended_mean"] == 36 and rows["flex"]["hr_crops_encoded"] == 1
    assert rows["select_all"]["hr_attended_mean"] == rows["select_all"]["hr_tokens"] == 324
    assert rows["lowres"]["hr_crops_encoded"] == 0 and rows["select_all"]["hr_crops_encoded"] == 9
    assert set(result["targets"]) >= {"flex_flops_vs_naive_hd", "flex_flops_vs_lowres",
                                      "flex_prefill_time_vs_naive_hd", "followup_speedup"}


def test_every_mode_has_an_avl_row_with_fewer_kv_bytes(result):
    """Default AVLSettings on the tiny model (6x6 LR, 18x18 HR tokens), flex with its planted selection: each layer
    keeps ceil(0.5 * visual) visual tokens after prefill, attends to ceil(0.3 * kept) of them on ordinary steps and
    to all kept ones on refresh steps (3 and 6). Text stays under A-VL's minimum budget of 20: nothing else goes."""
    assert result["avl_variants"] == [False, True] and result["avl"] == AVLSettings().to_dict()
    assert result["decode_steps"] == 6 and result["decode_steps_requested"] == 2  # raised past a refresh step
    assert [(g["avl"], set(g["ratios"])) for g in result["groups"]] == [(False, set(MODES)), (True, set(MODES))]
    plain = {r["mode"]: r for r in result["runs"] if not r["avl"]}
    avl = {r["mode"]: r for r in result["runs"] if r["avl"]}
    assert set(avl) == set(MODES)
    visual = {"lowres": 36, "flex": 36, "select_all": 36, "naive_hd": 36 + 324}
    for mode in MODES:
        a, p = avl[mode], plain[mode]
        assert a["measured"] and a["avl_settings"] == AVLSettings().to_dict() and "avl_settings" not in p
        assert a["decode_steps"] == p["decode_steps"] == 6 and len(a["decode_ms_steps"]) == 6
        assert a["llm_tokens"] == p["llm_tokens"] and a["image_tokens_in_prompt"] == visual[mode]
        # KV bytes: fewer with A-VL, after prefill (eviction runs inside it) and at the end of decoding
        assert 0 < a["kv_cache_bytes"] < p["kv_cache_bytes"] and 0 < a["kv_cache_bytes_end"] < p["kv_cache_bytes_end"]
        kept = math.ceil(0.5 * visual[mode])
        core = math.ceil(0.3 * kept)
        n = a["llm_tokens"]
        assert a["kv_cache_bytes"] * n == p["kv_cache_bytes"] * (n - (visual[mode] - kept))
        assert a["kv_cache_bytes_end"] * (n + 6) == p["kv_cache_bytes_end"] * (n + 6 - (visual[mode] - kept))
        assert a["kv_cache_bytes_full_cache_end"] == p["kv_cache_bytes_end"] == p["kv_cache_bytes_full_cache_end"]
        assert p["kv_cache_bytes_end"] * n == p["kv_cache_bytes"] * (n + 6)
        # visual tokens attended per decoding step: the core, all kept ones on refresh steps; all without A-VL
        assert a["visual_attended_per_step"] == [core, core, kept, core, core, kept]
        assert p["visual_attended_per_step"] == [visual[mode]] * 6
        # the cost model counts A-VL's attended keys (and its own scoring): fewer decoding FLOPs
        assert "avl_scoring" in a["flops"] and "avl_scoring" not in p["flops"]
        assert a["decode_flops_per_token_parts"]["avl_scoring"] > 0
        assert 0 < a["decode_flops_per_token"] < p["decode_flops_per_token"]
        q = result["avl_ratios"][mode]
        assert q["kv_ratio"] == pytest.approx(a["kv_cache_bytes_end"] / p["kv_cache_bytes_end"]) and q["kv_ratio"] < 1
        assert q["kv_ratio_after_prefill"] < 1 and q["decode_flops_ratio"] < 1
        assert q["visual_attended_ratio"] == pytest.approx((4 * core + 2 * kept) / (6 * visual[mode]))
        assert q["decode_time_ratio"] > 0 and q["decode_time_ratio_mean"] > 0
    assert avl["flex"]["hr_attended_mean"] == 36  # A-VL leaves the planted HR selection alone
    (comparison,) = result["avl_comparison"]
    assert comparison["ratios"] == result["avl_ratios"] and (comparison["model"], comparison["zoom"]) == ("tiny", 3)


@pytest.mark.parametrize("mode", ["lowres", "flex", "select_all"])
def test_measured_avl_calls_compute_what_the_pipeline_answers(mode):
    """The bench's A-VL prefill + decode loop produces the tokens and KV bytes FlexVLM.answer(avl=True) does."""
    bm = tiny_bench_model()
    planted = bench.planted_region(18, 0.1)
    call = bench.cold_call(bm, mode, 3, bench.Clock(torch.device("cpu")), planted=planted, decode_steps=6,
                           avl=AVLSettings())
    answer = bm.vlm.answer(bm.image, bm.question, mode=mode, max_new_tokens=7, trace=False, avl=True,
                           planted_selection=planted if mode == "flex" else None)
    assert answer.token_ids[:6] == call.decoded
    assert call.kv_cache_bytes_end == answer.stats["kv_bytes"] < answer.stats["avl"]["kv_bytes_full_cache"]
    assert len(call.avl.keys_scored) == 7  # the prefill and 6 decoding steps, as the cost model reads them


def test_naive_hd_avl_treats_every_hr_input_token_as_visual():
    bm = tiny_bench_model()
    call = bench.cold_call(bm, "naive_hd", 3, bench.Clock(torch.device("cpu")), decode_steps=3, avl=AVLSettings())
    assert call.image_tokens == 36 + 324 and call.avl.image_end - call.avl.image_start == 360
    assert [sum(layers) / len(layers) for layers in call.avl.visual_attended] == [360, 54, 54, 180]
    plain = bench.cold_call(bm, "naive_hd", 3, bench.Clock(torch.device("cpu")), decode_steps=3)
    assert plain.avl is None
    assert call.kv_cache_bytes * plain.llm_tokens == plain.kv_cache_bytes * (plain.llm_tokens - 180)


def test_lazy_encoding_encodes_fewer_crops_with_identical_outputs(result):
    (lazy,) = result["lazy_hr"]
    assert lazy["crops_total"] == 9 and lazy["crops_encoded_eager_mean"] == 9
    assert 0 < lazy["crops_encoded_lazy_mean"] < 9
    assert lazy["identical_outputs"]
    sample = lazy["per_sample"][0]
    assert sample["identical_tokens"] and sample["identical_prefill_logits"]
    assert result["targets"]["lazy_hr_identical_outputs"]["met"] and result["targets"]["lazy_hr_fewer_crops"]["met"]


def test_followup_reuses_the_prompt_prefix(result):
    (fu,) = result["followup"]
    assert fu["prefix_tokens_reused"] > 0
    assert fu["prefix_tokens_reused"] == fu["first_prompt_tokens"] - 1
    assert fu["followup_prompt_tokens"] > fu["first_prompt_tokens"]
    assert fu["followup_latency_s"]["vision"] < fu["first_latency_s"]["vision"]  # features were cached
    assert fu["followup_speedup"] == pytest.approx(fu["first_s"] / fu["followup_s"])


@pytest.mark.parametrize("mode", ["lowres", "flex", "select_all"])
def test_measured_calls_compute_what_the_pipeline_answers(mode):
    """The bench's own prefill + greedy decode loop produces the tokens FlexVLM.answer produces."""
    bm = tiny_bench_model()
    planted = bench.planted_region(18, 0.1)
    call = bench.cold_call(bm, mode, 3, bench.Clock(torch.device("cpu")), planted=planted, decode_steps=4)
    answer = bm.vlm.answer(bm.image, bm.question, mode=mode, max_new_tokens=5, trace=False,
                           planted_selection=planted if mode == "flex" else None)
    assert answer.token_ids[:4] == call.decoded
    assert call.llm_tokens == call.prompt_len == answer.stats["prompt_tokens"]


def test_planted_region_is_a_compact_square_of_the_share():
    mask = bench.planted_region(72, 0.10)
    assert mask.shape == (72 * 72,) and int(mask.sum()) == 23 * 23
    rows, cols = mask.reshape(72, 72).nonzero(as_tuple=True)
    assert int(rows.max() - rows.min()) == int(cols.max() - cols.min()) == 22
    assert bench.crops_touched(mask, 3) == 1  # centred at zoom 3: inside the middle crop
    assert bench.crops_touched(bench.planted_region(72, 0.10, (0.3, 0.3)), 3) == 4
    assert bench.crops_range(23, 72, 3) == (1, 4)
    assert bench.crops_touched(bench.planted_region(48, 0.10), 2) == 4


def test_analytic_flops_of_the_7b_shape_scale_a_shallow_run_to_full_depth():
    """The 7b-shaped rows report full-depth FLOPs from a run at reduced depth (no weights needed to check)."""
    from flexattn.presets import llava_7b_config

    class Shallow:  # what BenchModel reads of a FlexVLM: model.config and settings
        class model:
            config = llava_7b_config(8)

        settings = type("S", (), {"selection_layer": 1})()

    bm = bench.BenchModel("7b", Shallow(), cost_config=llava_7b_config(1), cost_selection_layer=8)
    assert bm.scaled_cost
    counts = bench._full_depth_counts(bm, [0, 0, 529, 529])
    assert counts == [0] * 9 + [529] * 23
    flex, flex_decode = bench.analytic_flops(bm, "flex", 3, 616, [0, 0, 529, 529], crops=1)
    lowres, _ = bench.analytic_flops(bm, "lowres", 3, 616, [0] * 4, crops=0)
    naive, _ = bench.analytic_flops(bm, "naive_hd", 3, 616, [], crops=9)
    assert flex["total"] / naive["total"] < 0.15 and flex["total"] / lowres["total"] < 1.3
    assert flex["vision"] == 2 * lowres["vision"]  # LR view + the one crop the planted square touches

    # A-VL's keys per layer: below the selection layer its attended keys, from there on also the keys it scores
    # for selection; spread over the 32 layers by the same split (selection layer 1 of 4 -> 8 of 32).
    keys = [[(616, 0)] * 4, [(20, 0), (20, 60), (20, 60), (20, 60)]]
    full = bench._full_depth_avl_keys(bm, keys)
    assert full == [[(616, 0)] * 32, [(20, 0)] * 8 + [(20, 60)] * 24]
    with_avl, avl_decode = bench.analytic_flops(bm, "flex", 3, 616, [0, 0, 529, 529], crops=1,
                                                decode_passes=[[0, 0, 529, 529]], avl_keys=keys)
    assert with_avl["total"] == flex["total"] + with_avl["avl_scoring"]  # same prefill, plus A-VL's scoring
    assert avl_decode["total"] < flex_decode["total"] and avl_decode["avl_scoring"] > 0


def test_cli_bench_on_a_checkpoint_prints_json_and_writes_the_chart(tmp_path, capsys):
    vlm = make_vlm(seed=2, num_layers=4, selection_layer=1, lowres_size=56, threshold=100)
    path = write_transformers_checkpoint(vlm, tmp_path / "tiny")
    html = tmp_path / "bench.html"
    code = main(["bench", "--model", str(path), "--zoom", "2,3", "--repeats", "1", "--warmup", "0",
                 "--decode-steps", "1", "--followup-tokens", "1", "--lazy-samples", "1", "--device", "cpu",
                 "--json", "--html", str(html)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["main"]["zoom"] == 3 and {r["zoom"] for r in out["runs"]} == {2, 3}
    assert len(out["groups"]) == 4 and all(set(g["ratios"]) == set(MODES) for g in out["groups"])  # 2 zooms x A-VL
    assert {(g["zoom"], g["avl"]) for g in out["groups"]} == {(2, False), (2, True), (3, False), (3, True)}
    assert "followup_speedup" in out and set(out["ratios"]["flex"]) >= set(RATIO_KEYS)
    assert html.is_file() and "plotly" in html.read_text()[:100_000].lower()
    assert [r["avl"] for r in out["runs"]].count(True) == 8 and len(out["avl_comparison"]) == 2
    assert out["avl_ratios"]["naive_hd"]["kv_ratio"] < 1


@pytest.mark.parametrize("choice, variants", [("off", [False]), ("on", [True])])
def test_cli_bench_avl_off_or_on_alone(tmp_path, capsys, choice, variants):
    vlm = make_vlm(seed=2, num_layers=4, selection_layer=1, lowres_size=56, threshold=100)
    path = write_transformers_checkpoint(vlm, tmp_path / "tiny")
    code = main(["bench", "--model", str(path), "--zoom", "2", "--modes", "lowres,flex", "--repeats", "1",
                 "--warmup", "0", "--decode-steps", "1", "--followup-tokens", "1", "--lazy-samples", "1",
                 "--device", "cpu", "--avl", choice, "--refresh-every", "2", "--json", "--html", ""])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["avl_variants"] == variants and {r["avl"] for r in out["runs"]} == set(variants)
    assert out["main"]["avl"] is variants[0] and out["avl_ratios"] is None and out["avl_comparison"] == []
    assert out["decode_steps"] == (1 if choice == "off" else 6)
    assert (out["avl"] or {}).get("refresh_every") == (None if choice == "off" else 2)


def test_cli_bench_without_the_embedded_model_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "EMBEDDED_MODEL", tmp_path / "flexattn-tiny")
    assert main(["bench", "--model", "embedded", "--html", ""]) == 2
    err = capsys.readouterr().err
    assert "embedded model is not there yet" in err and "--model 7b-shaped" in err


@pytest.mark.parametrize("argv", [["--zoom", "0"], ["--zoom", "a,b"], ["--modes", "lowres,fast"],
                                  ["--depth-divisor", "3"], ["--planted-share", "2"],
                                  ["--repeats", "0"], ["--avl-repeats", "0"],
                                  ["--refresh-every", "0"], ["--vision-evict-rate", "1.5"]])
def test_cli_bench_rejects_bad_options(argv, capsys):
    assert main(["bench", "--html", "", *argv]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_format_report_shows_one_table_per_zoom_and_the_targets(result):
    text = bench.format_report(result)
    assert "zoom 3" in text and "naive_hd" in text
    assert "targets (tiny, zoom 3, A-VL off; the targets are set for 7b-shaped" in text
    assert "follow-up question" in text and "lazy HR encoding" in text
    assert "A-VL off" in text and "A-VL on" in text and "decoding, zoom 3: 6 greedy steps" in text
    assert "A-VL over no A-VL (tiny, zoom 3):" in text and "raised from --decode-steps 2" in text
