#!/usr/bin/env python
"""What the embedded LLM needs to answer left/right at low resolution (assets/flexattn-tiny/TRAINING.md item 25).

Starts from an aligned checkpoint (stage 2b of train_embedded.py) and its cached LR tower features, and tunes the
projector and the LLM in lowres mode on one left/right question kind (80 % of each batch) plus colour controls
(20 %), with two things switched on or off:

  --code      a fixed position code added to every projected LR token: "ordered" puts the column and the row
              as scalars along two fixed directions (left < right is then linear); "random" gives each column and
              each row its own random vector; "none" leaves the tokens as the tower made them.
  --attention an attention loss on the answering row's head-summed LR attention (-log of its share on the
              target, as flexattn.training.attention_loss): "both" pulls every selecting layer onto the named
              shape(s); "split" pulls the first half of the selecting layers onto the first-named shape and the
              rest onto the second, so the row holds each shape's position from its own layers; "none": no loss.

  --question side  "is the red circle left or right ?"                      (one shape against the image centre)
  --question pair  "is the red circle left or right of the blue square ?"   (the generator's two-shape question)

Prints held-out exact match (300 questions per kind on the cache's held-out images) every --eval-every steps.
This is an experiment on the recipe, not part of it: the position code is not in the model's code path.

  python scripts/lr_spatial_probe.py --question pair --code ordered --attention split --steps 1500
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_embedded as te  # noqa: E402

from flexattn.evaluate import hr_cells  # noqa: E402
from flexattn.loading import load  # noqa: E402
from flexattn.synthetic import HR_SIZE, build_tokenizer  # noqa: E402
from flexattn.training import IGNORE, teacher_forced  # noqa: E402
from flexattn.training import attention_loss as training_attention_loss  # noqa: E402

CENTRE = HR_SIZE / 2


def side_question(meta, rng):
    """One shape against the image centre; shapes within 28 px (2/3 of an LR cell) of it are not asked about."""
    far = [s for s in meta["shapes"] if abs(s["centre"][0] - CENTRE) >= 28]
    if not far:
        return None
    s = far[rng.randrange(len(far))]
    return f"is the {s['colour']} {s['kind']} left or right ?", "left" if s["centre"][0] < CENTRE else "right", [s]


def _generator_question(kind):
    def ask(meta, rng):
        got = te._question(meta, kind, rng)
        return None if got is None else (got[0], got[1], got[2][0])  # shapes: first-named first
    return ask


ASK = {"side": side_question, "pair": _generator_question("ctl_spatial"), "colour": _generator_question("ctl_colour")}


def draw(metas, mix, rng, size, images=None):
    """(image indices, (question, answer, named shapes)) as train_embedded.draw_batch, for this script's kinds."""
    idx, items = [], []
    pool = iter(images) if images is not None else None
    while len(items) < size:
        i = next(pool, None) if pool is not None else rng.randrange(len(metas))
        if i is None:
            break
        got = ASK[rng.choices(list(mix), list(mix.values()))[0]](metas[i], rng)
        if got is not None:
            idx.append(i)
            items.append(got)
    return idx, items


def position_code(kind: str, scale: float, grid: int, dim: int, seed: int = 0) -> torch.Tensor:
    """(grid * grid, dim): what is added to each projected LR token, raster order."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols = torch.arange(grid * grid) // grid, torch.arange(grid * grid) % grid
    if kind == "none":
        return torch.zeros(grid * grid, dim)
    if kind == "random":
        by_col, by_row = torch.randn(grid, dim, generator=gen), torch.randn(grid, dim, generator=gen)
        return scale * (by_col[cols] + by_row[rows]) / 2**0.5
    unit = torch.linalg.qr(torch.randn(dim, 2, generator=gen))[0].T * dim**0.5  # orthogonal, RMS 1 per channel
    half = (grid - 1) / 2
    return scale * ((cols[:, None] / half - 1) * unit[0] + (rows[:, None] / half - 1) * unit[1]) / 2**0.5


def shape_cells(items, which: int) -> torch.Tensor:
    """(B, g, g) LR cells of each question's first (0) or last (-1) named shape."""
    return torch.stack([torch.as_tensor(hr_cells([shapes[which]["box"]], (HR_SIZE, HR_SIZE), te.LR_GRID))
                        for _, _, shapes in items]).bool()


