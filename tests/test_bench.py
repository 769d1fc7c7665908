"""The benchmark runner on a tiny random model: one shared run, whose rows, ratios, A-VL figures, full-depth FLOPs and
JSON are checked against what they are computed from; its measured calls against FlexVLM.answer; the CLI in-process.

No timing assertions: speed targets are the bench output's business, not the tests'.
"""

import json
import math

import pytest
import torch

from flexattn import bench, cost
from flexattn.avl import AVLSettings
from flexattn.bench import measure
from flexattn.bench import models as bench_models
from flexattn.cli import main
from flexattn.presets import tiny_config
from flexattn.settings import COST_MODES

from .conftest import make_vlm, random_image, write_transformers_checkpoint

RATIO_KEYS = {"flops_vs_naive_hd", "flops_vs_lowres", "prefill_time_vs_naive_hd", "prefill_time_vs_lowres",
              "first_token_time_vs_naive_hd", "first_token_time_vs_lowres"}
AVL_RATIO_KEYS = {"kv_ratio", "kv_ratio_after_prefill", "kv_ratio_vs_own_full_cache", "decode_time_ratio",
                  "decode_time_ratio_mean", "decode_flops_ratio", "visual_attended_ratio", "prefill_time_ratio"}
# What `bench --json` printed before the result was typed: docs and other tools read these.
TOP_KEYS = {"device", "timing", "memory", "repeats", "warmup", "decode_steps", "decode_steps_requested",
            "avl_variants", "avl", "avl_repeats", "avl_warmup", "models", "runs", "groups", "avl_comparison",
            "followup", "lazy_hr", "main", "ratios", "avl_ratios", "followup_speedup", "targets", "targets_apply",
            "elapsed_s"}
ROW_KEYS = {"model", "zoom", "mode", "avl", "measured", "llm_tokens", "prompt_tokens", "lr_tokens", "hr_tokens",
            "image_tokens_in_prompt", "hr_crops_encoded", "hr_attended_per_layer", "hr_attended_mean", "flops",
            "decode_flops_per_token", "decode_flops_per_token_parts", "flops_at_measured_depth", "vision_s",
            "prefill_s", "first_token_s", "prefill_s_repeats", "decode_steps", "decode_ms_per_token",
            "decode_ms_per_token_mean", "decode_ms_steps", "peak_memory_bytes", "kv_cache_bytes",
            "kv_cache_bytes_end", "kv_cache_bytes_full_cache_end", "hr_feature_bytes", "visual_attended_per_step",
            "visual_attended_mean"}
# The model measured: 4 LLM layers selecting at 1 (6x6 LR and 18x18 HR tokens at zoom 3). FLOPs are taken for a
# deeper copy of it, 8 layers selecting at 2, as the 7b-shaped model's are for the full-depth 7B.
FULL = tiny_config(num_layers=8, selection_layer=2, lowres_size=84, threshold=100)
PLANTED = 36  # the planted square: round(sqrt(0.10) * 18) = 6 tokens a side, inside the middle crop


@pytest.fixture(scope="module")
def vlm():
    return make_vlm(seed=3, num_layers=4, selection_layer=1, lowres_size=84, threshold=100)


def bench_model(vlm, scaled: bool) -> bench.BenchModel:
    return bench.BenchModel("tiny", vlm, cost_config=FULL if scaled else None, planted_share=0.10,
                            image=random_image(100, 80, seed=5))


@pytest.fixture(scope="module")
def result(vlm) -> bench.BenchResult:
    return bench.run([bench_model(vlm, scaled=True)], [3], repeats=1, warmup=0, decode_steps=2, followup_tokens=2)


def rows(result, avl: bool) -> dict[str, bench.ModeRow]:
    return {r.mode: r for r in result.rows("tiny", 3, avl)}


