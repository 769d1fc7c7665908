"""The papers' benchmarks (V* Bench, TextVQA, MagnifierBench), scored as their authors score them, per mode.

* V* Bench: multiple choice by option likelihood, as V*'s and FlexAttention's evaluations do: the option with the
  lowest mean cross-entropy as the answer wins; the correct option is listed first. Selection against V*'s target
  boxes: `selection_recall` (share of the target objects' HR cells in the mask the last layer attended with) and
  `hr_share` are taken at the row that predicts the answer's first token. That row sees the image and the question
  and nothing of any option, so it is the same row in every option's scoring pass and in a greedy generation's
  prefill; it is recorded by a one-token generation (that prefill) with the trace the synthetic benchmark reads.
  `tflops` is that prefill's cost (vision included): the cost of reading the question.
* TextVQA: a greedy answer to the question and "Answer the question using a single word or phrase." (FlexAttention's
  prompt), scored by VQA accuracy (`flexattn.scoring.vqa_accuracy`, per item in "correct").
* MagnifierBench: a greedy answer to the options prompt; its letter (`flexattn.scoring.option_letter`) against the
  answer gives `accuracy`. A second greedy answer to the question alone is the free-form answer; the paper has GPT-4
  judge it, here `freeform_match` counts answers that contain the correct option's text.

TextVQA and MagnifierBench mark no target region, so their selection recall is not defined (null).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .attention import FlexHooks
from .benchmarks import Item
from .distributed import Processes, ResultsFile, run_items
from .evaluate import WorstItem, _summary, last_attended_mask, mask_recall, pick_worst
from .image import ImageError, load_image
from .prompt import conversation, tokenize_around_image
from .scoring import freeform_match, multiple_choice_prompt, option_letter, split_instruction, vqa_accuracy

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


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


# ---- one item in one mode -----------------------------------------------------------------------------------------
# Each returns the item's result (JSON-able; "correct" is its score in [0, 1]) and the Answer whose first token's
# trace it read. Prompt-prefix reuse stays off: a result must not depend on which item a process scored before.
# V* asks its one-token answer first, so its cost is counted with no HR keys/values cached by the option passes.

def _score_vstar(vlm, item: Item, image, mode: str, max_new_tokens: int):
    prepared = vlm.prepare(image, highres=mode != "lowres")
    question = item.question + SHORT_ANSWER
    first = vlm.answer(prepared, question, mode=mode, max_new_tokens=1, reuse_prefix=False)
    losses = [option_loss(vlm, prepared, question, option, mode) for option in item.options]
    chosen = int(np.argmin(losses))
    hr = mode != "lowres"
    return {
        "chosen": chosen,
        "losses": losses,
        "correct": float(chosen == 0),
        "hr_share": first.stats.hr_share if hr else 0.0,
        "recall": mask_recall(last_attended_mask(first.trace, 0), item.boxes, image.size) if hr else None,
        "tflops": first.stats.tflops,
    }, first


def _score_textvqa(vlm, item: Item, image, mode: str, max_new_tokens: int):
    answer = vlm.answer(image, item.question + SHORT_ANSWER, mode=mode, max_new_tokens=max_new_tokens,
                        reuse_prefix=False, trace=1)
    return {
        "answer": answer.text,
        "correct": vqa_accuracy(answer.text, item.answers),
        "hr_share": answer.stats.hr_share if mode != "lowres" else 0.0,
        "recall": None,
        "tflops": answer.stats.tflops,
    }, answer


def _score_magnifier(vlm, item: Item, image, mode: str, max_new_tokens: int):
    truth = item.answers[0]
    answer = vlm.answer(image, multiple_choice_prompt(item.question), mode=mode, max_new_tokens=max_new_tokens,
                        reuse_prefix=False, trace=1)
    letter = option_letter(answer.text, item.options)
    question, _ = split_instruction(item.question)
    freeform = vlm.answer(image, question, mode=mode, max_new_tokens=max_new_tokens, reuse_prefix=False, trace=False)
    return {
        "answer": answer.text,
        "letter": letter,
        "correct": float(letter == truth),
        "freeform_answer": freeform.text,
        "freeform_match": float(freeform_match(freeform.text, item.options[truth])),
        "hr_share": answer.stats.hr_share if mode != "lowres" else 0.0,
        "recall": None,
        "tflops": answer.stats.tflops,
    }, answer


SCORERS = {"vstar": _score_vstar, "textvqa": _score_textvqa, "magnifierbench": _score_magnifier}


# ---- a whole benchmark --------------------------------------------------------------------------------------------

def run_benchmark(vlm, bench: str, items: list[Item], modes=("lowres", "flex"), max_new_tokens: int = 16,
                  progress: bool = True, processes: Processes | None = None,
                  out: str | Path | None = None) -> tuple[dict, list[dict]] | None:
    """Every item in every mode, over `processes`, streamed to `out` (JSONL, resumed if it exists).

    Returns (summary, per-item results in item order) on the main process, None on the others."""
    score = SCORERS[bench]
    run = {"bench": bench, "model": vlm.name, "modes": list(modes), "max_new_tokens": max_new_tokens,
           "flex_settings": vlm.settings.to_dict()}  # what an item's result depends on

    def compute(i: int) -> dict:
        item = items[i]
        try:
            image = load_image(item.image_source())
        except ImageError as err:  # say which question's image
            raise ImageError(f"{bench} {item.key}: {err}") from None
        runs = {}
        for mode in modes:
            vlm.forget_images()  # each (item, mode) as if alone: the same result in any process, in any order
            runs[mode] = score(vlm, item, image, mode, max_new_tokens)[0]
        return {"subset": item.subset, "runs": runs}

    rows = run_items([item.key for item in items], compute, processes, ResultsFile(out, run) if out else None,
                     desc=f"eval {bench}", progress=progress)
    if rows is None:
        return None
    summary = {"model": vlm.name, "bench": bench, "n": len(items), "flex_settings": vlm.settings.to_dict(),
               "modes": {}}
    for mode in modes:
        results = [row["runs"][mode] for row in rows]
        block = _summary(results)
        if bench == "vstar":
            by_subset = defaultdict(list)
            for row, result in zip(rows, results):
                by_subset[row["subset"]].append(result)
            block["subsets"] = {subset: _summary(group) for subset, group in by_subset.items()}
        if bench == "magnifierbench":
            block["freeform_match"] = float(np.mean([r["freeform_match"] for r in results]))
        summary["modes"][mode] = block
    return summary, rows


def evaluate_benchmark(vlm, bench: str, items: list[Item], **options) -> dict | None:
    """`run_benchmark`'s summary (see there)."""
    ran = run_benchmark(vlm, bench, items, **options)
    return ran[0] if ran is not None else None


def worst_items(vlm, bench: str, items: list[Item], rows: list[dict], mode: str = "flex", k: int = 4,
                max_new_tokens: int = 16) -> list[WorstItem]:
    """The items with the lowest recall and the wrong answers in `mode`, scored again for their traces."""
    worst = []
    for i in pick_worst(rows, mode, k):
        item = items[i]
        image = load_image(item.image_source())
        vlm.forget_images()
        result, answer = SCORERS[bench](vlm, item, image, mode, max_new_tokens)
        given = item.options[result["chosen"]] if bench == "vstar" else result["answer"]
        worst.append(WorstItem.from_trace(item.key, image, item.question, given, _truth(bench, item), result,
                                          answer.trace, item.boxes))
    return worst


def _truth(bench: str, item: Item) -> str:
    if bench == "vstar":
        return item.options[0]
    if bench == "textvqa":
        return " | ".join(dict.fromkeys(item.answers))  # the distinct human answers
    return f"{item.answers[0]}. {item.options[item.answers[0]]}"
