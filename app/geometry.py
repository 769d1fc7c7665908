"""Where token grids lie on the original image, and selection recall against ground-truth boxes.

The model pads every image to a square of side max(w, h), image centred (flexattn.image.pad_to_square), and
tiles that square with its LR (g x g) and HR (G x G) token grids. Grid cell (row, col) therefore covers
original-image pixels x in [col * c - ox, (col + 1) * c - ox), with c = side / n and ox the left padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
        return (self.side - self.width) // 2, (self.side - self.height) // 2

    def cell(self, n: int) -> float:
        """Side of one cell of an n x n grid, in original px."""
        return self.side / n

    def first_centre(self, n: int) -> tuple[float, float]:
        """Centre of grid cell (0, 0) in original-image coordinates (negative inside a left/top margin)."""
        c = self.cell(n)
        ox, oy = self.offset
        return c / 2 - ox, c / 2 - oy

    def cell_centres(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """x centres of the n columns and y centres of the n rows, original-image px."""
        x0, y0 = self.first_centre(n)
        steps = np.arange(n) * self.cell(n)
        return x0 + steps, y0 + steps


def box_cells(frame: Frame, n: int, boxes: Sequence[Sequence[float]]) -> np.ndarray:
    """(n, n) bool: the cells whose centre lies inside any box (x0, y0, x1, y1), original px, end-exclusive."""
    xs, ys = frame.cell_centres(n)
    inside = np.zeros((n, n), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        cols = (xs >= x0) & (xs < x1)
        rows = (ys >= y0) & (ys < y1)
        inside |= rows[:, None] & cols[None, :]
    return inside


def selection_recall(mask: np.ndarray | None, frame: Frame, boxes: Sequence[Sequence[float]]) -> float | None:
    """Share of the target's HR cells (centres inside the boxes) that the mask selected; None when undefined."""
    if mask is None or not boxes:
        return None
    target = box_cells(frame, mask.shape[0], boxes)
    total = int(target.sum())
    if total == 0:
        return None
    return float((mask.astype(bool) & target).sum()) / total