def test_rows_count_tokens_crops_and_the_planted_selection(result):
    assert result.main == bench.MainGroup("tiny", 3, False) and not result.targets_apply
    plain = rows(result, False)
    assert list(plain) == list(COST_MODES) and all(r.measured for r in plain.values())
    # naive_hd feeds every HR token to the LLM as an input token; the others feed text + LR only.
    assert plain["naive_hd"].llm_tokens == plain["lowres"].llm_tokens + 324 == plain["naive_hd"].prompt_tokens + 324
    assert plain["naive_hd"].kv_cache_bytes * plain["lowres"].llm_tokens == \
        plain["lowres"].kv_cache_bytes * plain["naive_hd"].llm_tokens
    assert plain["flex"].kv_cache_bytes == plain["lowres"].kv_cache_bytes  # flex caches no HR entries
    # flex attends exactly the planted square and encodes only the crop it lies in; select_all every HR token
    info = result.models[0].planted["3"]
    assert (info.side, info.tokens, info.hr_tokens, info.crops_touched) == (6, PLANTED, 324, 1)
    assert plain["flex"].hr_attended_per_layer == [0, 0, PLANTED, PLANTED] and plain["flex"].hr_crops_encoded == 1
    assert plain["select_all"].hr_attended_mean == 324 and plain["select_all"].hr_crops_encoded == 9
    assert plain["lowres"].hr_crops_encoded == 0 and plain["lowres"].hr_attended_per_layer == [0] * 4
    total = {m: r.flops.total for m, r in plain.items()}
    assert total["naive_hd"] > total["select_all"] > total["flex"] > total["lowres"]
    assert plain["flex"].flops.vision == 2 * plain["lowres"].flops.vision  # the LR view + one crop


def test_ratios_are_computed_from_the_rows_they_name(result):
    assert [(g.avl, list(g.ratios)) for g in result.groups] == [(False, list(COST_MODES)), (True, list(COST_MODES))]
    for group in result.groups:
        by_mode = rows(result, group.avl)
        naive, low = by_mode["naive_hd"], by_mode["lowres"]
        for mode, q in group.ratios.items():
            r = by_mode[mode]
            assert q.flops_vs_naive_hd == r.flops.total / naive.flops.total
            assert q.flops_vs_lowres == r.flops.total / low.flops.total
            assert q.prefill_time_vs_naive_hd == r.prefill_s / naive.prefill_s
            assert q.prefill_time_vs_lowres == r.prefill_s / low.prefill_s
            assert q.first_token_time_vs_naive_hd == r.first_token_s / naive.first_token_s
            assert q.first_token_time_vs_lowres == r.first_token_s / low.first_token_s
            assert r.first_token_s == r.vision_s + r.prefill_s  # one repeat: the medians are that call's
    assert result.ratios is result.groups[0].ratios  # the main group: without A-VL
    assert result.avl_ratios is result.avl_comparison[0].ratios
    plain, avl = rows(result, False), rows(result, True)
    for mode, q in result.avl_ratios.items():
        a, p = avl[mode], plain[mode]
        assert q.kv_ratio == a.kv_cache_bytes_end / p.kv_cache_bytes_end
        assert q.kv_ratio_after_prefill == a.kv_cache_bytes / p.kv_cache_bytes
        assert q.kv_ratio_vs_own_full_cache == a.kv_cache_bytes_end / a.kv_cache_bytes_full_cache_end
        assert q.decode_time_ratio == a.decode_ms_per_token / p.decode_ms_per_token
        assert q.decode_time_ratio_mean == a.decode_ms_per_token_mean / p.decode_ms_per_token_mean
        assert q.decode_flops_ratio == a.decode_flops_per_token / p.decode_flops_per_token
        assert q.visual_attended_ratio == a.visual_attended_mean / p.visual_attended_mean
        assert q.prefill_time_ratio == a.prefill_s / p.prefill_s
    flex = result.ratios["flex"]
    assert result.targets["flex_flops_vs_naive_hd"] == bench.Target(flex.flops_vs_naive_hd, "<= 0.15",
                                                                     flex.flops_vs_naive_hd <= 0.15)
    assert result.followup_speedup == result.followup[0].followup_speedup
    assert result.targets["followup_speedup"].value == result.followup_speedup


