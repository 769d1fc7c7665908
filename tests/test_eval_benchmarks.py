"""The papers' benchmarks end to end: scoring around the model on hand-computed cases, the CLI on each published
layout, a resumed --out file, two processes over gloo, and the HTML report."""

import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flexattn import cli
from flexattn.benchmarks import load_benchmark
from flexattn.evaluate import evaluate_synthetic, last_attended_mask, mask_recall
from flexattn.evaluate_benchmarks import SHORT_ANSWER, run_benchmark
from flexattn.image import ImageProcessor, boxes_cells, load_image
from flexattn.loading import LoadedModel
from flexattn.pipeline import FlexVLM
from flexattn.scoring import MULTIPLE_CHOICE_SUFFIX
from flexattn.settings import FlexSettings
from flexattn.synthetic import build_tokenizer

from .bench_fixtures import write_magnifier_dataset, write_textvqa, write_vstar
from .conftest import make_model, write_transformers_checkpoint


@pytest.fixture(scope="module")
def vlm():
    tokenizer = build_tokenizer()
    model = make_model(seed=13, num_layers=4, selection_layer=1, lowres_size=56, threshold=120, pool_size=4,
                       vocab_size=len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    return FlexVLM(LoadedModel(model, tokenizer, ImageProcessor(), "tiny-bench", "transformers", False))


@pytest.fixture(scope="module")
def checkpoint(vlm, tmp_path_factory):
    return write_transformers_checkpoint(vlm, tmp_path_factory.mktemp("bench") / "tiny")


class ScriptedVLM:
    """Replies from a script, so the scoring around the model can be checked against values computed by hand."""

    name = "scripted"
    settings = FlexSettings()

    def __init__(self, reply):
        self.reply = reply

    def forget_images(self):
        pass

    def answer(self, image, question, mode, **options):
        stats = SimpleNamespace(hr_share=0.25 if mode != "lowres" else 0.0, tflops=1.0)
        return SimpleNamespace(text=self.reply(question, mode), stats=stats, trace=None)


def test_vstar_option_scoring_and_selection_against_target_boxes(vlm, tmp_path):
    items = load_benchmark("vstar", write_vstar(tmp_path))
    summary, rows = run_benchmark(vlm, "vstar", items, modes=("lowres", "flex", "select_all"),
                                  progress=False)
    json.dumps(summary)
    assert summary["n"] == 4 and set(summary["modes"]) == {"lowres", "flex", "select_all"}
    for block in summary["modes"].values():
        assert block["accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0) and block["tflops"] > 0
        assert set(block["subsets"]) == {"direct_attributes", "relative_position"}
    assert summary["modes"]["lowres"]["selection_recall"] is None and summary["modes"]["lowres"]["hr_share"] == 0
    assert summary["modes"]["select_all"]["selection_recall"] == 1.0 and summary["modes"]["select_all"]["hr_share"] == 1
    flex = summary["modes"]["flex"]
    assert 0 < flex["hr_share"] < 1 and 0 <= flex["selection_recall"] <= 1
    for item, row in zip(items, rows):
        result = row["runs"]["flex"]
        assert result["correct"] == float(result["chosen"] == 0) and len(result["losses"]) == 4
        # recall: the first answer token's last-layer mask against the item's own boxes (both for two targets)
        image = load_image(item.image_source())
        first = vlm.answer(image, item.question + SHORT_ANSWER, mode="flex", max_new_tokens=1)
        mask = last_attended_mask(first.trace, 0)
        assert result["recall"] == mask_recall(mask, item.boxes, image.size)
        whole = mask_recall(mask, [(0, 0, *image.size)], image.size)  # every cell of the image
        assert whole == pytest.approx(mask[boxes_cells([(0, 0, *image.size)], image.size, len(mask))].mean())
    assert flex["selection_recall"] == pytest.approx(np.mean([r["runs"]["flex"]["recall"] for r in rows]))


def test_textvqa_accuracy_per_mode_on_hand_computed_answers(tmp_path):
    items = load_benchmark("textvqa", write_textvqa(tmp_path))
    replies = {"lowres": ["sign", "two", "pepsi"], "flex": ["Stop.", "5", "coke"]}
    by_question = {item.question: i for i, item in enumerate(items)}
    scripted = ScriptedVLM(lambda q, mode: replies[mode][by_question[q.split("\n")[0]]])
    summary, rows = run_benchmark(scripted, "textvqa", items, modes=("lowres", "flex"), progress=False)
    # lowres: "sign" 0; "two" -> "2", 3 of 10 humans: 0.9; "pepsi" 0.  flex: "stop" (6 of 10) 1; "5" (7) 1; 0.
    assert [r["runs"]["lowres"]["correct"] for r in rows] == pytest.approx([0, 0.9, 0])
    assert summary["modes"]["lowres"]["accuracy"] == pytest.approx(0.3)
    assert summary["modes"]["flex"]["accuracy"] == pytest.approx(2 / 3)
    assert summary["modes"]["flex"]["selection_recall"] is None  # TextVQA marks no target region
    assert summary["modes"]["flex"]["hr_share"] == 0.25


def test_magnifierbench_letters_and_freeform_on_hand_computed_answers(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    items = load_benchmark("magnifierbench", write_magnifier_dataset(tmp_path / "saved"))

    def reply(question, mode):
        first = question.startswith("What colour")
        if question.endswith(MULTIPLE_CHOICE_SUFFIX):  # m0's answer is A, m1's is B
            return "The answer is A" if first else "A"
        return "it is red" if first else "yes"  # free form: m0 right (red), m1 wrong (no)

    summary, rows = run_benchmark(ScriptedVLM(reply), "magnifierbench", items, modes=("flex",), progress=False)
    assert [r["runs"]["flex"]["letter"] for r in rows] == ["A", "A"]
    assert summary["modes"]["flex"]["accuracy"] == 0.5 and summary["modes"]["flex"]["freeform_match"] == 0.5


def run_cli(capsys, *args) -> dict:
    assert cli.main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_runs_each_benchmark_layout(checkpoint, tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    common = ("--model", str(checkpoint), "--modes", "flex", "--max-new-tokens", "2", "--json")
    textvqa = run_cli(capsys, "eval", "--bench", "textvqa", "--data-dir", str(write_textvqa(tmp_path / "tv")), *common)
    assert textvqa["bench"] == "textvqa" and textvqa["n"] == 3
    assert 0 <= textvqa["modes"]["flex"]["accuracy"] <= 1 and textvqa["modes"]["flex"]["tflops"] > 0
    magnifier = run_cli(capsys, "eval", "--bench", "magnifierbench", "--data-dir",
                        str(write_magnifier_dataset(tmp_path / "mb")), *common)
    assert magnifier["n"] == 2 and 0 <= magnifier["modes"]["flex"]["freeform_match"] <= 1
    vstar = run_cli(capsys, "eval", "--bench", "vstar", "--vstar-dir", str(write_vstar(tmp_path / "vs")), "--limit",
                    "2", *common)  # the old option name still works
    assert vstar["n"] == 2 and 0 <= vstar["modes"]["flex"]["selection_recall"] <= 1
    assert 0 < vstar["modes"]["flex"]["hr_share"] < 1
    assert cli.main(["eval", "--bench", "textvqa", "--data-dir", str(tmp_path / "none"), *common]) == 2
    assert "could not open" in capsys.readouterr().err


def test_interrupted_out_file_resumes_to_the_uninterrupted_result(vlm, tmp_path, monkeypatch):
    options = dict(bench="synthetic", n=4, modes=("flex",), shifted=False, max_new_tokens=2, progress=False)
    whole = evaluate_synthetic(vlm, **options)
    out = tmp_path / "results.jsonl"
    answer, calls = vlm.answer, []

    def interrupted(*args, **kwargs):  # the 3rd answer never comes: samples 0 and 1 are done
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return answer(*args, **kwargs)

    monkeypatch.setattr(vlm, "answer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_synthetic(vlm, out=out, **options)
    lines = out.read_text().splitlines()
    assert len(lines) == 3 and [json.loads(line)["key"] for line in lines[1:]] == ["10000000", "10000001"]
    with out.open("a") as f:
        f.write('{"key": "10000002", "res')  # a line the interruption cut short
    calls.clear()
    monkeypatch.setattr(vlm, "answer", lambda *a, **k: (calls.append(1), answer(*a, **k))[1])
    assert evaluate_synthetic(vlm, out=out, **options) == whole
    assert len(calls) == 2  # only samples 2 and 3 were answered again
    assert len(out.read_text().splitlines()) == 5
    with pytest.raises(ValueError, match="another run"):
        evaluate_synthetic(vlm, out=out, **{**options, "max_new_tokens": 3})


def test_two_processes_print_what_one_prints(checkpoint, tmp_path, capsys):
    """torchrun, two processes over gloo on the CPU: the same stdout as one process, byte for byte."""
    args = ["eval", "--model", str(checkpoint), "--bench", "synthetic", "-n", "6", "--modes", "lowres,flex",
            "--max-new-tokens", "3", "--json"]
    assert cli.main(args) == 0
    one = capsys.readouterr()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "flexattn",
                          *args, "--out", str(tmp_path / "two.jsonl")], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-2000:]
    assert "(2 processes)" in two.stderr and "processes)" not in one.err
    assert two.stdout == one.out and json.loads(one.out)["n"] == 6
    assert len((tmp_path / "two.jsonl").read_text().splitlines()) == 1 + 6  # the main process wrote every sample


def test_report_draws_the_worst_items_over_their_images(checkpoint, tmp_path, capsys):
    report = tmp_path / "report.html"
    summary = run_cli(capsys, "eval", "--bench", "vstar", "--data-dir", str(write_vstar(tmp_path / "vs")), "--model",
                      str(checkpoint), "--modes", "lowres,flex", "--report", str(report), "--report-items", "1",
                      "--json")
    page = report.read_text()
    assert page.count("plotly.js v") == 1  # the library inlined once: the page works offline
    figures = re.findall(r"Plotly\.newPlot\(\s*\"([\w-]+)\",\s*(\[.*?\]),\s*\{", page, re.S)
    # the summary chart, then one lowest-recall item and one wrong answer (or just one if they are the same)
    assert 2 <= len(figures) <= 3
    assert "selection recall" in page and "direct_attributes" in page
    drawn = json.loads(figures[1][1])
    assert [t["type"] for t in drawn] == ["image", "heatmap", "image", "heatmap"]  # LR attention, then selection
    assert f"{summary['modes']['flex']['selection_recall']:.3f}" in page
