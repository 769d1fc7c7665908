"""The one model the app serves, chosen at launch (never from the page), and its one GPU entry point.

There may be no model at all: `python app.py --trace FILE` serves a saved trace's views without one
(`has_model()` is False, and the events that would run a model say so).

On Hugging Face ZeroGPU Spaces the `spaces` package is importable and the functions that touch the model run
under `spaces.GPU` (a forked worker; results come back pickled, so they hold CPU numpy arrays and plain Python
only, which is what `flexattn.Answer` is). Everywhere else `gpu` returns the function unchanged.

Every user action is one GPU call: a chat answer (`stream_answer`) or all the runs of Compare (`compare`). On
Hugging Face ZeroGPU Spaces (the `spaces` package importable, SPACES_ZERO_GPU set) that call runs under
`spaces.GPU` with a duration computed from the work it asks for (`gpu_seconds`): ZeroGPU refuses a call that asks
for more seconds than the visitor has left of the daily quota, so a fixed large figure would lock visitors out
after one answer. The call runs in a forked worker process: its results come back pickled (`flexattn.Answer` holds
CPU numpy arrays and plain Python only), and an exception other than `gr.Error` would reach the page as "ZeroGPU
worker error", so errors meant for the visitor become `gr.Error` inside the call. Elsewhere `gpu` returns the
function unchanged.

What survives between calls on ZeroGPU: the model, loaded once at start-up. The per-image caches (HR features and
keys/values, the prompt prefix a follow-up reuses) live in the worker process that answered; ZeroGPU hands a worker
back only while it is alive and idle on the same GPU, so a follow-up finds them sometimes and otherwise encodes
the image again. Chat and Compare share the entry point, hence the workers and their caches.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

from flexattn import EMBEDDED_MODEL, Answer, DeviceMemoryError, FlexSettings, FlexVLM, ImageError, PromptError
from flexattn.trace_file import TraceFile

ENV_MODEL = "FLEXATTN_MODEL"
TRACE_BUDGET_BYTES = 64 * 2**20  # per answer: how much per-token trace a session may keep

log = logging.getLogger(__name__)
_MODEL: FlexVLM | None = None


@dataclass(frozen=True)
class GpuTime:
    """Seconds one GPU call is budgeted for, per piece of work: estimates for the released 7B on ZeroGPU's
    hardware, made without a GPU (docs/gpu-and-spaces.md), generous on the per-token side because a call that
    outruns its duration may be cut off. Answers are costed at their `max_new_tokens`."""

    start: float = 10.0  # a fresh worker: fork, CUDA context, weights moved onto the GPU
    image: float = 3.0  # LR view and every HR crop through the vision tower (once per call: then cached)
    prefill: float = 1.0  # per run
    per_token: dict = field(default_factory=lambda: {"lowres": 0.05, "flex": 0.10, "select_all": 0.10})
    avl_per_token: float = 0.05  # A-VL's per-layer bookkeeping, on top
    minimum: float = 15.0

    def seconds(self, runs: Sequence[dict]) -> int:
        work = self.start + self.image
        for options in runs:
            rate = self.per_token[options.get("mode", "flex")] + (self.avl_per_token if options.get("avl") else 0)
            work += self.prefill + int(options.get("max_new_tokens", 64)) * rate
        return int(math.ceil(max(self.minimum, work)))


GPU_TIME = GpuTime()


def gpu_seconds(action: str, image: str, question: str, runs: Sequence[dict]) -> int:
    """The `duration` of one GPU call (ZeroGPU calls it with the entry point's own arguments)."""
    return GPU_TIME.seconds(runs)


def choose_model(cli_value: str | None = None) -> str | None:
    """--model, else $FLEXATTN_MODEL, else None (the embedded model)."""
    return cli_value or os.environ.get(ENV_MODEL) or None


def load_model(name: str | None = None, device=None, dtype=None) -> FlexVLM:
    """Load the model (ModelLoadError on failure, one line) and make it the shared one."""
    shown = name or f"{EMBEDDED_MODEL} (embedded)"
    print(f"loading model {shown} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    vlm = FlexVLM.load(name, device=device, dtype=dtype)
    needs = f" ({vlm.needs.describe()})" if vlm.needs is not None else ""
    print(f"model ready on {vlm.device} in {time.perf_counter() - start:.1f} s{needs}", file=sys.stderr, flush=True)
    set_model(vlm)
    return vlm


def set_model(vlm: FlexVLM | None) -> None:
    """Make `vlm` the shared model (None: serve without one)."""
    global _MODEL
    _MODEL = vlm


def has_model() -> bool:
    return _MODEL is not None


def model() -> FlexVLM:
    if _MODEL is None:
        raise RuntimeError("no model loaded: call app.runtime.load_model() or set_model() first")
    return _MODEL


def gpu(fn=None, *, duration=None):
    """`spaces.GPU(duration=...)` when the `spaces` package is importable, else the function itself. `duration`:
    seconds, or a function of the call's arguments that returns them."""
    if fn is None:
        return lambda f: gpu(f, duration=duration)
    try:
        import spaces  # noqa: PLC0415 - only present on Hugging Face Spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)


def _visitor_error(err: Exception, mode: str | None = None) -> gr.Error:
    """The one-line gr.Error a visitor sees for an error raised while answering."""
    if isinstance(err, DeviceMemoryError):
        return gr.Error(str(err), title="Out of GPU memory")
    if isinstance(err, (ImageError, PromptError, ValueError)):
        return gr.Error(str(err), title="Cannot do that")
    log.error("generation failed", exc_info=err)
    lines = str(err).strip().splitlines()
    what = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    where = f" in {mode} mode" if mode else ""
    return gr.Error(f"Generation failed{where} ({what}). The app is still running; try again.",
                    title="Generation failed")


def _run(action: str, image: str, question: str, runs: Sequence[dict]) -> Iterator[str | Answer]:
    """The GPU entry point. "answer": text chunks, then the Answer of runs[0]; "compare": each run's Answer in
    turn. Closing it stops generation within a token (flexattn.FlexVLM.stream)."""
    vlm, mode = model(), None
    try:
        if action == "answer":
            yield from vlm.stream(image, question, **runs[0])
            return
        for options in runs:
            mode = options.get("mode")
            yield vlm.answer(image, question, **options)
    except gr.Error:
        raise
    except Exception as err:
        raise _visitor_error(err, mode) from None


_on_gpu = gpu(_run, duration=gpu_seconds)


def stream_answer(image: str, question: str, options: dict) -> Iterator[str | Answer]:
    """Text chunks while generating, then the final Answer (numpy trace, plain stats): one GPU call."""
    yield from _on_gpu("answer", image, question, [options])


def compare(image: str, question: str, runs: Sequence[dict]) -> Iterator[Answer]:
    """The Answer of each run (keyword options of FlexVLM.answer) in turn, all in one GPU call."""
    yield from _on_gpu("compare", image, question, list(runs))


def answer(image: str, question: str, options: dict) -> Answer:
    """One answer, not streamed: one GPU call."""
    *_, result = _on_gpu("compare", image, question, [options])
    return result


def trace_passes(vlm: FlexVLM, budget: int = TRACE_BUDGET_BYTES) -> int:
    """How many generated tokens to trace so one answer's trace stays within `budget` bytes."""
    cfg = vlm.model.config
    g = vlm.settings.lowres_size // cfg.vision_config.patch_size
    G = g * vlm.settings.zoom
    per_layer = 4 * g * g + 4 * G * G + G * G + g * g  # lr float32 + hr float32 + mask bool + A-VL int8
    per_pass = per_layer * cfg.text_config.num_hidden_layers
    return max(1, budget // per_pass)


def display_name(name) -> str:
    """A model's name for the page: the embedded model by its short name, anything else as given."""
    return f"{EMBEDDED_MODEL.name} (embedded)" if Path(str(name)).resolve() == EMBEDDED_MODEL.resolve() else str(name)


def describe(vlm: FlexVLM) -> dict:
    """Plain facts about the served model for the page header."""
    cfg = vlm.model.config
    s = vlm.settings
    g = s.lowres_size // cfg.vision_config.patch_size
    return {
        "loaded": True,
        "name": display_name(vlm.name),
        "device": str(vlm.device),
        "dtype": str(next(vlm.model.parameters()).dtype).replace("torch.", ""),
        "layers": cfg.text_config.num_hidden_layers,
        "lowres_size": s.lowres_size,
        "hr_size": s.hr_size,
        "lr_grid": g,
        "hr_grid": g * s.zoom,
        "selection_layer": s.selection_layer,
        "threshold": float(s.threshold),
        "untrained_hr": bool(vlm.untrained_hr),
        "card": vlm.card,
    }


def describe_trace(opened: TraceFile) -> dict:
    """The same facts, as far as a trace file tells them, when the app serves one without a model."""
    trace, settings = opened.answer.trace, FlexSettings.from_dict(opened.answer.settings)
    return {
        "loaded": False,
        "name": display_name(opened.answer.model) if opened.answer.model else "unknown",
        "layers": len(trace.passes[0]),
        "lowres_size": settings.lowres_size,
        "hr_size": settings.hr_size,
        "lr_grid": trace.lr_grid,
        "hr_grid": trace.hr_grid,
        "selection_layer": trace.selection_layer,
        "threshold": float(settings.threshold),
        "untrained_hr": bool(settings.untrained_hr_projections),
    }
