"""What the Inspect and Compare views draw from: answers with their traces, image views and ground truth.

A record is made once, when an answer comes back or a trace file is opened; every redraw reads only the record,
so sliders and playback never run the model, and a record opened from a file needs no model at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image

from flexattn import Answer
from flexattn.trace import Trace
from flexattn.trace_file import GroundTruth, TraceFile

from .figures import THUMB_SIDE, ImageView, image_view

END_OF_ANSWER = "</s>"  # the label of the pass that produced the end-of-answer token


@dataclass
class AnswerRecord:
    answer: Answer  # with its trace (None when the call was untraced)
    question: str
    view: ImageView  # the image, <= 1000 px
    thumb: ImageView  # <= 128 px, for the small multiples
    image: str | Image.Image  # what "Save trace" writes: the upload's path, or an opened file's image
    history: list[tuple[str, str]] = field(default_factory=list)  # the turns before this question
    text_config: object | None = None  # the LLM's config, for the per-layer cost (None: no cost line)
    truth: GroundTruth | None = None  # only when the question is an example's own question about its image
    source: str = ""  # "" for an answer asked here; an opened trace file's name

    @property
    def trace(self) -> Trace | None:
        return self.answer.trace

    @property
    def stats(self):
        return self.answer.stats

    @property
    def mode(self) -> str:
        return self.answer.mode

    @property
    def untrained(self) -> bool:
        return self.answer.stats.untrained_hr_projections

    @property
    def labels(self) -> list[str]:
        """One per traced pass: the token that pass produced."""
        passes = len(self.trace.passes) if self.trace is not None else 0
        tokens = self.answer.tokens
        return [tokens[k] if k < len(tokens) else END_OF_ANSWER for k in range(passes)]

    def boxes(self, token: int) -> list[list[float]]:
        """Ground-truth boxes of answer token `token` ([] without ground truth)."""
        return self.truth.for_token(token) if self.truth is not None else []

    @property
    def all_boxes(self) -> list[list[float]]:
        return self.truth.boxes if self.truth is not None else []

    @classmethod
    def from_trace_file(cls, opened: TraceFile, name: str) -> "AnswerRecord":
        return cls(answer=opened.answer, question=opened.question,
                   view=image_view(opened.image, size=opened.image_size),
                   thumb=image_view(opened.image, THUMB_SIDE, quality=75, size=opened.image_size),
                   image=opened.image, history=list(opened.history), text_config=opened.text_config,
                   truth=opened.ground_truth, source=name)


@dataclass
class CompareRecord:
    """The same question in every mode (and with A-VL when asked), traced: what the per-mode pictures draw."""

    question: str
    view: ImageView  # small: one copy per picture
    truth: GroundTruth | None
    runs: list[tuple[str, Answer]] = field(default_factory=list)  # (label, answer) in run order

    def boxes(self, token: int) -> list[list[float]]:
        return self.truth.for_token(token) if self.truth is not None else []

    @property
    def max_tokens(self) -> int:
        return max((len(a.trace.passes) for _, a in self.runs if a.trace is not None), default=0)
