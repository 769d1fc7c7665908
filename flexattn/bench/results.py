"""The bench's typed results: one row per (model, zoom, mode, A-VL), the ratios within a group and against no A-VL,
the follow-up and lazy-HR checks, and the whole run (`BenchResult.to_json()` is what `--json` prints). Field
meanings: the package docstring (flexattn.bench)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..avl import AVLSettings
from ..cost import Flops
from ..results import Latency
from .models import PlantedInfo

# Paper targets, checked for the main model (7b-shaped, zoom 3) and printed.
TARGETS = {
    "flex_flops_vs_naive_hd": ("<=", 0.15),
    "flex_flops_vs_lowres": ("<=", 1.3),
    "flex_prefill_time_vs_naive_hd": ("<=", 0.25),
    "followup_speedup": (">=", 3.0),
}


# ---- results --------------------------------------------------------------------------------------------------


@dataclass
class ModeRow:
    """One (model, zoom, mode, A-VL) row; the measured fields are None / empty where `measured` is False (naive_hd
    past naive_max_zoom: analytic figures only). A-VL rows also carry `avl_settings` and the KV bytes per layer at
    the end (`kv_cache_bytes_per_layer_end`); both are None on rows without A-VL."""

    model: str
    zoom: int
    mode: str
    avl: bool
    measured: bool
    llm_tokens: int  # tokens the LLM's prefill runs over (naive_hd: text + LR + every HR token)
    prompt_tokens: int  # text + LR tokens
    lr_tokens: int
    hr_tokens: int
    image_tokens_in_prompt: int  # visual tokens in the prompt (LR; naive_hd: LR + HR)
    hr_crops_encoded: int
    hr_attended_per_layer: list[int]  # the prefill's last row, at the measured depth
    hr_attended_mean: float  # over the layers after the selection layer (naive_hd: every HR token)
    flops: Flops | None  # analytic, image to first token, for the cost model's config (None: A-VL, not measured)
    decode_flops_per_token: int | None
    decode_flops_per_token_parts: Flops | None  # the same by part (vision and projector 0)
    flops_at_measured_depth: int | None  # total at the depth measured (only where the cost model is deeper)
    avl_settings: AVLSettings | None = None
    vision_s: float | None = None
    prefill_s: float | None = None
    first_token_s: float | None = None
    prefill_s_repeats: list[float] = field(default_factory=list)
    decode_steps: int = 0
    decode_ms_per_token: float | None = None
    decode_ms_per_token_mean: float | None = None
    decode_ms_steps: list[float] = field(default_factory=list)
    peak_memory_bytes: int | None = None
    kv_cache_bytes: int | None = None
    kv_cache_bytes_end: int | None = None
    kv_cache_bytes_full_cache_end: int | None = None
    hr_feature_bytes: int | None = None
    visual_attended_per_step: list[float] = field(default_factory=list)
    visual_attended_mean: float | None = None
    kv_cache_bytes_per_layer_end: list[int] | None = None


@dataclass
class ModeRatios:
    """One mode's FLOPs and times over naive_hd's and lowres's in the same (model, zoom, A-VL) group (None where a
    figure is missing)."""

    flops_vs_naive_hd: float | None
    flops_vs_lowres: float | None
    prefill_time_vs_naive_hd: float | None
    prefill_time_vs_lowres: float | None
    first_token_time_vs_naive_hd: float | None
    first_token_time_vs_lowres: float | None


@dataclass
class Group:
    model: str
    zoom: int
    avl: bool
    ratios: dict[str, ModeRatios]


@dataclass
class AVLRatios:
    """One mode's A-VL row over its row without A-VL (same model and zoom)."""

    kv_ratio: float | None  # KV bytes at the end of decoding
    kv_ratio_after_prefill: float | None
    kv_ratio_vs_own_full_cache: float | None  # over what the A-VL cache would hold without eviction
    decode_time_ratio: float | None  # median ms per token
    decode_time_ratio_mean: float | None
    decode_flops_ratio: float | None
    visual_attended_ratio: float | None  # visual cache entries attended per decoding step
    prefill_time_ratio: float | None