def test_avl_rows_hold_fewer_kv_bytes_and_attend_fewer_visual_tokens(result):
    """Default AVLSettings, 6x6 LR and 18x18 HR tokens: each layer keeps ceil(0.5 * visual) visual tokens after
    prefill, attends to ceil(0.3 * kept) of them on ordinary steps and to all kept ones on refresh steps (3 and 6).
    Text stays under A-VL's minimum budget of 20: nothing else goes."""
    assert result.avl_variants == [False, True] and result.avl == AVLSettings()
    assert result.decode_steps == 6 and result.decode_steps_requested == 2  # raised past a refresh step
    plain, avl = rows(result, False), rows(result, True)
    visual = {"lowres": 36, "flex": 36, "select_all": 36, "naive_hd": 36 + 324}
    for mode in COST_MODES:
        a, p = avl[mode], plain[mode]
        assert a.avl_settings == AVLSettings() and p.avl_settings is None
        assert a.decode_steps == p.decode_steps == 6 and len(a.decode_ms_steps) == 6
        assert a.llm_tokens == p.llm_tokens and a.image_tokens_in_prompt == visual[mode]
        kept, n = math.ceil(0.5 * visual[mode]), a.llm_tokens
        core = math.ceil(0.3 * kept)
        # KV bytes: fewer with A-VL, after prefill (eviction runs inside it) and at the end of decoding
        assert a.kv_cache_bytes * n == p.kv_cache_bytes * (n - (visual[mode] - kept))
        assert a.kv_cache_bytes_end * (n + 6) == p.kv_cache_bytes_end * (n + 6 - (visual[mode] - kept))
        assert sum(a.kv_cache_bytes_per_layer_end) == a.kv_cache_bytes_end and p.kv_cache_bytes_per_layer_end is None
        assert a.kv_cache_bytes_full_cache_end == p.kv_cache_bytes_end == p.kv_cache_bytes_full_cache_end
        assert p.kv_cache_bytes_end * n == p.kv_cache_bytes * (n + 6)
        # visual tokens attended per decoding step: the core, all kept ones on refresh steps; all without A-VL
        assert a.visual_attended_per_step == [core, core, kept, core, core, kept]
        assert p.visual_attended_per_step == [visual[mode]] * 6
        # the cost model counts A-VL's attended keys (and its own scoring): fewer decoding FLOPs
        assert a.flops.avl_scoring > 0 and p.flops.avl_scoring == 0
        assert a.decode_flops_per_token_parts.avl_scoring > 0
        assert 0 < a.decode_flops_per_token < p.decode_flops_per_token
        assert result.avl_ratios[mode].kv_ratio < 1
    assert avl["flex"].hr_attended_mean == PLANTED  # A-VL leaves the planted HR selection alone


def full_depth_flops(mode: str, prompt_tokens: int, passes: int) -> cost.Flops:
    """FULL's FLOPs for the run's call: flex's planted square attended at every layer after FULL's selection layer
    (2) in every pass; flex and select_all project their HR keys/values in the prefill only (cached per image)."""
    hr = [0] * 3 + [PLANTED if mode == "flex" else 324] * 5
    counts = [hr] * passes if mode == "flex" else None
    projected = [hr] + [[0] * 8] * (passes - 1) if mode in ("flex", "select_all") else None
    return cost.call_flops(FULL, mode, prompt_tokens, passes, counts, selection_layer=2, zoom=3,
                           hr_crops=1 if mode == "flex" else None, hr_projected=projected)


def test_flops_are_the_cost_model_at_full_depth(result, vlm):
    """The rows' FLOPs are FULL's (8 layers) with the run's counts; `flops_at_measured_depth` is the run's own."""
    for r in rows(result, False).values():
        expected = full_depth_flops(r.mode, r.prompt_tokens, 1)
        assert r.flops == expected, r.mode
        measured = [r.hr_attended_per_layer] if r.mode == "flex" else None
        at_depth = cost.call_flops(vlm.model.config, r.mode, r.prompt_tokens, 1, measured, selection_layer=1, zoom=3,
                                   hr_crops=r.hr_crops_encoded if r.mode == "flex" else None)
        assert r.flops_at_measured_depth == at_depth.total < r.flops.total
        # decoding: the mean of 6 steps, each one token over the cache
        decoding = full_depth_flops(r.mode, r.prompt_tokens, 7) - expected
        assert r.decode_flops_per_token == round(decoding.total / 6)
        assert r.decode_flops_per_token_parts == cost.Flops(*(round(getattr(decoding, k) / 6) for k in cost.PARTS))
    # with A-VL, the prefill is the same work plus A-VL's scoring
    plain = rows(result, False)
    for mode, a in rows(result, True).items():
        assert a.flops.total - a.flops.avl_scoring == plain[mode].flops.total


