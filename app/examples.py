"""Example images and questions from `assets/examples/` (or $FLEXATTN_EXAMPLES_DIR).

`examples.json` is a list of {"image": "file.png", "question": "...", "answer": "...", "family": "...",
"target_boxes": [[x0, y0, x1, y1], ...]} (boxes in the image's pixels). Without it, the directory's images are
offered without questions; a missing directory or a malformed file gives no examples (logged), never a crash.
Examples are recognised again by content (SHA-1 of the file bytes), so an uploaded copy of an example image
also gets its ground-truth boxes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

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
                boxes = [[float(v) for v in box] for box in entry.get("target_boxes") or []]
                if any(len(b) != 4 for b in boxes):
                    raise ValueError("target_boxes entries must be [x0, y0, x1, y1]")
                examples.append(Example(str(path), str(entry.get("question", "")), str(entry.get("answer", "")),
                                        str(entry.get("family", "")), boxes, file_sha1(path)))
            except (KeyError, TypeError, ValueError) as err:
                log.warning("skipping an entry of %s: %s", index, err)
    else:
        for path in sorted(root.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                examples.append(Example(str(path.resolve()), sha1=file_sha1(path)))
    return examples


def targets_by_sha1(examples: list[Example]) -> dict[str, list[list[float]]]:
    return {e.sha1: e.target_boxes for e in examples if e.target_boxes}
