"""The one model the app serves, chosen at launch (never from the page), and the GPU entry points.

There may be no model at all: `python app.py --trace FILE` serves a saved trace's views without one
(`has_model()` is False, and the events that would run a model say so).

On Hugging Face ZeroGPU Spaces the `spaces` package is importable and the functions that touch the model run
under `spaces.GPU` (a forked worker; results come back pickled, so they hold CPU numpy arrays and plain Python
only, which is what `flexattn.Answer` is). Everywhere else `gpu` returns the function unchanged.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from flexattn import EMBEDDED_MODEL, Answer, FlexSettings, FlexVLM
from flexattn.trace_file import TraceFile

ENV_MODEL = "FLEXATTN_MODEL"
GPU_SECONDS = 120  # per call, on ZeroGPU
TRACE_BUDGET_BYTES = 64 * 2**20  # per answer: how much per-token trace a session may keep

log = logging.getLogger(__name__)
_MODEL: FlexVLM | None = None


def choose_model(cli_value: str | None = None) -> str | None:
    """--model, else $FLEXATTN_MODEL, else None (the embedded model)."""
    return cli_value or os.environ.get(ENV_MODEL) or None


def load_model(name: str | None = None, device=None, dtype=None) -> FlexVLM:
    """Load the model (ModelLoadError on failure, one line) and make it the shared one."""
    shown = name or f"{EMBEDDED_MODEL} (embedded)"
    print(f"loading model {shown} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    vlm = FlexVLM.load(name, device=device, dtype=dtype)
    print(f"model ready on {vlm.device} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
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


def gpu(fn=None, *, duration: int = GPU_SECONDS):
    """`spaces.GPU(duration=...)` when the `spaces` package is importable, else the function itself."""
    if fn is None:
        return lambda f: gpu(f, duration=duration)
    try:
        import spaces  # noqa: PLC0415 - only present on Hugging Face Spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=duration)(fn)


@gpu
def stream_answer(image: str, question: str, options: dict) -> Iterator[str | Answer]:
    """Text chunks while generating, then the final Answer (numpy trace, plain stats)."""
    yield from model().stream(image, question, **options)


@gpu
def answer(image: str, question: str, options: dict) -> Answer:
    return model().answer(image, question, **options)


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