@pytest.mark.parametrize("mode", ["lowres", "flex", "select_all"])
@pytest.mark.parametrize("avl", [False, True])
def test_measured_calls_compute_what_the_pipeline_answers(vlm, mode, avl):
    """The bench's own prefill + greedy decode loop produces the tokens, KV bytes and (at the model's own depth) the
    FLOPs that FlexVLM.answer produces for the same call."""
    bm = bench_model(vlm, scaled=False)
    planted = bench.planted_region(18, 0.10)
    steps = 6 if avl else 3  # with A-VL: past a refresh step
    call = bench.cold_call(bm, mode, 3, bench.Clock(torch.device("cpu")), planted=planted, decode_steps=steps,
                           avl=AVLSettings() if avl else None)
    vlm._cache.clear()
    answer = vlm.answer(bm.image, bm.question, mode=mode, max_new_tokens=steps + 1, trace=False, avl=avl,
                        lazy_hr=True, planted_selection=planted if mode == "flex" else None)
    assert answer.stats.generated_tokens == steps + 1 and answer.token_ids[:steps] == call.decoded
    assert call.llm_tokens == call.prompt_len == answer.stats.prompt_tokens
    assert call.crops == answer.stats.hr_crops_encoded == {"lowres": 0, "flex": 1, "select_all": 9}[mode]
    if avl:
        assert call.kv_cache_bytes_end == answer.stats.kv_bytes < answer.stats.avl.kv_bytes_full_cache
        assert len(call.avl.keys_scored) == 7  # the prefill and 6 decoding steps, as the cost model reads them
    first, per_token, _ = measure.analytic_flops(bm, mode, 3, call.prompt_len, call.attended, call.crops,
                                                 call.attended_passes[1:], call.avl.keys_scored if avl else None,
                                                 call.projected_passes)
    assert abs(first.total + steps * per_token - answer.stats.flops.total) <= steps  # per-token figures are rounded


def test_naive_hd_avl_treats_every_hr_input_token_as_visual(vlm):
    bm = bench_model(vlm, scaled=False)
    clock = bench.Clock(torch.device("cpu"))
    call = bench.cold_call(bm, "naive_hd", 3, clock, decode_steps=3, avl=AVLSettings())
    assert call.image_tokens == 36 + 324 and call.avl.image_end - call.avl.image_start == 360
    assert [sum(layers) / len(layers) for layers in call.avl.visual_attended] == [360, 54, 54, 180]
    plain = bench.cold_call(bm, "naive_hd", 3, clock, decode_steps=3)
    assert plain.avl is None and plain.image_tokens == 360
    assert call.kv_cache_bytes * plain.llm_tokens == plain.kv_cache_bytes * (plain.llm_tokens - 180)


def test_lazy_encoding_encodes_fewer_crops_with_identical_outputs(result):
    (lazy,) = result.lazy_hr
    assert (lazy.crops_total, lazy.crops_encoded_eager_mean, lazy.crops_encoded_lazy_mean) == (9, 9, 1)
    (sample,) = lazy.per_sample
    assert sample.identical_tokens and sample.identical_prefill_logits and lazy.identical_outputs
    assert sample.crops_encoded_lazy_prefill == 1
    assert result.targets["lazy_hr_identical_outputs"].met and result.targets["lazy_hr_fewer_crops"].met


def test_followup_reuses_the_prompt_prefix(result):
    (fu,) = result.followup
    assert fu.prefix_tokens_reused == fu.first_prompt_tokens - 1 > 0
    assert fu.followup_prompt_tokens > fu.first_prompt_tokens
    assert fu.followup_latency_s.vision < fu.first_latency_s.vision  # features were cached
    assert fu.followup_speedup == fu.first_s / fu.followup_s
    assert fu.first_generated_tokens == fu.followup_generated_tokens == 2


