"""Trace files: one answer with everything its views need, in one self-contained file that needs no model.

    save_trace(answer, image, question, "run.npz", text_config=vlm.model.config.text_config)
    opened = load_trace("run.npz")     # TraceFile: answer (trace and typed stats included), image, question, ...
    opened.answer.to_json(masks=True)  # the same masks `answer --json --masks` printed

The format is a NumPy .npz (a zip of plain arrays, deflate-compressed), read with np.load(allow_pickle=False): no
object arrays, so opening a file runs no code. Arrays (P answer passes, L layers, g / G the LR / HR grid sides):
  meta                uint8    UTF-8 JSON: format, version, model, question, history, image size, the answer's
                               text, tokens, stats, settings and unknown words, the grids, text config, ground truth
  image_png           uint8    the image, PNG (its longer side at most MAX_IMAGE_SIDE; meta keeps the original size,
                               which the grids and boxes refer to)
  lr_attention        float32  (P, L, g, g)
  hr_attended         int32    (P, L)
  hr_attention_share  float64  (P, L)
  avl_refresh         bool     (P, L)
  selected            bool     (N, G, G)  } only the layers that have one, stacked,
  hr_attention        float32  (N, G, G)  } each with `<name>_at` int32 (N, 2):
  avl_state           int8     (N, g, g)  } the (pass, layer) of every entry
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import PretrainedConfig

from .image import ImageError, open_image
from .results import Answer, AnswerStats
from .trace import LayerTrace, Trace

FORMAT = "flexattn-trace"
VERSION = 1
MAX_IMAGE_SIDE = 2048  # the views never draw more (they downscale to <= 1000 px); photos stay a few MB
MAX_UNPACKED_BYTES = 2**30  # a file that unpacks to more is refused before reading (zip-bomb guard)
SPARSE = {"selected": (bool, "hr"), "hr_attention": (np.float32, "hr"), "avl_state": (np.int8, "lr")}


class TraceFileError(ValueError):
    """A file that is not a readable flexattn trace; the message is one line meant for the user."""


@dataclass
class GroundTruth:
    """Where the question's answer lies: target boxes (x0, y0, x1, y1, the image's pixels), all of them and, when
    known, per answer token (a multi answer's k-th letter is about the k-th named shape)."""

    boxes: list[list[float]]
    token_boxes: list[list[list[float]]] | None = None

    def for_token(self, token: int) -> list[list[float]]:
        """The boxes answer token `token` is about (per-token boxes when known, else every box)."""
        if self.token_boxes is None:
            return self.boxes
        return self.token_boxes[token] if 0 <= token < len(self.token_boxes) else []


@dataclass
class TraceFile:
    answer: Answer  # with its trace; `answer.model` names the model that answered
    image: Image.Image
    image_size: tuple[int, int]  # (width, height) of the original image: the grids and boxes refer to it
    question: str
    history: list[tuple[str, str]]
    text_config: PretrainedConfig | None = None  # the LLM's config (the per-layer cost views read it)
    ground_truth: GroundTruth | None = None


def save_trace(answer: Answer, image: Image.Image, question: str, path: str | Path, *, history=(),
               text_config: PretrainedConfig | None = None, ground_truth: GroundTruth | None = None,
               image_size: tuple[int, int] | None = None) -> Path:
    """Write `answer` (it must carry a trace), the image and the question to `path` in one file (see the module
    docstring); the file appears whole or not at all. `history`: the (question, answer) turns before this one;
    `image_size`: the original's (width, height) when `image` is a smaller copy of it (an opened trace's)."""
    trace = answer.trace
    if trace is None or not trace.passes:
        raise TraceFileError("this answer has no trace to save (ask with trace=True)")
    path = Path(path)
    image = image.convert("RGB")
    size = tuple(image_size or image.size)
    if max(size) > MAX_IMAGE_SIDE:
        image = image.copy()
        image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), Image.Resampling.LANCZOS)
    png = io.BytesIO()
    image.save(png, format="PNG")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": answer.model,
        "question": question,
        "history": [list(turn) for turn in history],
        "image_size": list(size),
        "answer": {"text": answer.text, "mode": answer.mode, "token_ids": answer.token_ids, "tokens": answer.tokens,
                   "settings": answer.settings, "unknown_words": answer.unknown_words,
                   "stats": dataclasses.asdict(answer.stats)},
        "trace": {"lr_grid": trace.lr_grid, "hr_grid": trace.hr_grid, "selection_layer": trace.selection_layer},
        "text_config": json.loads(text_config.to_json_string(use_diff=False)) if text_config is not None else None,
        "ground_truth": dataclasses.asdict(ground_truth) if ground_truth is not None else None,
    }
    arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
              "image_png": np.frombuffer(png.getvalue(), dtype=np.uint8), **_trace_arrays(trace)}
    tmp = None
    try:
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(handle, "wb") as f:  # a file object: np.savez would add ".npz" to a name without it
            np.savez_compressed(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp's files are private; a saved trace is an ordinary file
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise TraceFileError(f"cannot write the trace file {path}: {err.strerror or err}") from None
    return path


def _trace_arrays(trace: Trace) -> dict[str, np.ndarray]:
    passes = trace.passes
    arrays = {
        "lr_attention": np.stack([[lt.lr_attention for lt in layers] for layers in passes]).astype(np.float32),
        "hr_attended": np.array([[lt.hr_attended for lt in layers] for layers in passes], dtype=np.int32),
        "hr_attention_share": np.array([[lt.hr_attention_share for lt in layers] for layers in passes],
                                       dtype=np.float64),
        "avl_refresh": np.array([[lt.avl_refresh for lt in layers] for layers in passes], dtype=bool),
    }
    for name, (dtype, grid) in SPARSE.items():
        side = trace.hr_grid if grid == "hr" else trace.lr_grid
        entries = [(p, lt.layer, getattr(lt, name)) for p, layers in enumerate(passes) for lt in layers
                   if getattr(lt, name) is not None]
        arrays[name] = (np.stack([np.asarray(v, dtype=dtype) for *_, v in entries]) if entries
                        else np.zeros((0, side, side), dtype=dtype))
        arrays[f"{name}_at"] = np.array([(p, l) for p, l, _ in entries], dtype=np.int32).reshape(-1, 2)
    return arrays


def load_trace(path: str | Path) -> TraceFile:
    """Read a file `save_trace` wrote; TraceFileError (one line) for anything else or anything damaged."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except FileNotFoundError:
        raise TraceFileError(f"trace file not found: {path}") from None
    except (zipfile.BadZipFile, OSError):
        raise TraceFileError(f"{path.name} is not a flexattn trace file (not an .npz archive)") from None
    if "meta.npy" not in {m.filename for m in members}:
        raise TraceFileError(f"{path.name} is not a flexattn trace file (it has no trace metadata)")
    if sum(m.file_size for m in members) > MAX_UNPACKED_BYTES:
        raise TraceFileError(f"{path.name} is too large to open (it unpacks to more than "
                             f"{MAX_UNPACKED_BYTES // 2**20} MiB)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            if not isinstance(meta, dict) or meta.get("format") != FORMAT:
                raise TraceFileError(f"{path.name} is not a flexattn trace file (its metadata says another format)")
            if int(meta.get("version", 0)) > VERSION:
                raise TraceFileError(f"{path.name} was written by a newer flexattn (trace format version "
                                     f"{meta['version']}; this one reads up to {VERSION})")
            return _read(meta, data)
    except TraceFileError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, OSError, EOFError, zipfile.BadZipFile, ImageError) as err:
        raise TraceFileError(f"{path.name} is a damaged flexattn trace file ({_first_line(err)})") from None


def _read(meta: dict, data) -> TraceFile:
    grids = meta["trace"]
    g, G, selection_layer = int(grids["lr_grid"]), int(grids["hr_grid"]), int(grids["selection_layer"])
    lr = data["lr_attention"]
    if lr.ndim != 4 or lr.shape[2:] != (g, g) or 0 in lr.shape[:2]:
        raise ValueError(f"LR maps of shape {lr.shape} for a {g}x{g} grid")
    n_pass, n_layer = lr.shape[:2]
    per_layer = {name: data[name] for name in ("hr_attended", "hr_attention_share", "avl_refresh")}
    if any(v.shape != (n_pass, n_layer) for v in per_layer.values()):
        raise ValueError("per-layer counts do not match the LR maps")
    sparse = {}
    for name, (dtype, grid) in SPARSE.items():
        values, at, side = data[name], data[f"{name}_at"], G if grid == "hr" else g
        if values.dtype != np.dtype(dtype) or values.shape[1:] != (side, side) or at.shape != (len(values), 2):
            raise ValueError(f"{name} entries of shape {values.shape} for a {side}x{side} grid")
        if len(at) and not ((at >= 0).all() and (at[:, 0] < n_pass).all() and (at[:, 1] < n_layer).all()):
            raise ValueError(f"{name} entries outside the trace")
        sparse[name] = {(int(p), int(l)): values[i] for i, (p, l) in enumerate(at)}
    trace = Trace(g, G, selection_layer)
    for p in range(n_pass):
        trace.passes.append([
            LayerTrace(layer=l, lr_attention=lr[p, l], hr_attended=int(per_layer["hr_attended"][p, l]),
                       hr_attention_share=float(per_layer["hr_attention_share"][p, l]),
                       hr_attention=sparse["hr_attention"].get((p, l)), selected=sparse["selected"].get((p, l)),
                       avl_state=sparse["avl_state"].get((p, l)), avl_refresh=bool(per_layer["avl_refresh"][p, l]))
            for l in range(n_layer)
        ])
    fields = meta["answer"]
    answer = Answer(text=str(fields["text"]), mode=str(fields["mode"]), token_ids=[int(t) for t in fields["token_ids"]],
                    tokens=[str(t) for t in fields["tokens"]], stats=AnswerStats.from_dict(fields["stats"]),
                    trace=trace, settings=dict(fields["settings"]),
                    unknown_words=[str(w) for w in fields.get("unknown_words", [])], model=str(meta.get("model", "")))
    width, height = (int(v) for v in meta["image_size"])
    image = open_image(bytes(data["image_png"])).image
    truth = meta.get("ground_truth")
    return TraceFile(
        answer=answer, image=image, image_size=(width, height), question=str(meta["question"]),
        history=[(str(q), str(a)) for q, a in meta.get("history", [])],
        text_config=PretrainedConfig.from_dict(meta["text_config"]) if meta.get("text_config") else None,
        ground_truth=GroundTruth(**truth) if truth else None,
    )


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
