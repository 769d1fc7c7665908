"""Evaluation: the definitions of selection recall, the synthetic high-res benchmarks and the results table.

Per mode and family: accuracy (exact match), `hr_share` (mean share of HR tokens each HR-attending layer saw),
`selection_recall` (share of the target's HR tokens inside the answering token's mask at the last layer that
attends to HR), mean TFLOPs; for `flex`, `shifted_mask_accuracy` with every mask rolled by a third of the HR grid.
The papers' benchmarks (V* Bench, TextVQA, MagnifierBench) run in `flexattn.evaluate_benchmarks`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .distributed import Processes, ResultsFile, run_items
from .image import boxes_cells
from .settings import MODES
from .synthetic import BENCHES, bench_split


def normalise(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def mask_recall(mask: np.ndarray | None, boxes, image_size: tuple[int, int]) -> float | None:
    """Share of the target's HR cells (every cell a box touches) that a (G, G) mask selected; None if undefined.

    The one definition of selection recall: the eval runner and the app both use it."""
    if mask is None or not boxes:
        return None
    cells = boxes_cells(boxes, image_size, mask.shape[0])
    total = int(cells.sum())
    return float((np.asarray(mask, dtype=bool) & cells).sum()) / total if total else None


def last_attended_mask(trace, token: int):
    """The mask the last layer attended with for `token` (computed by the layer before it)."""
    if token >= len(trace.passes):
        return None
    layers = trace.passes[token]
    return trace.used_mask(token, len(layers) - 1)


def selection_recall(sample, trace, image_size) -> float | None:
    """Mean over answer tokens of |token's target cells ∩ its mask| / |token's target cells|: each answer token
    against its own target (a multi answer's k-th letter against the k-th named shape; a left/right answer against
    both named shapes), with the mask the last layer attended with."""
    if trace is None or not trace.passes:
        return None
    recalls = []
    for token, boxes in enumerate(sample.token_boxes):
        recall = mask_recall(last_attended_mask(trace, token), boxes, image_size)
        if recall is not None:
            recalls.append(recall)
    return float(np.mean(recalls)) if recalls else None


@dataclass
class WorstItem:
    """An item a report shows: what was asked and answered, the target boxes, and where the answer's first token
    looked: the LR attention (g x g, summed over heads) of the layer that computed the last layer's HR mask, and
    that mask (G x G)."""

    key: str
    image: Image.Image
    question: str
    given: str
    truth: str
    result: dict  # the item's result in this mode ("correct", "recall", "hr_share", ...)
    boxes: list
    lr_attention: np.ndarray | None
    mask: np.ndarray | None

    @classmethod
    def from_trace(cls, key, image, question, given, truth, result, trace, boxes) -> "WorstItem":
        lr = mask = None
        if trace is not None and trace.passes:
            layers = trace.passes[0]
            mask = last_attended_mask(trace, 0)
            lr = layers[max(len(layers) - 2, 0)].lr_attention
        return cls(key, image, question, given, truth, result, list(boxes), lr, mask)


def pick_worst(rows: list[dict], mode: str, k: int) -> list[int]:
    """Indices of the k items with the lowest selection recall, then of the k lowest-scored wrong answers (by score,
    then recall), without repeats."""
    results = [(i, row["runs"][mode]) for i, row in enumerate(rows) if mode in row["runs"]]
    lowest = sorted((r["recall"], i) for i, r in results if r.get("recall") is not None)[:k]
    wrong = sorted((r["correct"], r["recall"] if r.get("recall") is not None else 1.0, i)
                   for i, r in results if r["correct"] < 1)[:k]
    return list(dict.fromkeys([i for *_, i in lowest] + [i for *_, i in wrong]))


def _summary(rows: list[dict]) -> dict:
    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    return {
        "n": len(rows),
        "accuracy": mean("correct"),
        "hr_share": mean("hr_share"),
        "selection_recall": mean("recall"),
        "tflops": mean("tflops"),
    }


def synthetic_runs(modes, shifted: bool, avl) -> list[tuple[str, str | None]]:
    """(mode, variant) pairs each sample is answered in: every mode, flex with shifted masks, every mode with A-VL."""
    runs = [(mode, None) for mode in modes]
    if shifted and "flex" in modes:
        runs.append(("flex", "shifted"))
    if avl is not None:
        runs += [(mode, "avl") for mode in modes]
    return runs


def run_name(mode: str, variant: str | None) -> str:
    return mode if variant is None else f"{mode}/{variant}"


def evaluate_synthetic(vlm, bench: str = "synthetic", n: int = 500, seed: int = 10_000_000, modes=MODES,
                       shifted: bool = True, max_new_tokens: int = 16, progress: bool = True, avl=None,
                       processes: Processes | None = None, out: str | Path | None = None) -> dict | None:
    """`run_synthetic`'s summary (see there)."""
    ran = run_synthetic(vlm, bench, n, seed, modes, shifted, max_new_tokens, progress, avl, processes, out)
    return ran[0] if ran is not None else None


