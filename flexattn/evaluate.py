"""Evaluation: the synthetic high-res benchmarks, and V* Bench read from a local directory.

Per mode and family: accuracy (exact match), `hr_share` (mean share of HR tokens each HR-attending layer saw),
`selection_recall` (share of the target's HR tokens inside the answering token's mask at the last layer that
attends to HR), mean TFLOPs; for `flex`, `shifted_mask_accuracy` with every mask rolled by a third of the HR grid.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .attention import FlexHooks
from .image import boxes_cells
from .prompt import conversation, tokenize_around_image
from .settings import MODES
from .synthetic import BENCHES, bench_split
VSTAR_SUFFIX = "\nAnswer the question using a single word or phrase."


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


def evaluate_synthetic(vlm, bench: str = "synthetic", n: int = 500, seed: int = 10_000_000, modes=MODES,
                       shifted: bool = True, max_new_tokens: int = 16, progress: bool = True, avl=None) -> dict:
    """Held-out synthetic samples (seeds from `seed` on) in each mode; see the module docstring for metrics.

    With `avl` (AVLSettings), each mode also runs with A-VL and its block gains `kv_ratio` (A-VL KV bytes / full
    cache KV bytes at the end of generation), `token_agreement` (share of the full cache's greedy tokens that A-VL
    reproduces position for position), `accuracy_drop` (full minus A-VL accuracy), `visual_attention_ratio`
    (visual tokens attended per decoding step / LR image tokens) and `avl_accuracy`.
    """
    families = BENCHES[bench]
    samples = bench_split(bench, n, seed)
    runs = [(mode, None) for mode in modes]
    if shifted and "flex" in modes:
        runs.append(("flex", "shifted"))
    if avl is not None:
        runs += [(mode, "avl") for mode in modes]
    per_run: dict[tuple, list[dict]] = defaultdict(list)
    bar = tqdm(total=len(samples) * len(runs), desc=f"eval {bench}", disable=not progress)
    for sample in samples:
        prepared = vlm.prepare(sample.image)
        G = prepared.hr_grid
        for mode, variant in runs:
            shift = (G // 3, G // 3) if variant == "shifted" else None
            answer = vlm.answer(prepared, sample.question, mode=mode, max_new_tokens=max_new_tokens,
                                shift_selection=shift, reuse_prefix=False, avl=avl if variant == "avl" else None)
            stats = answer.stats
            per_run[(mode, variant)].append({
                "tokens": answer.token_ids,
                "kv_bytes": stats.kv_bytes,
                "visual_ratio": stats.avl.visual_attention_ratio if stats.avl is not None else None,
                "family": sample.family,
                "correct": float(normalise(answer.text) == normalise(sample.answer)),
                "hr_share": stats.hr_share if mode != "lowres" else 0.0,
                "recall": selection_recall(sample, answer.trace, sample.image.size) if mode != "lowres" else None,
                "tflops": stats.tflops,
            })
            bar.update()
    bar.close()
    out = {"model": vlm.name, "bench": bench, "n": n, "seed": seed, "flex_settings": vlm.settings.to_dict(),
           "modes": {}}
    for mode in modes:
        rows = per_run[(mode, None)]
        block = _summary(rows)
        block["families"] = {f: _summary([r for r in rows if r["family"] == f]) for f in families}
        if (mode, "shifted") in per_run:
            block["shifted_mask_accuracy"] = _summary(per_run[(mode, "shifted")])["accuracy"]
        if (mode, "avl") in per_run:
            block.update(_avl_comparison(rows, per_run[(mode, "avl")]))
        out["modes"][mode] = block
    if avl is not None:
        out["avl"] = avl.to_dict()
    return out


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


# ---- V* Bench ---------------------------------------------------------------------------------------------------

def load_vstar(root: str | Path, subsets=("direct_attributes", "relative_position")) -> list[dict]:
    """V* Bench in its published layout: <root>/<subset>/<id>.json ({"question", "options", ...}) beside the
    image <id>.jpg|png|...; the first option is the correct one."""
    root = Path(root)
    items = []
    for subset in subsets:
        for annotation in sorted((root / subset).glob("*.json")):
            data = json.loads(annotation.read_text())
            image = next((p for p in annotation.parent.glob(annotation.stem + ".*") if p.suffix != ".json"), None)
            if image is None:
                raise FileNotFoundError(f"no image beside {annotation}")
            items.append({"subset": subset, "id": annotation.stem, "image": image, "question": data["question"],
                          "options": list(data["options"])})
    if not items:
        raise FileNotFoundError(f"no V* Bench annotations under {root} (expected {subsets[0]}/*.json)")
    return items


@torch.no_grad()
def option_loss(vlm, prepared, question: str, option: str, mode: str) -> float:
    """Mean cross-entropy of `option` as the answer. As in the released evaluation, the option is scored with
    teacher forcing where every row predicting an option token sees HR with its own selection."""
    before, prompt_after = tokenize_around_image(vlm.tokenizer, conversation(question))
    _, full_after = tokenize_around_image(vlm.tokenizer, conversation(question) + " " + option)
    if full_after[: len(prompt_after)] != prompt_after:  # tokenisation merged across the boundary: keep the joint ids
        prompt_after = full_after[: len(prompt_after) - 1]
    option_ids = full_after[len(prompt_after) :]
    embeds = vlm._embed(prepared, before, full_after)
    start = len(before)
    prompt_len = embeds.shape[1] - len(option_ids)
    rows = torch.arange(prompt_len - 1, embeds.shape[1] - 1, device=vlm.device)[None]
    state = vlm.flex_state(prepared, mode, vlm.settings, start, hooks=FlexHooks(rows=rows))
    logits = vlm.model(inputs_embeds=embeds, flex_state=state).logits[0, prompt_len - 1 : -1]
    target = torch.tensor(option_ids, device=logits.device)
    return float(F.cross_entropy(logits.float(), target))


def evaluate_vstar(vlm, root, modes=("lowres", "flex"), progress: bool = True) -> dict:
    items = load_vstar(root)
    out = {"model": vlm.name, "bench": "vstar", "n": len(items), "flex_settings": vlm.settings.to_dict(),
           "modes": {}}
    for mode in modes:
        per_subset = defaultdict(list)
        for item in tqdm(items, desc=f"V* {mode}", disable=not progress):
            prepared = vlm.prepare(item["image"], highres=mode != "lowres")
            question = item["question"] + VSTAR_SUFFIX
            losses = [option_loss(vlm, prepared, question, o, mode) for o in item["options"]]
            per_subset[item["subset"]].append(float(int(np.argmin(losses)) == 0))
        allrows = [c for rows in per_subset.values() for c in rows]
        out["modes"][mode] = {"accuracy": float(np.mean(allrows)),
                              "subsets": {k: float(np.mean(v)) for k, v in per_subset.items()}}
    return out


def format_table(result: dict) -> str:
    flex = result.get("flex_settings", {})
    lines = [f"{result['bench']}  model={result['model']}  n={result['n']}  threshold={flex.get('threshold')}  "
             f"pool={flex.get('pool_size')}"]
    header = f"{'mode':<11}{'family':<11}{'accuracy':>9}{'hr_share':>10}{'recall':>8}{'TFLOPs':>11}"
    lines.append(header)
    def fmt(value, spec):
        width = int(spec.split(".")[0])
        return format(value, spec) if value is not None else "-".rjust(width)

    for mode, block in result["modes"].items():
        rows = [("all", block)] + list(block.get("families", {}).items())
        if "subsets" in block:
            rows = [("all", block)] + [(k, {"accuracy": v}) for k, v in block["subsets"].items()]
        for family, b in rows:
            lines.append(f"{mode:<11}{family:<11}{fmt(b.get('accuracy'), '9.3f')}{fmt(b.get('hr_share'), '10.3f')}"
                         f"{fmt(b.get('selection_recall'), '8.3f')}{fmt(b.get('tflops'), '11.2e')}")
        if "shifted_mask_accuracy" in block:
            lines.append(f"{mode:<11}{'shifted':<11}{block['shifted_mask_accuracy']:9.3f}   (every mask rolled by G/3)")
        if "kv_ratio" in block:
            lines.append(f"{mode:<11}{'A-VL':<11}{block['avl_accuracy']:9.3f}   kv_ratio {block['kv_ratio']:.3f}  "
                         f"token_agreement {block['token_agreement']:.3f}  accuracy_drop {block['accuracy_drop']:+.3f}  "
                         f"visual_attention_ratio {block['visual_attention_ratio']:.3f}")
    return "\n".join(lines)
