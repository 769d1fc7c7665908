"""What an answer returns: the text, the trace and typed statistics, documented here once.

`Answer.to_json()` is the one way these become JSON (the CLI's `answer --json`, the eval runner, the app).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from .avl import AVLSettings
from .cost import Flops
from .trace import Trace


@dataclass
class Latency:
    """Seconds, measured around one call. `vision`: views, vision tower and projector for the image (~0 when its
    features were cached); `prefill`: the prompt's forward pass, to the first answer token; `decode_per_token`: the
    mean of the decoding steps after it; `generation`: prefill and every decoding step; `total`: vision and
    generation."""

    vision: float
    prefill: float
    decode_per_token: float
    generation: float
    total: float = field(init=False)

    def __post_init__(self):
        self.total = self.vision + self.generation


@dataclass
class AVLStats:
    """A-VL's effect on one answer (present when A-VL was on)."""

    settings: AVLSettings
    kv_bytes_full_cache: int  # what the same cache would hold without eviction, at the end of generation
    kv_bytes_full_cache_per_layer: list[int]
    visual_attended_per_step: list[float]  # per decoding step, LR image tokens attended (mean over layers)
    visual_attention_ratio: float  # their mean over the steps / LR image tokens


@dataclass
class AnswerStats:
    """Counts, cost and latency of one answer.

    hr_attended_per_layer: HR tokens each layer attended for the first answer token (0 where none);
    hr_attended_mean: their mean over every traced pass and every layer after the selection layer;
    hr_crops_encoded: HR crops of the image encoded so far (fewer than zoom**2 with lazy encoding);
    hr_kv_projected: HR keys/values this call projected (the rest came from the image's cache);
    prefix_tokens_reused: prompt tokens whose keys/values came from an earlier question about the image;
    kv_bytes(_per_layer): what the KV cache holds at the end of generation.
    """

    lr_tokens: int
    hr_tokens: int
    text_tokens: int
    prompt_tokens: int
    generated_tokens: int
    hr_attended_per_layer: list[int]
    hr_attended_mean: float
    hr_crops_encoded: int
    hr_kv_projected: int
    prefix_tokens_reused: int
    kv_bytes: int
    kv_bytes_per_layer: list[int]
    latency_s: Latency
    flops: Flops
    untrained_hr_projections: bool
    avl: AVLStats | None = None
    tflops: float = field(init=False)
    hr_share: float = field(init=False)  # hr_attended_mean / hr_tokens

    def __post_init__(self):
        self.tflops = self.flops.total / 1e12
        self.hr_share = self.hr_attended_mean / self.hr_tokens if self.hr_tokens else 0.0

    @classmethod
    def from_dict(cls, data: dict) -> "AnswerStats":
        """The inverse of `dataclasses.asdict` (how `to_json` and trace files write stats); derived fields
        (totals, tflops, hr_share) are computed again, not read."""
        values = {f.name: data[f.name] for f in dataclasses.fields(cls) if f.init and f.name in data}
        latency = {k: v for k, v in data["latency_s"].items() if k != "total"}
        values["latency_s"] = Latency(**latency)
        values["flops"] = Flops(**{k: v for k, v in data["flops"].items() if k != "total"})
        if data.get("avl") is not None:
            avl = dict(data["avl"])
            values["avl"] = AVLStats(**{**avl, "settings": AVLSettings(**avl["settings"])})
        return cls(**values)


@dataclass
class Answer:
    """One answer. `unknown_words`: parts of the question the model's tokenizer maps to its unknown token (the
    model never saw them, so its answer cannot be about them); `model`: the name of the model that answered."""

    text: str
    mode: str
    token_ids: list[int]
    tokens: list[str]
    stats: AnswerStats
    trace: Trace | None = None
    settings: dict = field(default_factory=dict)
    unknown_words: list[str] = field(default_factory=list)
    model: str = ""

    def to_json(self, layers: bool = True, masks: bool = False) -> dict:
        """Plain-JSON view. `layers`: per-layer counts for the first token; `masks`: every selected HR mask, per
        generated token and layer, as sorted row-major indices into the HR grid."""
        out = {"answer": self.text, "mode": self.mode, "model": self.model, "token_ids": self.token_ids,
               "tokens": self.tokens, "unknown_words": self.unknown_words, "stats": dataclasses.asdict(self.stats),
               "settings": self.settings}
        passes = self.trace.passes if self.trace is not None else []
        if layers and passes:
            out["layers"] = [
                {"layer": lt.layer, "selected_hr_tokens": lt.selected_count, "hr_attended": lt.hr_attended,
                 "hr_attention_share": round(lt.hr_attention_share, 6)}
                for lt in passes[0]
            ]
        if masks and passes:
            out["masks"] = [
                {str(lt.layer): np.flatnonzero(lt.selected).tolist() for lt in per_layer if lt.selected is not None}
                for per_layer in passes
            ]
        return out