def attention_loss(lr_maps, first, last, how: str) -> torch.Tensor:
    """flexattn's attention loss on the row that predicts the answer word, with a target per selecting layer:
    both named shapes, or ("split") the first-named in the first half of the layers and the last-named after."""
    layers = [layer for layer, _ in lr_maps]
    per_layer = []
    for layer, lr_map in lr_maps:
        target = (first if layer < layers[len(layers) // 2] else last) if how == "split" else first | last
        per_layer.append(training_attention_loss([(layer, lr_map[:, :1])], target[:, None]))
    return torch.stack(per_layer).mean()


def run(args) -> None:
    torch.set_num_threads(args.threads)
    te._seed_all(args.seed)
    tokenizer = build_tokenizer()
    model = load(args.model, device="cpu", dtype=torch.float32).model
    train, held = te._load_cache(Path(args.cache) / "train.pt"), te._load_cache(Path(args.cache) / "heldout.pt")
    code = position_code(args.code, args.code_scale, te.LR_GRID, model.config.text_config.hidden_size)

    def forward(cache, idx, items, keep_maps):
        batch = te.make_batch(tokenizer, [te.Question(q, a, [[s["box"] for s in shapes]], None)
                                          for q, a, shapes in items])
        feats = te.project(model, cache["lr"][idx]) + code
        logits, state = teacher_forced(model, batch, feats, None, model.flex_settings, [(HR_SIZE, HR_SIZE)] * len(idx),
                                       mode="lowres", keep_lr_maps=keep_maps)
        return batch, logits, state

    held_sets = {k: draw(held["meta"], {k: 1.0}, random.Random(0), 300, images=range(len(held["meta"])))
                 for k in (args.question, "colour")}

    @torch.no_grad()
    def evaluate() -> str:
        model.eval()
        out = []
        for kind, (idx, items) in held_sets.items():
            right = 0
            for j in range(0, len(idx), 50):
                batch, logits, _ = forward(held, idx[j:j + 50], items[j:j + 50], False)
                right += int(te.exact_match(logits, batch.labels).sum())
            out.append(f"{kind} {100 * right / len(idx):.1f} %")
        model.train()
        return ", ".join(out)

    print(f"{args.question} / code {args.code} x{args.code_scale} / attention {args.attention}: before: {evaluate()}",
          flush=True)
    params = [p for n, p in model.named_parameters() if "vision_tower" not in n and "_proj_hd" not in n]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = te.warmup_cosine(opt, 50, args.steps, floor=0.05)
    rng, t0 = random.Random(args.seed), time.time()
    model.train()
    for step in tqdm(range(1, args.steps + 1), desc="probe", dynamic_ncols=True):
        idx, items = draw(train["meta"], {args.question: 0.8, "colour": 0.2}, rng, args.batch_size)
        batch, logits, state = forward(train, idx, items, args.attention != "none")
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), ignore_index=IGNORE)
        if args.attention != "none":
            loss = loss + args.attention_weight * attention_loss(state.lr_maps, shape_cells(items, 0),
                                                                 shape_cells(items, -1), args.attention)
        te.optimiser_step(opt, sched, loss, params)
        if step % args.eval_every == 0 or step == args.steps:
            tqdm.write(f"step {step} ({(time.time() - t0) / 60:.1f} min): {evaluate()}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="build/stage2_align_v4", help="an aligned (stage 2b) checkpoint")
    p.add_argument("--cache", default="build/stage2_cache", help="the tower features it was aligned on")
    p.add_argument("--question", choices=("side", "pair"), default="pair")
    p.add_argument("--code", choices=("none", "ordered", "random"), default="ordered")
    p.add_argument("--code-scale", type=float, default=1.0, help="multiplies the code (projected tokens have RMS 1 per channel)")
    p.add_argument("--attention", choices=("none", "both", "split"), default="split")
    p.add_argument("--attention-weight", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
