"""How much of an HR token's place in the image can one attention head see through rotary alone?

FlexAttention gives HR keys rotary tables bicubically interpolated from the LR image positions, which run in
raster order (row * g + column), and puts no position in HR values (crop features know only their place within
their crop). For fixed query and key content, one head's score over the HR keys is a linear function of the
keys' cos / sin tables. This fits the best such function (least squares) to an HR cell's column and to its row,
and reports R^2 and how often it orders two cells at least `--apart` HR cells apart (of 24) the right way round.

    python scripts/rotary_columns.py                      # 8x8 LR, zoom 3, head_dim 32, plain rope (theta 1e4)
    python scripts/rotary_columns.py --model assets/flexattn-tiny  # a checkpoint's own grid and rope_parameters
    python scripts/rotary_columns.py --lr-grid 24 --head-dim 128 --image-start 35   # the 7B's geometry
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexattn.attention import interpolate_rotary  # noqa: E402


def inverse_frequencies(head_dim: int, rope_parameters: dict) -> torch.Tensor:
    """The rotary frequencies of a LLaMA with these `rope_parameters`, read from transformers' own rotary module,
    so every rope type a config may name comes out as the model computes it."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=head_dim, num_attention_heads=1, rope_parameters=dict(rope_parameters))
    return LlamaRotaryEmbedding(config).inv_freq.double()


def fit(lr_grid: int, zoom: int, inv_freq: torch.Tensor, image_start: int, apart: float) -> dict:
    hr_grid = lr_grid * zoom
    angles = torch.outer(torch.arange(image_start, image_start + lr_grid**2, dtype=torch.float64), inv_freq)
    cos, sin = interpolate_rotary(torch.cos(angles), torch.sin(angles), hr_grid)
    basis = torch.cat([cos, sin, torch.ones(hr_grid**2, 1, dtype=cos.dtype)], 1).numpy()
    rows, cols = np.divmod(np.arange(hr_grid**2), hr_grid)
    cells = np.random.default_rng(0).choice(hr_grid**2, size=min(hr_grid**2, 1500), replace=False)
    out = {}
    for name, y in (("column", cols.astype(float)), ("row", rows.astype(float))):
        w, *_ = np.linalg.lstsq(basis, y - y.mean(), rcond=None)
        f = basis @ w
        r2 = 1 - ((f - (y - y.mean())) ** 2).sum() / ((y - y.mean()) ** 2).sum()
        i, j = np.meshgrid(cells, cells, indexing="ij")
        far = (y[j] - y[i]) >= apart * hr_grid / 24
        out[name] = {"r2": float(r2), "ordered": float((f[j] > f[i])[far].mean())}
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a checkpoint directory: its LR grid, head_dim and rope_parameters are used "
                   "(the image start stays --image-start)")
    p.add_argument("--lr-grid", type=int, default=8)
    p.add_argument("--zoom", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--image-start", type=int, default=32,
                   help="position of the first LR image token (32 for the embedded model's v1 prompt)")
    p.add_argument("--rope-theta", type=float, default=10000.0, help="plain rope at this theta (without --model)")
    p.add_argument("--apart", type=float, default=4.0,
                   help="minimum distance in HR cells, per 24 cells of side (4 = 56 of 336 px; spatial questions "
                        "need 48 px between centres and boxes apart)")
    a = p.parse_args(argv)
    lr_grid, zoom, head_dim = a.lr_grid, a.zoom, a.head_dim
    rope = {"rope_type": "default", "rope_theta": a.rope_theta}
    if a.model:
        config = json.loads((Path(a.model) / "config.json").read_text())
        text, vision = config["text_config"], config["vision_config"]
        lr_grid = vision["image_size"] // vision["patch_size"]
        zoom = config.get("flex_attention", {}).get("zoom", zoom)
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        rope = text["rope_parameters"]
    got = fit(lr_grid, zoom, inverse_frequencies(head_dim, rope), a.image_start, a.apart)
    print(f"LR {lr_grid}x{lr_grid}, zoom {zoom}, head_dim {head_dim}, rope {rope}")
    for name, m in got.items():
        print(f"{name:6s}: R^2 {m['r2']:.2f}, pairs ordered right {m['ordered'] * 100:.1f} %")


if __name__ == "__main__":
    main()
