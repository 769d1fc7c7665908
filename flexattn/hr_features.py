"""HR features of one image, encoded crop by crop: all at once, or lazily when a selection first touches a crop.

Every crop is encoded on its own (batch of one) in both cases, so lazy and eager encoding give bit-identical
features, and outputs do not depend on which crops were encoded when.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .image import stitch_grids


class HRFeatures:
    def __init__(self, crops: torch.Tensor, zoom: int, lr_grid: int, encode: Callable[[torch.Tensor], torch.Tensor],
                 dim: int, dtype: torch.dtype, device):
        """crops: (zoom*zoom, 3, L, L) row-major; encode: (1, 3, L, L) -> (1, lr_grid**2, dim)."""
        self.crops = crops
        self.zoom = zoom
        self.lr_grid = lr_grid
        self.grid = zoom * lr_grid
        self._encode = encode
        self._buffer = torch.zeros(zoom * zoom, lr_grid * lr_grid, dim, dtype=dtype, device=device)
        self._done = torch.zeros(zoom * zoom, dtype=torch.bool)

    @property
    def crops_encoded(self) -> int:
        return int(self._done.sum())

    def encode(self, crop_ids) -> None:
        for c in sorted({int(c) for c in crop_ids}):
            if self._done[c]:
                continue
            self._buffer[c] = self._encode(self.crops[c : c + 1])[0]
            self._done[c] = True

    def full(self) -> torch.Tensor:
        """(G*G, D), every crop encoded, row-major over the stitched HR grid."""
        self.encode(range(self.zoom * self.zoom))
        return stitch_grids(self._buffer, self.zoom)

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features (M, D) of HR tokens given as row-major indices into the stitched HR grid."""
        g, G = self.lr_grid, self.grid
        row, col = tokens // G, tokens % G
        crop = (row // g) * self.zoom + (col // g)
        self.encode(crop.unique().tolist())
        return self._buffer[crop, (row % g) * g + (col % g)]