@dataclass
class AVLComparison:
    model: str
    zoom: int
    ratios: dict[str, AVLRatios]


@dataclass
class FollowupRow:
    """A cold first question against a follow-up on the same image, end to end through FlexVLM.answer: to the first
    answer token (`first_s`, `followup_s`; medians) and to the last (`*_full_s`)."""

    model: str
    zoom: int
    mode: str
    max_new_tokens: int
    first_s: float
    followup_s: float
    followup_speedup: float | None
    first_full_s: float
    followup_full_s: float
    followup_speedup_full_answer: float | None
    first_s_repeats: list[float]
    followup_s_repeats: list[float]
    first_full_s_repeats: list[float]
    followup_full_s_repeats: list[float]
    first_prompt_tokens: int
    followup_prompt_tokens: int
    prefix_tokens_reused: int
    first_latency_s: Latency
    followup_latency_s: Latency
    first_generated_tokens: int
    followup_generated_tokens: int


@dataclass
class LazySample:
    crops_encoded_lazy: int  # after the whole answer
    crops_encoded_eager: int
    crops_encoded_lazy_prefill: int  # after the prefill
    identical_tokens: bool
    identical_prefill_logits: bool  # bit for bit
    vision_s_lazy: float
    vision_s_eager: float


@dataclass
class LazyRow:
    """Lazy against eager HR encoding in flex mode, over the model's lazy-check images."""

    model: str
    zoom: int
    samples: int
    crops_total: int
    crops_encoded_lazy_mean: float
    crops_encoded_eager_mean: float
    identical_outputs: bool
    per_sample: list[LazySample]


@dataclass
class ModelInfo:
    name: str
    description: str
    dtype: str
    measured_llm_layers: int
    measured_tower_layers: int
    measured_selection_layer: int
    flops_llm_layers: int
    flops_tower_layers: int
    flops_selection_layer: int
    lowres_size: int
    planted_share: float | None
    planted: dict[str, PlantedInfo] = field(default_factory=dict)  # by str(zoom)

    @property
    def scaled_cost(self) -> bool:
        return self.flops_llm_layers != self.measured_llm_layers


@dataclass
class MainGroup:
    model: str
    zoom: int
    avl: bool


@dataclass
class Target:
    value: float | bool | None
    target: str
    met: bool | None


@dataclass
class BenchResult:
    """Everything one bench run measured. `ratios`, `avl_ratios` and `followup_speedup` are those of the main group
    (the first model, zoom 3 where it ran, without A-VL where it ran); `to_json()` is what `--json` prints."""

    device: str
    timing: str
    memory: str
    repeats: int
    warmup: int
    decode_steps: int
    decode_steps_requested: int
    avl_variants: list[bool]
    avl: AVLSettings | None
    avl_repeats: int | None
    avl_warmup: int | None
    models: list[ModelInfo]
    runs: list[ModeRow]
    groups: list[Group]
    avl_comparison: list[AVLComparison]
    followup: list[FollowupRow]
    lazy_hr: list[LazyRow]
    main: MainGroup
    ratios: dict[str, ModeRatios]
    avl_ratios: dict[str, AVLRatios] | None
    followup_speedup: float | None
    targets: dict[str, Target]
    targets_apply: bool  # the targets are set for the 7b-shaped model
    elapsed_s: float

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def rows(self, model: str, zoom: int, avl: bool | None = None) -> list[ModeRow]:
        return [r for r in self.runs if (r.model, r.zoom) == (model, zoom) and avl in (None, r.avl)]

    def comparison(self, model: str, zoom: int) -> AVLComparison | None:
        return next((c for c in self.avl_comparison if (c.model, c.zoom) == (model, zoom)), None)