def test_json_round_trip_keeps_the_keys_the_docs_read(result):
    out = json.loads(json.dumps(result.to_json()))
    assert set(out) == TOP_KEYS
    assert set(out["ratios"]) == set(COST_MODES) and all(set(q) == RATIO_KEYS for q in out["ratios"].values())
    assert set(out["avl_ratios"]) == set(COST_MODES)
    assert all(set(q) == AVL_RATIO_KEYS for q in out["avl_ratios"].values())
    assert out["avl_ratios"]["flex"]["decode_time_ratio"] == result.avl_ratios["flex"].decode_time_ratio
    assert out["avl_ratios"]["naive_hd"]["kv_ratio"] == result.avl_ratios["naive_hd"].kv_ratio
    assert out["ratios"]["flex"]["flops_vs_naive_hd"] == result.ratios["flex"].flops_vs_naive_hd
    assert out["followup_speedup"] == result.followup_speedup and out["main"] == {"model": "tiny", "zoom": 3,
                                                                                   "avl": False}
    assert [set(g) for g in out["groups"]] == [{"model", "zoom", "avl", "ratios"}] * 2
    assert out["avl_comparison"][0]["ratios"] == out["avl_ratios"]
    assert all(set(t) == {"value", "target", "met"} for t in out["targets"].values())
    assert set(out["targets"]) == {*bench.TARGETS, "lazy_hr_identical_outputs", "lazy_hr_fewer_crops"}
    for row, typed in zip(out["runs"], result.runs):
        assert set(row) >= ROW_KEYS
        assert row["flops"]["total"] == typed.flops.total and row["flops"]["vision"] == typed.flops.vision
        assert row["decode_flops_per_token_parts"]["total"] == typed.decode_flops_per_token_parts.total
    assert out["runs"][-1]["avl_settings"] == AVLSettings().to_dict() and out["avl"] == AVLSettings().to_dict()
    assert out["models"][0]["planted"]["3"]["crops_touched_any_placement"] == [1, 4]
    assert set(out["followup"][0]["first_latency_s"]) >= {"vision", "prefill", "decode_per_token", "total"}
    assert set(out["lazy_hr"][0]["per_sample"][0]) >= {"identical_tokens", "identical_prefill_logits"}


def test_format_report_shows_the_tables_and_the_targets(result):
    text = bench.format_report(result)
    assert "zoom 3 (HR 252 px, 324 HR tokens), A-VL off" in text and "A-VL on" in text
    assert "FLOPs in MFLOPs (full-depth model)" in text
    assert "targets (tiny, zoom 3, A-VL off; the targets are set for 7b-shaped" in text
    assert "follow-up question" in text and "lazy HR encoding (flex, 1 image(s)): 1 of 9 crops" in text
    assert "decoding, zoom 3: 6 greedy steps" in text and "raised from --decode-steps 2" in text
    assert "A-VL over no A-VL (tiny, zoom 3):" in text
    assert "planted selection 6x6 = 36 of 324 HR tokens" in text
    flex_line = next(line for line in text.splitlines() if line.startswith("flex "))
    assert f"{result.ratios['flex'].flops_vs_naive_hd:.3f}" in flex_line


def test_write_chart_draws_every_row(result, tmp_path):
    path = bench.write_chart(result, tmp_path / "bench.html")
    html = path.read_text()
    assert "plotly" in html[:100_000].lower()
    assert all(f'"name":"{mode}"' in html and f'"name":"{mode} +A-VL"' in html for mode in COST_MODES)


def test_planted_region_is_a_compact_square_of_the_share():
    mask = bench.planted_region(72, 0.10)
    assert mask.shape == (72 * 72,) and int(mask.sum()) == 23 * 23
    rows_, cols = mask.reshape(72, 72).nonzero(as_tuple=True)
    assert int(rows_.max() - rows_.min()) == int(cols.max() - cols.min()) == 22
    assert bench.crops_touched(mask, 3) == 1  # centred at zoom 3: inside the middle crop
    assert bench.crops_touched(bench.planted_region(72, 0.10, (0.3, 0.3)), 3) == 4
    assert bench.crops_range(23, 72, 3) == (1, 4)
    assert bench.crops_touched(bench.planted_region(48, 0.10), 2) == 4


def test_run_checks_its_options_before_measuring(vlm):
    bm = bench_model(vlm, scaled=False)
    for options in ({"repeats": 0}, {"warmup": -1}, {"decode_steps": -1}, {"followup_tokens": 0},
                    {"avl_repeats": 0}, {"modes": ["lowres", "fast"]}, {"avl_variants": ()}):
        with pytest.raises(ValueError):
            bench.run([bm], [3], **options)
    with pytest.raises(ValueError, match="depth_divisor"):
        bench.build_models(["7b-shaped"], depth_divisor=3)


# ---- the command line (flexattn.cli owns the options; it calls the bench's functions) -------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    vlm = make_vlm(seed=2, num_layers=4, selection_layer=1, lowres_size=56, threshold=100)
    return write_transformers_checkpoint(vlm, tmp_path_factory.mktemp("bench") / "tiny")


