"""How much of an HR token's place in the image can one attention head see through rotary alone?

FlexAttention gives HR keys rotary tables bicubically interpolated from the LR image positions, which run in
raster order (row * g + column), and puts no position in HR values (crop features know only their place within
their crop). For fixed query and key content, one head's score over the HR keys is a linear function of the
keys' cos / sin tables. This fits the best such function (least squares) to an HR cell's column and to its row,
and reports R^2 and how often it orders two cells at least `--apart` HR cells apart (of 24) the right way round.

    python scripts/rotary_columns.py                      # the embedded model: 8x8 LR, zoom 3, head_dim 32
    python scripts/rotary_columns.py --lr-grid 24 --head-dim 128   # the 7B: 24x24 LR, zoom 3, head_dim 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexattn.attention import interpolate_rotary  # noqa: E402


def fit(lr_grid: int, zoom: int, head_dim: int, image_start: int, theta: float, apart: float) -> dict:
    hr_grid = lr_grid * zoom
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
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
    p.add_argument("--lr-grid", type=int, default=8)
    p.add_argument("--zoom", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--image-start", type=int, default=32,
                   help="position of the first LR image token (32 for the embedded model's v1 prompt)")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--apart", type=float, default=4.0,
                   help="minimum distance in HR cells, per 24 cells of side (4 = 56 of 336 px; spatial questions need 48 px between centres and boxes apart)")
    a = p.parse_args(argv)
    got = fit(a.lr_grid, a.zoom, a.head_dim, a.image_start, a.rope_theta, a.apart)
    for name, m in got.items():
        print(f"{name:6s}: R^2 {m['r2']:.2f}, pairs ordered right {m['ordered'] * 100:.1f} %")


if __name__ == "__main__":
    main()
