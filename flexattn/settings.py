"""FlexAttention settings: read from a model's config, overridable per call."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODES = ("lowres", "flex", "select_all")  # what a model answers in
# The benchmark's and the cost model's modes add naive high-res: every HR token fed to the LLM as an input token
# (a cost reference: no model is trained for it).
COST_MODES = (*MODES, "naive_hd")
MAX_NEW_TOKENS = 512  # the longest answer a call may ask for


@dataclass(frozen=True)
class FlexSettings:
    """Everything that shapes FlexAttention at inference.

    Defaults are the released 7B's: LR 336 px (24x24 tokens), zoom 3 (1008 px, 72x72 HR tokens),
    selection from layer 8, threshold 48 on a 0-255 scale, 9x9 coarse pooling.
    """

    lowres_size: int = 336
    zoom: int = 3
    highres_size: int | None = None  # None: lowres_size * zoom
    selection_layer: int = 8
    threshold: float = 48.0
    pool_size: int = 9
    # True when the HR projections were copied from k_proj/v_proj rather than trained.
    untrained_hr_projections: bool = False

    def __post_init__(self):
        if self.zoom < 1 or self.lowres_size < 1:
            raise ValueError(f"zoom and lowres_size must be positive, got {self.zoom}, {self.lowres_size}")
        if self.highres_size is not None and self.highres_size % self.zoom:
            raise ValueError(f"highres_size {self.highres_size} is not a multiple of zoom {self.zoom}")
        if self.pool_size < 1:
            raise ValueError(f"pool_size must be positive, got {self.pool_size}")
        if not 0 <= self.threshold <= 255:
            raise ValueError(f"threshold is on a 0-255 scale, got {self.threshold}")

    @property
    def hr_size(self) -> int:
        return self.highres_size or self.lowres_size * self.zoom

    def with_overrides(self, **overrides) -> "FlexSettings":
        """A copy with the given non-None fields replaced (unknown names raise TypeError)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **overrides) if overrides else self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FlexSettings":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_official_extra(cls, extra: dict, num_layers: int) -> "FlexSettings":
        """Parse the released checkpoint's `config.extra`, whose values are strings ("3", "336", ...).

        The released code hard-codes the selection layer (8) and the 9x9 pool; it falls back to threshold 64
        when `extra` has none. Keys `selection_layer` / `pool_size` are honoured if a checkpoint adds them.
        """
        lowres = int(extra.get("lowres_size", 336))
        zoom = int(extra.get("zoom_ratio", 3))
        highres = int(extra.get("highres_size", lowres * zoom))
        highres = None if highres == lowres * zoom else highres  # canonical: None means lowres * zoom
        return cls(
            lowres_size=lowres,
            zoom=zoom,
            highres_size=highres,
            selection_layer=int(extra.get("selection_layer", 8)),
            threshold=float(int(extra.get("threshold", 64))),
            pool_size=int(extra.get("pool_size", 9)),
        )


def check_mode(mode: str, allowed: tuple[str, ...] = MODES) -> str:
    if mode not in allowed:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(allowed)}")
    return mode


def parse_modes(text: str, allowed: tuple[str, ...] = MODES) -> list[str]:
    """"lowres,flex" -> ["lowres", "flex"], each checked against `allowed`."""
    modes = [m.strip() for m in str(text).split(",") if m.strip()]
    if not modes:
        raise ValueError(f"no mode given; choose from {', '.join(allowed)}")
    return [check_mode(m, allowed) for m in modes]