# ---- figures derived from rows -----------------------------------------------------------------------------


def _ratio(a, b):
    return a / b if a is not None and b else None


def ratios(rows: Sequence[ModeRow]) -> dict[str, ModeRatios]:
    """Per mode: its FLOPs and times over naive_hd's and lowres's in the same (model, zoom, A-VL) group."""
    by_mode = {r.mode: r for r in rows}
    naive, low = by_mode.get("naive_hd"), by_mode.get("lowres")

    def total(r: ModeRow | None):
        return r.flops.total if r is not None and r.flops is not None else None

    def get(r: ModeRow | None, name: str):
        return getattr(r, name) if r is not None else None

    return {mode: ModeRatios(
        flops_vs_naive_hd=_ratio(total(r), total(naive)),
        flops_vs_lowres=_ratio(total(r), total(low)),
        prefill_time_vs_naive_hd=_ratio(r.prefill_s, get(naive, "prefill_s")),
        prefill_time_vs_lowres=_ratio(r.prefill_s, get(low, "prefill_s")),
        first_token_time_vs_naive_hd=_ratio(r.first_token_s, get(naive, "first_token_s")),
        first_token_time_vs_lowres=_ratio(r.first_token_s, get(low, "first_token_s")),
    ) for mode, r in by_mode.items()}


def avl_ratios(without: Sequence[ModeRow], with_avl: Sequence[ModeRow]) -> dict[str, AVLRatios]:
    """Per mode: the A-VL row's figures over the same mode's row without A-VL (same model and zoom)."""
    plain = {r.mode: r for r in without}
    out = {}
    for r in with_avl:
        base = plain.get(r.mode)
        if base is None:
            continue
        out[r.mode] = AVLRatios(
            kv_ratio=_ratio(r.kv_cache_bytes_end, base.kv_cache_bytes_end),
            kv_ratio_after_prefill=_ratio(r.kv_cache_bytes, base.kv_cache_bytes),
            kv_ratio_vs_own_full_cache=_ratio(r.kv_cache_bytes_end, r.kv_cache_bytes_full_cache_end),
            decode_time_ratio=_ratio(r.decode_ms_per_token, base.decode_ms_per_token),
            decode_time_ratio_mean=_ratio(r.decode_ms_per_token_mean, base.decode_ms_per_token_mean),
            decode_flops_ratio=_ratio(r.decode_flops_per_token, base.decode_flops_per_token),
            visual_attended_ratio=_ratio(r.visual_attended_mean, base.visual_attended_mean),
            prefill_time_ratio=_ratio(r.prefill_s, base.prefill_s),
        )
    return out


def check_targets(main_ratios: dict[str, ModeRatios], followup_speedup: float | None,
                  lazy: LazyRow | None = None) -> dict[str, Target]:
    """The paper's targets (TARGETS) on the main group's ratios and follow-up speed-up, and lazy HR's checks."""
    flex = main_ratios.get("flex")
    values = {
        "flex_flops_vs_naive_hd": flex.flops_vs_naive_hd if flex else None,
        "flex_flops_vs_lowres": flex.flops_vs_lowres if flex else None,
        "flex_prefill_time_vs_naive_hd": flex.prefill_time_vs_naive_hd if flex else None,
        "followup_speedup": followup_speedup,
    }
    out = {}
    for name, (op, limit) in TARGETS.items():
        v = values[name]
        met = None if v is None else (v <= limit if op == "<=" else v >= limit)
        out[name] = Target(v, f"{op} {limit}", met)
    if lazy is not None:
        out["lazy_hr_identical_outputs"] = Target(lazy.identical_outputs, "true", lazy.identical_outputs)
        out["lazy_hr_fewer_crops"] = Target(lazy.crops_encoded_lazy_mean, f"< {lazy.crops_total}",
                                            lazy.crops_encoded_lazy_mean < lazy.crops_total)
    return out
