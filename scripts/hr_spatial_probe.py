#!/usr/bin/env python
"""Can the HR path answer left/right when left of is also earlier in token order? (TRAINING.md item 26)

An HR token's only image-wide position is its rotary table, interpolated from the LR tokens' raster positions
(row x 8 + column): rows are easy to read from it, columns are not (item 19). When the two letters of "is the k
left or right of the p ?" sit on the same HR row, left of is the same as earlier in raster order, which a slowly
turning rotary frequency does carry. This script tunes a FlexAttention checkpoint (default: the shipped one) on
such questions (train_embedded's "spatial_row" kind) mixed with the refinement's attribute and control questions,
with the stage-4 losses (attention 0.5, reading 1.0), and reports held-out exact match (teacher-forced) on:

  row    left/right of two letters on the same HR row,
  other  left/right of two letters on different rows (the generator's spatial family),
  attribute   the generator's attribute questions (so a gain is not paid for with the rest),

in flex, planted (each row's target as its mask) and lowres.

  --among 2        selection targets (planted masks, attention loss) are the two named shapes only, the easiest
                   setting; 0 targets every shape, as the recipe does for questions that name a letter
  --modes planted  every batch planted; "mixed": half flex, half planted, as in stage 4

  python scripts/hr_spatial_probe.py --among 2 --modes planted --steps 3000
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_embedded as te  # noqa: E402

from flexattn.loading import load  # noqa: E402
from flexattn.synthetic import HR_SIZE, build_tokenizer  # noqa: E402
from flexattn.training import target_masks, teacher_forced  # noqa: E402

MODES = {"planted": {"planted": 1.0}, "mixed": {"flex": 0.5, "planted": 0.5}}


def same_row(question: te.Question) -> bool:
    """Whether a left/right question's two glyphs (its reads) share an HR row."""
    (a, b), = question.reads
    return a[1] == b[1]


def heldout_sets(metas, among: int | None, n: int = 300, seed: int = 123) -> dict[str, list]:
    """(image index, Question) lists, at most one question per image and kind, from the held-out images in order."""
    rng = random.Random(seed)
    sets: dict[str, list] = {"row": [], "other": [], "attribute": []}
    for i, meta in enumerate(metas):
        row = te.make_question(meta, "spatial_row", rng, among)
        if row is not None:
            sets["row"].append((i, row))
        other = te.make_question(meta, "spatial", rng, among)
        if other is not None and not same_row(other):
            sets["other"].append((i, other))
        if meta["family"] == "attribute":
            sets["attribute"].append((i, te.own_question(meta)))
    return {k: v[:n] for k, v in sets.items()}


@torch.no_grad()
def accuracy(model, tokenizer, cache, items, mode: str, batch_size: int = 50) -> float:
    model.eval()
    right = 0
    for j in range(0, len(items), batch_size):
        chunk = items[j:j + batch_size]
        idx = [i for i, _ in chunk]
        batch = te.make_batch(tokenizer, [q for _, q in chunk])
        lr = te.project(model, cache["lr"][idx])
        hr = te.project(model, cache["hr"][idx]) if mode != "lowres" else None
        planted = target_masks(batch, te.ZOOM) if mode == "planted" else None
        logits, _ = teacher_forced(model, batch, lr, hr, model.flex_settings, [(HR_SIZE, HR_SIZE)] * len(idx),
                                   "flex" if mode == "planted" else mode, planted_selection=planted)
        right += int(te.exact_match(logits, batch.labels).sum())
    return right / max(len(items), 1)


def run(args) -> None:
    among = args.among or None
    tokenizer = build_tokenizer()
    model = load(args.model, device="cpu", dtype=torch.float32).model
    torch.set_num_threads(args.threads)
    te._seed_all(args.seed)
    params = te.trainable_params(model)
    train, held = te._load_cache(Path(args.cache) / "train.pt"), te._load_cache(Path(args.cache) / "heldout.pt")
    sets = heldout_sets(held["meta"], among)

    def report() -> str:
        parts = []
        for kind, items in sets.items():
            modes = ("flex",) if kind == "attribute" else ("flex", "planted", "lowres")
            scores = " ".join(f"{m} {100 * accuracy(model, tokenizer, held, items, m):.1f}" for m in modes)
            parts.append(f"{kind} ({len(items)}) {scores}")
        model.train()
        return " | ".join(parts)

    print(f"among {args.among} / modes {args.modes} / row share {args.share}: before: {report()}", flush=True)
    rest = 1 - args.share  # the refinement's other kinds, in its proportions (reading and spatial left out)
    others = {"colour_of": 0.35, "letter_of": 0.25, "ctl_colour": 0.1, "ctl_shape": 0.1}
    mix = {"spatial_row": args.share, **{k: rest * v / sum(others.values()) for k, v in others.items()}}
    phase = te.Phase(args.steps, mix, MODES[args.modes], aux_weight=0.5, read_weight=1.0, find_among=among)
    done, secs = te.train_loop(model, tokenizer, train, stage="hr spatial", phases=[phase], batch_size=args.batch_size,
                               lr=args.lr, seed=args.seed, max_minutes=None, params=params, eval_fn=report,
                               eval_every=args.eval_every)
    print(f"after {done} steps ({secs / 60:.1f} min): {report()}", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="assets/flexattn-tiny", help="a FlexAttention checkpoint (stage 3 or 4)")
    p.add_argument("--cache", default="build/stage2_cache", help="train_embedded.py's feature cache")
    p.add_argument("--among", type=int, default=2, help="shapes in a question's selection target; 0: every shape")
    p.add_argument("--modes", choices=tuple(MODES), default="planted")
    p.add_argument("--share", type=float, default=0.6, help="share of same-row left/right questions in the mix")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