FAST = ["--repeats", "1", "--warmup", "0", "--decode-steps", "1", "--followup-tokens", "1", "--lazy-samples", "1",
        "--device", "cpu"]


def test_cli_bench_on_a_checkpoint_prints_json_and_writes_the_chart(checkpoint, tmp_path, capsys):
    html = tmp_path / "bench.html"
    code = main(["bench", "--model", str(checkpoint), "--zoom", "2,1", "--modes", "lowres,flex,naive_hd", *FAST,
                 "--avl", "off", "--naive-max-zoom", "1", "--json", "--html", str(html)])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == TOP_KEYS and out["main"] == {"model": str(checkpoint), "zoom": 1, "avl": False}  # no zoom 3
    assert [(g["zoom"], g["avl"], list(g["ratios"])) for g in out["groups"]] == \
        [(1, False, ["lowres", "flex", "naive_hd"]), (2, False, ["lowres", "flex", "naive_hd"])]
    assert out["avl_variants"] == [False] and out["avl"] is None and out["decode_steps"] == 1
    assert out["avl_ratios"] is None and out["avl_comparison"] == []
    # naive_hd past --naive-max-zoom: FLOPs only, so its time ratios are missing and its FLOP ratios are not
    naive = {r["zoom"]: r for r in out["runs"] if r["mode"] == "naive_hd"}
    assert naive[1]["measured"] and not naive[2]["measured"] and naive[2]["prefill_s"] is None
    flex2 = out["groups"][1]["ratios"]["flex"]
    assert flex2["prefill_time_vs_naive_hd"] is None and 0 < flex2["flops_vs_naive_hd"] < 1
    assert set(out["ratios"]["flex"]) == RATIO_KEYS and out["ratios"]["flex"]["prefill_time_vs_naive_hd"] > 0
    assert [f["zoom"] for f in out["followup"]] == [1, 2] and out["followup_speedup"] > 0
    assert html.is_file() and "plotly" in html.read_text()[:100_000].lower()


def test_cli_bench_with_avl_alone(checkpoint, capsys):
    code = main(["bench", "--model", str(checkpoint), "--zoom", "2", "--modes", "lowres,flex", *FAST,
                 "--avl", "on", "--refresh-every", "2", "--json", "--html", ""])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["avl_variants"] == [True] and all(r["avl"] for r in out["runs"]) and out["main"]["avl"] is True
    assert out["avl_ratios"] is None and out["avl_comparison"] == []  # nothing without A-VL to compare with
    assert out["decode_steps"] == 6 and out["avl"]["refresh_every"] == 2
    assert all(r["avl_settings"]["refresh_every"] == 2 for r in out["runs"])


def test_cli_bench_prints_tables(checkpoint, capsys):
    code = main(["bench", "--model", str(checkpoint), "--zoom", "2", "--modes", "lowres,naive_hd", *FAST,
                 "--avl", "off", "--naive-max-zoom", "1", "--html", ""])
    assert code == 0
    text = capsys.readouterr().out
    naive = next(line for line in text.splitlines() if line.startswith("naive_hd"))
    assert "(not measured: --naive-max-zoom)" in naive
    assert "flex_flops_vs_naive_hd" in text and "not measured" in text  # no flex row: its targets are not measured


def test_cli_bench_without_the_embedded_model_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench_models, "EMBEDDED_MODEL", tmp_path / "flexattn-tiny")
    assert main(["bench", "--model", "embedded", "--html", ""]) == 2
    err = capsys.readouterr().err
    assert "embedded model is not there yet" in err and "--model 7b-shaped" in err


@pytest.mark.parametrize("argv", [["--zoom", "0"], ["--zoom", "a,b"], ["--modes", "lowres,fast"],
                                  ["--depth-divisor", "3"], ["--planted-share", "2"], ["--planted-center", "0.5"],
                                  ["--repeats", "0"], ["--avl-repeats", "0"],
                                  ["--refresh-every", "0"], ["--vision-evict-rate", "1.5"]])
def test_cli_bench_rejects_bad_options(argv, capsys):
    assert main(["bench", "--html", "", *argv]) == 2  # before building any model
    assert capsys.readouterr().err.startswith("error:")
