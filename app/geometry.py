"""Where token grids lie on the original image, and selection recall against ground-truth boxes.

Recall itself is `flexattn.evaluate.mask_recall`, so the app shows the numbers the eval runner reports.

The model pads every image to a square of side max(w, h), image centred (flexattn.image.pad_to_square), and
tiles that square with its LR (g x g) and HR (G x G) token grids. Grid cell (row, col) therefore covers
original-image pixels x in [col * c - ox, (col + 1) * c - ox), with c = side / n and ox the left padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from flexattn.evaluate import mask_recall
from flexattn.image import square_offset


@dataclass(frozen=True)
class Frame:
    """An original image of `width` x `height` px, padded (centred) to a square the grids tile."""

    width: int
    height: int

    @property
    def side(self) -> int:
        return max(self.width, self.height)

    @property
    def offset(self) -> tuple[int, int]:
        """Left and top padding in original px (the image's position inside the padded square)."""
        return square_offset((self.width, self.height))

    def cell(self, n: int) -> float:
        """Side of one cell of an n x n grid, in original px."""
        return self.side / n

    def first_centre(self, n: int) -> tuple[float, float]:
        """Centre of grid cell (0, 0) in original-image coordinates (negative inside a left/top margin)."""
        c = self.cell(n)
        ox, oy = self.offset
        return c / 2 - ox, c / 2 - oy


def selection_recall(mask: np.ndarray | None, frame: Frame, boxes: Sequence[Sequence[float]]) -> float | None:
    """Share of the target's HR cells that the mask selected (flexattn's one definition); None when undefined."""
    return mask_recall(mask, boxes, (frame.width, frame.height))