def run_synthetic(vlm, bench: str = "synthetic", n: int = 500, seed: int = 10_000_000, modes=MODES,
                  shifted: bool = True, max_new_tokens: int = 16, progress: bool = True, avl=None,
                  processes: Processes | None = None,
                  out: str | Path | None = None) -> tuple[dict, list[dict]] | None:
    """Held-out synthetic samples (seeds from `seed` on) in each mode; see the module docstring for metrics.

    With `avl` (AVLSettings), each mode also runs with A-VL and its block gains `kv_ratio` (A-VL KV bytes / full
    cache KV bytes at the end of generation), `token_agreement` (share of the full cache's greedy tokens that A-VL
    reproduces position for position), `accuracy_drop` (full minus A-VL accuracy), `visual_attention_ratio`
    (visual tokens attended per decoding step / LR image tokens) and `avl_accuracy`.
    `processes` spreads the samples over launched processes; `out` streams per-sample results to a JSONL file and
    resumes from it. Returns (summary, per-sample results in sample order) on the main process, None on the others.
    """
    families = BENCHES[bench]
    samples = bench_split(bench, n, seed)
    runs = synthetic_runs(modes, shifted, avl)
    run = {"bench": bench, "model": vlm.name, "seed": seed, "modes": list(modes), "shifted": shifted,
           "max_new_tokens": max_new_tokens, "avl": avl.to_dict() if avl is not None else None,
           "flex_settings": vlm.settings.to_dict()}  # what a sample's result depends on (not n: samples keep seeds)

    def score(i: int) -> dict:
        sample = samples[i]
        vlm.forget_images()  # a sample's result must not depend on what this process answered before
        prepared = vlm.prepare(sample.image)
        G = prepared.hr_grid
        row = {"family": sample.family, "runs": {}}
        for mode, variant in runs:
            shift = (G // 3, G // 3) if variant == "shifted" else None
            answer = vlm.answer(prepared, sample.question, mode=mode, max_new_tokens=max_new_tokens,
                                shift_selection=shift, reuse_prefix=False, avl=avl if variant == "avl" else None)
            stats = answer.stats
            row["runs"][run_name(mode, variant)] = {
                "tokens": answer.token_ids,
                "kv_bytes": stats.kv_bytes,
                "visual_ratio": stats.avl.visual_attention_ratio if stats.avl is not None else None,
                "correct": float(normalise(answer.text) == normalise(sample.answer)),
                "hr_share": stats.hr_share if mode != "lowres" else 0.0,
                "recall": selection_recall(sample, answer.trace, sample.image.size) if mode != "lowres" else None,
                "tflops": stats.tflops,
            }
        return row

    rows = run_items([str(s.seed) for s in samples], score, processes, ResultsFile(out, run) if out else None,
                     desc=f"eval {bench}", progress=progress)
    if rows is None:
        return None
    per_run = {run_name(*r): [{**row["runs"][run_name(*r)], "family": row["family"]} for row in rows] for r in runs}
    out = {"model": vlm.name, "bench": bench, "n": n, "seed": seed, "flex_settings": vlm.settings.to_dict(),
           "modes": {}}
    for mode in modes:
        block = _summary(per_run[mode])
        block["families"] = {f: _summary([r for r in per_run[mode] if r["family"] == f]) for f in families}
        if f"{mode}/shifted" in per_run:
            block["shifted_mask_accuracy"] = _summary(per_run[f"{mode}/shifted"])["accuracy"]
        if f"{mode}/avl" in per_run:
            block.update(_avl_comparison(per_run[mode], per_run[f"{mode}/avl"]))
        out["modes"][mode] = block
    if avl is not None:
        out["avl"] = avl.to_dict()
    return out, rows


def synthetic_worst(vlm, bench: str, seed: int, rows: list[dict], mode: str = "flex", k: int = 4,
                    max_new_tokens: int = 16) -> list[WorstItem]:
    """The samples with the lowest recall and the wrong answers in `mode`, answered again for their traces."""
    worst = []
    samples = bench_split(bench, len(rows), seed)
    for i in pick_worst(rows, mode, k):
        sample = samples[i]
        answer = vlm.answer(sample.image, sample.question, mode=mode, max_new_tokens=max_new_tokens,
                            reuse_prefix=False)
        worst.append(WorstItem.from_trace(str(sample.seed), sample.image, sample.question, answer.text, sample.answer,
                                          rows[i]["runs"][mode], answer.trace, sample.token_boxes[0]))
    return worst


def _avl_comparison(full: list[dict], avl: list[dict]) -> dict:
    agreement = [
        sum(a == b for a, b in zip(f["tokens"], v["tokens"])) / max(len(f["tokens"]), 1) for f, v in zip(full, avl)
    ]
    full_acc, avl_acc = np.mean([r["correct"] for r in full]), np.mean([r["correct"] for r in avl])
    return {
        "avl_accuracy": float(avl_acc),
        "kv_ratio": float(np.mean([v["kv_bytes"] / f["kv_bytes"] for f, v in zip(full, avl)])),
        "token_agreement": float(np.mean(agreement)),
        "accuracy_drop": float(full_acc - avl_acc),
        "visual_attention_ratio": float(np.mean([v["visual_ratio"] for v in avl])),
    }


def format_table(result: dict) -> str:
    """The result of any benchmark as a text table: one row per mode and family (synthetic) or subset (V*)."""
    flex = result.get("flex_settings", {})
    lines = [f"{result['bench']}  model={result['model']}  n={result['n']}  threshold={flex.get('threshold')}  "
             f"pool={flex.get('pool_size')}"]
    groups = [k for block in result["modes"].values() for k in (*block.get("families", {}), *block.get("subsets", {}))]
    w = max([11, *(len(k) + 2 for k in groups)])
    group = "subset" if any("subsets" in block for block in result["modes"].values()) else "family"
    lines.append(f"{'mode':<11}{group:<{w}}{'accuracy':>9}{'hr_share':>10}{'recall':>8}{'TFLOPs':>11}")

    def fmt(value, spec):
        width = int(spec.split(".")[0])
        return format(value, spec) if value is not None else "-".rjust(width)

    for mode, block in result["modes"].items():
        rows = [("all", block), *block.get("families", {}).items(), *block.get("subsets", {}).items()]
        for family, b in rows:
            lines.append(f"{mode:<11}{family:<{w}}{fmt(b.get('accuracy'), '9.3f')}{fmt(b.get('hr_share'), '10.3f')}"
                         f"{fmt(b.get('selection_recall'), '8.3f')}{fmt(b.get('tflops'), '11.2e')}")
        if "shifted_mask_accuracy" in block:
            lines.append(f"{mode:<11}{'shifted':<{w}}{block['shifted_mask_accuracy']:9.3f}   "
                         "(every mask rolled by G/3)")
        if block.get("freeform_match") is not None:
            lines.append(f"{mode:<11}{'free-form':<{w}}{block['freeform_match']:9.3f}   (correct option's text in the "
                         "answer; the paper asks GPT-4)")
        if "kv_ratio" in block:
            lines.append(f"{mode:<11}{'A-VL':<{w}}{block['avl_accuracy']:9.3f}   kv_ratio {block['kv_ratio']:.3f}  "
                         f"token_agreement {block['token_agreement']:.3f}  "
                         f"accuracy_drop {block['accuracy_drop']:+.3f}  "
                         f"visual_attention_ratio {block['visual_attention_ratio']:.3f}")
    return "\n".join(lines)
