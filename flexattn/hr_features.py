"""HR features of one image, encoded crop by crop: all at once, or lazily when a selection first touches a crop.

Every crop is encoded on its own (batch of one) in both cases, so lazy and eager encoding give bit-identical
features, and outputs do not depend on which crops were encoded when.

The HR keys and values a layer attends to (`k_proj_hd` / `v_proj_hd` of these features, keys rotated with the
interpolated LR positions) depend only on the image, the layer and where the image sits in the prompt, so they
are computed once per token and layer and reused by later passes and follow-up questions.
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
        self._kv: dict[int, _ProjectedRows] = {}  # layer -> HR keys/values computed so far
        self._kv_key = None  # what the projections depend on besides the layer (the image's prompt position)

    @property
    def crops_encoded(self) -> int:
        return int(self._done.sum())

    @property
    def nbytes(self) -> int:
        """Device bytes held: the feature buffer and every layer's projected keys/values."""
        return self._buffer.nbytes + sum(rows.nbytes for rows in self._kv.values())

    def drop_projections(self) -> None:
        """Free every projected key/value (they are recomputed when needed again)."""
        self._kv, self._kv_key = {}, None

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

    def keys_values(self, layer: int, tokens: torch.Tensor, project, depends_on):
        """HR keys and values (M, kv_dim) of `tokens` at `layer`, and how many of them were projected now:
        `project(features, tokens) -> (keys, values)` runs only for tokens not projected before. Cached rows are
        dropped when `depends_on` changes."""
        if depends_on != self._kv_key:
            self._kv, self._kv_key = {}, depends_on
        rows = self._kv.get(layer)
        if rows is None:
            rows = self._kv[layer] = _ProjectedRows(self.grid * self.grid, self._buffer.device)
        missing = tokens[rows.index[tokens] < 0]
        if missing.numel() or rows.keys is None:  # (an empty first call still sets the shapes)
            rows.add(missing, *project(self.gather(missing), missing))
        where = rows.index[tokens]
        return rows.keys[where], rows.values[where], missing.numel()


class _ProjectedRows:
    """One layer's projected HR keys/values, stored compactly in the order they were first needed."""

    def __init__(self, n_tokens: int, device):
        self.index = torch.full((n_tokens,), -1, dtype=torch.long, device=device)
        self.keys = self.values = None

    @property
    def nbytes(self) -> int:
        held = self.index.nbytes
        return held + (self.keys.nbytes + self.values.nbytes if self.keys is not None else 0)

    def add(self, tokens: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        start = 0 if self.keys is None else self.keys.shape[0]
        self.index[tokens] = torch.arange(start, start + tokens.numel(), device=self.index.device)
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys])
        self.values = values if self.values is None else torch.cat([self.values, values])
