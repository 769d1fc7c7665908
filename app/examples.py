"""Example images and questions from `assets/examples/` (or $FLEXATTN_EXAMPLES_DIR).

`examples.json` is a list of {"image": "file.png", "question": "...", "answer": "...", "family": "...",
"target_boxes": [[x0, y0, x1, y1], ...], "token_boxes": [[[x0, y0, x1, y1], ...], ...]} (boxes in the image's
pixels; `token_boxes`, optional, lists per answer token the boxes that token is about). Without it, the
directory's images are offered without questions; a missing directory or a malformed file gives no examples
(logged), never a crash.

Ground truth belongs to an example's question about its image: an answer gets the boxes only when its image is
the example's (recognised by content, SHA-1 of the file bytes, so an uploaded copy counts) and its question is
the example's own (compared without case, spacing or control characters).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from flexattn.prompt import strip_controls
from flexattn.trace_file import GroundTruth

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO_ROOT / "assets" / "examples"
ENV_DIR = "FLEXATTN_EXAMPLES_DIR"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

log = logging.getLogger(__name__)


@dataclass
class Example:
    image: str  # absolute path
    question: str = ""
    answer: str = ""
    family: str = ""
    target_boxes: list[list[float]] = field(default_factory=list)
    sha1: str = ""
    token_boxes: list[list[list[float]]] | None = None  # per answer token (None: not given)

    @property
    def ground_truth(self) -> GroundTruth | None:
        if not self.target_boxes and not self.token_boxes:
            return None
        boxes = self.target_boxes or [box for token in self.token_boxes for box in token]
        return GroundTruth(boxes, self.token_boxes)


def file_sha1(path: str | Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def examples_dir(directory: str | Path | None = None) -> Path:
    return Path(directory or os.environ.get(ENV_DIR) or DEFAULT_DIR)


def load_examples(directory: str | Path | None = None) -> list[Example]:
    root = examples_dir(directory)
    if not root.is_dir():
        return []
    index = root / "examples.json"
    examples: list[Example] = []
    if index.is_file():
        try:
            entries = json.loads(index.read_text())
            if not isinstance(entries, list):
                raise ValueError("the file must hold a list of entries")
        except (OSError, ValueError) as err:
            log.warning("ignoring %s: %s", index, err)
            entries = []
        for entry in entries:
            try:
                path = (root / str(entry["image"])).resolve()
                if not path.is_file() or root.resolve() not in path.parents:
                    raise ValueError(f"no image file {entry['image']!r} in {root}")
                boxes = _boxes(entry.get("target_boxes") or [])
                token_boxes = entry.get("token_boxes")
                token_boxes = [_boxes(token) for token in token_boxes] if token_boxes is not None else None
                examples.append(Example(str(path), str(entry.get("question", "")), str(entry.get("answer", "")),
                                        str(entry.get("family", "")), boxes, file_sha1(path), token_boxes))
            except (KeyError, TypeError, ValueError) as err:
                log.warning("skipping an entry of %s: %s", index, err)
    else:
        for path in sorted(root.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                examples.append(Example(str(path.resolve()), sha1=file_sha1(path)))
    return examples


def _boxes(entries) -> list[list[float]]:
    boxes = [[float(v) for v in box] for box in entries]
    if any(len(b) != 4 for b in boxes):
        raise ValueError("boxes must be [x0, y0, x1, y1]")
    return boxes


def question_key(question: str) -> str:
    """How questions are matched to an example's: no case, no control characters, single spaces."""
    return " ".join(strip_controls(question or "").lower().split())


class GroundTruths:
    """The examples' ground truth, looked up by (image content, question)."""

    def __init__(self, examples: list[Example]):
        self._truths = {(e.sha1, question_key(e.question)): e.ground_truth for e in examples
                        if e.question and e.ground_truth is not None}

    def lookup(self, image_sha1: str | None, question: str) -> GroundTruth | None:
        return self._truths.get((image_sha1, question_key(question)))
