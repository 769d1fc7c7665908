"""Train the small embedded LLaVA-style model on the synthetic high-res VQA task, in stages.

Stage 1 (this file: `stage1_tower`): pretrain the CLIP-style vision tower with dense per-patch
heads on hidden_states[-2] (CLS dropped, LLaVA's select layer -2):
  * HR crops (3x3 crops of 112 px cut from the 336-px image; each token = one 14-px HR patch):
    letter (LETTERS or none), colour (COLOURS or none), shape (SHAPES or none);
  * LR view (the 112-px downscale; each token = a 42-px region): colour and shape of the object
    covering it. No letter target at LR: letters are not legible there.
Pixels come from flexattn.image.make_views, exactly as at inference.

Seeds: training images use seeds below HELDOUT_SEED; held-out evaluation uses seeds >= HELDOUT_SEED.

    python scripts/train_embedded.py stage1 --out build/stage1_tower --steps 500
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexattn.image import ImageProcessor, make_views  # noqa: E402
from flexattn.synthetic import (  # noqa: E402
    COLOURS,
    FAMILIES,
    HR_GRID,
    LETTERS,
    LR_SIZE,
    SHAPES,
    label_lists,
    make_sample,
    patch_labels,
)

HELDOUT_SEED = 10_000_000
ZOOM = 3
LR_GRID = LR_SIZE // 14  # 8
CROP_GRID = HR_GRID // ZOOM  # 8 patches per crop side

TOWER_CONFIG = dict(
    image_size=LR_SIZE,
    patch_size=14,
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
)


def make_processor():
    """The CLIP processor inference uses (PIL backend, default CLIP mean/std)."""
    return ImageProcessor()


def make_tower():
    from transformers import CLIPVisionConfig, CLIPVisionModel

    return CLIPVisionModel(CLIPVisionConfig(**TOWER_CONFIG))


def tower_features(tower, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, 112, 112) -> (N, 64, D): hidden_states[-2] without CLS, as LLaVA selects them."""
    out = tower(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[-2][:, 1:]


def _none_to_class(labels: np.ndarray, n: int) -> np.ndarray:
    """NONE (-1) becomes class n (the extra 'none' class of a head)."""
    out = labels.copy()
    out[out < 0] = n
    return out


def _crop_labels(grid_labels: np.ndarray) -> np.ndarray:
    """(24, 24) HR labels -> (9, 64): per crop (row-major, like split_crops), per token (row-major)."""
    g = grid_labels.reshape(ZOOM, CROP_GRID, ZOOM, CROP_GRID).transpose(0, 2, 1, 3)
    return g.reshape(ZOOM * ZOOM, CROP_GRID * CROP_GRID)


def encode_sample(seed: int, family: str, processor, grid_aligned: bool) -> dict[str, torch.Tensor]:
    s = make_sample(seed, family, grid_aligned)
    views = make_views(s.image, processor, LR_SIZE, ZOOM)
    hr = patch_labels(s, HR_GRID)
    lr = patch_labels(s, LR_GRID)
    return {
        "hr": views.highres_crops,  # (9, 3, 112, 112)
        "lr": views.lowres[0],  # (3, 112, 112)
        "hr_letter": torch.from_numpy(_crop_labels(_none_to_class(hr["letter"], len(LETTERS)))),
        "hr_colour": torch.from_numpy(_crop_labels(_none_to_class(hr["colour"], len(COLOURS)))),
        "hr_shape": torch.from_numpy(_crop_labels(_none_to_class(hr["shape"], len(SHAPES)))),
        "lr_colour": torch.from_numpy(_none_to_class(lr["colour"], len(COLOURS)).reshape(-1)),
        "lr_shape": torch.from_numpy(_none_to_class(lr["shape"], len(SHAPES)).reshape(-1)),
    }


class PatchStream(IterableDataset):
    """Endless stream of encoded samples: seeds start, start+1, ...; families round-robin."""

    def __init__(self, start: int, grid_aligned: bool, stride: int = 1):
        self.start, self.grid_aligned, self.stride = start, grid_aligned, stride

    def __iter__(self):
        torch.set_num_threads(1)
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        processor = make_processor()
        i = wid
        while True:
            seed = self.start + i
            if seed >= HELDOUT_SEED:
                raise RuntimeError("training stream ran into held-out seeds")
            yield encode_sample(seed, FAMILIES[i % len(FAMILIES)], processor, self.grid_aligned)
            i += nw


class PatchHeads(nn.Module):
    """Per-token linear heads (with LayerNorm) on tower features; 'none' is the last class.

    Colour and shape heads are shared by HR and LR tokens so both views share one feature code.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.letter = nn.Linear(dim, len(LETTERS) + 1)
        self.colour = nn.Linear(dim, len(COLOURS) + 1)
        self.shape = nn.Linear(dim, len(SHAPES) + 1)

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.norm(feats)
        return {"letter": self.letter(h), "colour": self.colour(h), "shape": self.shape(h)}


def _forward(tower, heads, batch, device):
    hr = batch["hr"].to(device)  # (B, 9, 3, L, L)
    lr = batch["lr"].to(device)  # (B, 3, L, L)
    b = hr.shape[0]
    pixels = torch.cat([hr.flatten(0, 1), lr], 0)
    out = heads(tower_features(tower, pixels))
    hr_out = {k: v[: b * ZOOM * ZOOM] for k, v in out.items()}
    lr_out = {k: v[b * ZOOM * ZOOM :] for k, v in out.items()}
    return hr_out, lr_out


def _losses(hr_out, lr_out, batch, device):
    none_letter = len(LETTERS)
    t_letter = batch["hr_letter"].to(device).flatten()
    logits_letter = hr_out["letter"].flatten(0, 1)
    loss = F.cross_entropy(logits_letter, t_letter)
    has = t_letter != none_letter
    if has.any():  # letter patches are rare (~1 %): give them their own mean
        loss = loss + F.cross_entropy(logits_letter[has], t_letter[has])
    for key in ("colour", "shape"):
        loss = loss + F.cross_entropy(hr_out[key].flatten(0, 1), batch[f"hr_{key}"].to(device).flatten())
        loss = loss + F.cross_entropy(lr_out[key].flatten(0, 1), batch[f"lr_{key}"].to(device).flatten())
    return loss


@torch.no_grad()
def evaluate(tower, heads, batches, device) -> dict[str, float]:
    tower.eval()
    heads.eval()
    counts: dict[str, list[int]] = {}

    def add(name, pred, target, mask=None):
        if mask is not None:
            pred, target = pred[mask], target[mask]
        c = counts.setdefault(name, [0, 0])
        c[0] += int((pred == target).sum())
        c[1] += int(target.numel())

    for batch in batches:
        hr_out, lr_out = _forward(tower, heads, batch, device)
        t = batch["hr_letter"].to(device).flatten()
        p = hr_out["letter"].flatten(0, 1).argmax(-1)
        add("hr_letter_on_letters", p, t, t != len(LETTERS))
        add("hr_letter_on_none", p, t, t == len(LETTERS))
        add("hr_letter_all", p, t)
        for key, n in (("colour", len(COLOURS)), ("shape", len(SHAPES))):
            for view, out in (("hr", hr_out), ("lr", lr_out)):
                t = batch[f"{view}_{key}"].to(device).flatten()
                p = out[key].flatten(0, 1).argmax(-1)
                add(f"{view}_{key}_all", p, t)
                add(f"{view}_{key}_on_objects", p, t, t != n)
    tower.train()
    heads.train()
    return {k: c[0] / max(c[1], 1) for k, c in counts.items()}


def heldout_batches(n: int, batch_size: int, grid_aligned: bool) -> list[dict[str, torch.Tensor]]:
    processor = make_processor()
    items = [
        encode_sample(HELDOUT_SEED + i, FAMILIES[i % len(FAMILIES)], processor, grid_aligned) for i in range(n)
    ]
    return [
        {k: torch.stack([it[k] for it in items[j : j + batch_size]]) for k in items[0]}
        for j in range(0, n, batch_size)
    ]


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k}={v * 100:.2f}%" for k, v in metrics.items())


def stage1_tower(
    out_dir: str | Path = "build/stage1_tower",
    steps: int = 500,
    batch_size: int = 8,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 100,
    seed: int = 0,
    grid_aligned: bool = True,
    eval_images: int = 300,
    eval_every: int = 250,
    max_minutes: float | None = None,
    workers: int = 1,
    device: str | None = None,
) -> dict[str, float]:
    """Pretrain the vision tower with dense per-patch heads; save it and return held-out accuracies."""
    t0 = time.time()
    torch.set_num_threads(2)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    tower = make_tower().to(dev)
    heads = PatchHeads(TOWER_CONFIG["hidden_size"]).to(dev)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))

    def lr_at(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup)))) * 0.97 + 0.03

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)

    # Training seeds: a block per run seed, far below the held-out range.
    stream = PatchStream(start=seed * 1_000_000, grid_aligned=grid_aligned)
    loader = DataLoader(
        stream,
        batch_size=batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    val_small = heldout_batches(min(48, eval_images), batch_size, grid_aligned)

    tower.train()
    heads.train()
    bar = tqdm(total=steps, desc="stage1", dynamic_ncols=True)
    it = iter(loader)
    ema = None
    done = 0
    for step in range(steps):
        batch = next(it)
        hr_out, lr_out = _forward(tower, heads, batch, dev)
        loss = _losses(hr_out, lr_out, batch, dev)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        done = step + 1
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if eval_every and done % eval_every == 0 and done < steps:
            m = evaluate(tower, heads, val_small, dev)
            tqdm.write(
                f"step {done} ({(time.time() - t0) / 60:.1f} min, {done * batch_size} images): "
                f"letter {m['hr_letter_on_letters'] * 100:.1f}%  none {m['hr_letter_on_none'] * 100:.1f}%  "
                f"hr colour {m['hr_colour_all'] * 100:.1f}%  lr colour {m['lr_colour_all'] * 100:.1f}%  "
                f"lr shape {m['lr_shape_all'] * 100:.1f}%"
            )
        if max_minutes is not None and time.time() - t0 > max_minutes * 60:
            tqdm.write(f"time limit reached after {done} steps")
            break
    bar.close()
    train_s = time.time() - t0

    metrics = evaluate(tower, heads, heldout_batches(eval_images, batch_size, grid_aligned), dev)
    wall_s = time.time() - t0
    print(f"held-out ({eval_images} images, seeds >= {HELDOUT_SEED}): {_fmt(metrics)}")
    print(
        f"trained {done} steps = {done * batch_size} images in {train_s / 60:.2f} min; "
        f"total wall time {wall_s / 60:.2f} min on {dev}"
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tower.cpu().save_pretrained(str(out))
    torch.save(heads.cpu().state_dict(), out / "patch_heads.pt")
    make_processor().save_pretrained(str(out))
    info = {
        "stage": "stage1_tower",
        "heldout_metrics": metrics,
        "steps": done,
        "images": done * batch_size,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "grid_aligned": grid_aligned,
        "train_seconds": train_s,
        "wall_seconds": wall_s,
        "device": str(dev),
        "feature_layer": -2,
        "drop_cls": True,
        "label_lists": label_lists(),
        "none_class": "last index of each head (len(list))",
    }
    (out / "stage1_info.json").write_text(json.dumps(info, indent=2))
    print(f"saved tower to {out}")
    return metrics


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    s1 = sub.add_parser("stage1", help="pretrain the vision tower with dense per-patch heads")
    s1.add_argument("--out", default="build/stage1_tower")
    s1.add_argument("--steps", type=int, default=500)
    s1.add_argument("--batch-size", type=int, default=8, help="images per step (each = 9 HR crops + 1 LR view)")
    s1.add_argument("--lr", type=float, default=1e-3)
    s1.add_argument("--weight-decay", type=float, default=0.05)
    s1.add_argument("--warmup", type=int, default=100)
    s1.add_argument("--seed", type=int, default=0)
    s1.add_argument("--placement", choices=("grid", "free"), default="grid",
                    help="grid: letters centred in one 14-px HR patch; free: shapes anywhere")
    s1.add_argument("--eval-images", type=int, default=300)
    s1.add_argument("--eval-every", type=int, default=250)
    s1.add_argument("--max-minutes", type=float, default=None, help="stop training early after this long")
    s1.add_argument("--workers", type=int, default=1, help="data-generation worker processes")
    s1.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if args.stage == "stage1":
        stage1_tower(
            out_dir=args.out,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup=args.warmup,
            seed=args.seed,
            grid_aligned=args.placement == "grid",
            eval_images=args.eval_images,
            eval_every=args.eval_every,
            max_minutes=args.max_minutes,
            workers=args.workers,
            device=args.device,
        )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
