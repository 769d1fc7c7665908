"""The papers' benchmarks read in their published layouts, as a list of `Item`s (no model code here).

* V* Bench (`craigwu/vstar_bench`): <root>/<subset>/<id>.json beside the image <id>.jpg|png|...; the JSON holds
  "question", "options" (the correct one first), "target_object" (names) and "bbox" (one [x, y, w, h] box in
  pixels per target object). The boxes exist only in these per-image files (the hub's table view drops them), so
  a hub id is fetched as the repository's files.
* TextVQA val: <root>/TextVQA_0.5.1_val.json, {"data": [{"question_id", "question", "image_id", "answers": [10
  strings], ...}]}, beside <root>/train_images/<image_id>.jpg (the val images live in the train folder); or a
  dataset with the same columns and an "image" column (e.g. `facebook/textvqa`, split "validation").
* MagnifierBench (`Otter-AI/MagnifierBench`, split "test"): rows with "id", "instruction" ("Question? A. x, B. y,
  C. z, D. w"), "answer" (the letter) and "images" (one image); or the copy FlexAttention's authors distribute,
  <root>/data_instructions.json ({"data": {id: {"instruction", "answer", "image_ids"}}}) beside <root>/images.json
  ({image_id: base64 image}).

A hub dataset is opened with `datasets`: by hub id, from a directory of its files (parquet, json), or from a
directory written by `Dataset.save_to_disk`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from .scoring import split_instruction

BENCH_NAMES = ("vstar", "textvqa", "magnifierbench")
VSTAR_SUBSETS = ("direct_attributes", "relative_position")
TEXTVQA_FILE = "TextVQA_0.5.1_val.json"
DEFAULT_SPLITS = {"textvqa": "validation", "magnifierbench": "test"}


class DataError(ValueError):
    """A benchmark that cannot be read; the message is meant for the user."""


@dataclass
class Item:
    """One question of a benchmark.

    key: unique within the benchmark (what a results file resumes by); image: a path, bytes or PIL image, or a
    function returning one (images read from a dataset only when scored); subset: V*'s subset; options: V*'s
    options, the correct one first, or MagnifierBench's {letter: text}; answers: TextVQA's 10 human answers or
    MagnifierBench's letter; boxes: the target objects' (x0, y0, x1, y1) pixel boxes in the original image.
    """

    key: str
    image: object
    question: str
    subset: str = ""
    options: list[str] | dict[str, str] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)

    def image_source(self):
        """What `flexattn.image.load_image` opens."""
        return self.image() if callable(self.image) else self.image


def load_benchmark(bench: str, source: str | Path, split: str | None = None, limit: int | None = None) -> list[Item]:
    """Items of `bench` (one of BENCH_NAMES) from `source`: a directory in the published layout, a dataset
    directory, or a hub id; the first `limit` only if given."""
    if bench not in BENCH_NAMES:
        raise DataError(f"unknown benchmark {bench!r}; choose one of {', '.join(BENCH_NAMES)}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, got {limit}")
    split = split or DEFAULT_SPLITS.get(bench)
    items = {"vstar": load_vstar, "textvqa": load_textvqa, "magnifierbench": load_magnifierbench}[bench](
        source, **({"split": split} if bench != "vstar" else {}))
    keys = [item.key for item in items]
    if len(set(keys)) != len(keys):
        raise DataError(f"{source}: question keys are not unique")
    return items[:limit] if limit else items


# ---- V* Bench ----------------------------------------------------------------------------------------------------

def load_vstar(source: str | Path, subsets=VSTAR_SUBSETS) -> list[Item]:
    root = Path(source)
    if not root.is_dir() and _looks_like_hub_id(source):
        root = _hub_snapshot(str(source))
    items = []
    for subset in subsets:
        for annotation in sorted((root / subset).glob("*.json")):
            data = _read_json(annotation)
            image = next((p for p in sorted(annotation.parent.glob(annotation.stem + ".*")) if p.suffix != ".json"),
                         None)
            if image is None:
                raise DataError(f"no image beside {annotation}")
            if "question" not in data or not data.get("options"):
                raise DataError(f"{annotation} has no question or no options")
            boxes = [(x, y, x + w, y + h) for x, y, w, h in data.get("bbox", [])]
            items.append(Item(key=f"{subset}/{annotation.stem}", image=image, question=data["question"],
                              subset=subset, options=list(data["options"]), boxes=boxes,
                              targets=list(data.get("target_object", []))))
    if not items:
        raise DataError(f"no V* Bench annotations under {root} (expected {subsets[0]}/*.json)")
    return items


# ---- TextVQA -----------------------------------------------------------------------------------------------------

def load_textvqa(source: str | Path, split: str = "validation") -> list[Item]:
    root = Path(source)
    if (root / TEXTVQA_FILE).is_file():
        rows = _read_json(root / TEXTVQA_FILE).get("data")
        if not isinstance(rows, list):
            raise DataError(f"{root / TEXTVQA_FILE} has no \"data\" list")
        images = root / "train_images"
        items = [_textvqa_item(row, images / f"{row.get('image_id')}.jpg") for row in rows]
        missing = [item.image for item in items if not item.image.is_file()]
        if missing:  # fail before a long model load, not at the n-th question
            raise DataError(f"{len(missing)} TextVQA image(s) missing (first: {missing[0]})")
        return items
    if root.is_dir() and not _is_dataset_dir(root):
        raise DataError(f"{root} holds neither {TEXTVQA_FILE} nor a dataset")
    dataset = open_dataset(source, split)
    _require_columns(dataset, ("question_id", "question", "answers", "image"), source)
    columns = ["question_id", "question", "answers"]
    return [_textvqa_item(row, partial(_dataset_image, dataset, i, "image"))
            for i, row in enumerate(dataset.select_columns(columns))]


def _textvqa_item(row: dict, image) -> Item:
    try:
        return Item(key=str(row["question_id"]), image=image, question=row["question"], answers=list(row["answers"]))
    except KeyError as err:
        raise DataError(f"a TextVQA question has no {err.args[0]!r} field") from None


# ---- MagnifierBench ----------------------------------------------------------------------------------------------

def load_magnifierbench(source: str | Path, split: str = "test") -> list[Item]:
    root = Path(source)
    if (root / "data_instructions.json").is_file():
        rows = _read_json(root / "data_instructions.json").get("data", {})
        images = _read_json(root / "images.json") if (root / "images.json").is_file() else {}
        items = []
        for key, row in rows.items():
            image_ids = [i for i in row.get("image_ids", []) if i in images]
            if not image_ids:
                raise DataError(f"MagnifierBench question {key} has no image in {root / 'images.json'}")
            items.append(_magnifier_item(key, row, partial(_decode_base64, images[image_ids[0]])))
        return items
    if root.is_dir() and not _is_dataset_dir(root):
        raise DataError(f"{root} holds neither data_instructions.json nor a dataset")
    dataset = open_dataset(source, split)
    _require_columns(dataset, ("id", "instruction", "answer", "images"), source)
    return [_magnifier_item(str(row["id"]), row, partial(_dataset_image, dataset, i, "images"))
            for i, row in enumerate(dataset.select_columns(["id", "instruction", "answer"]))]


def _magnifier_item(key: str, row: dict, image) -> Item:
    question, options = split_instruction(row["instruction"])
    if row["answer"] not in options:
        raise DataError(f"MagnifierBench question {key}: answer {row['answer']!r} is not one of its options")
    return Item(key=str(key), image=image, question=row["instruction"], options=options, answers=[row["answer"]])


# ---- datasets and hub --------------------------------------------------------------------------------------------

def open_dataset(source: str | Path, split: str):
    """One split of a dataset: `Dataset.save_to_disk` output, a directory of data files, or a hub id."""
    import datasets  # heavy; only the dataset paths need it

    path = Path(source)
    try:
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(f"{source} has no split {split!r} (it has {', '.join(dataset)})")
                dataset = dataset[split]
            return dataset
        return datasets.load_dataset(str(source), split=split)
    except DataError:
        raise
    except Exception as err:  # a missing path, an unreachable hub, an unknown split: one line for the user
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"could not open {source} as a dataset ({reason})") from None


def _is_dataset_dir(path: Path) -> bool:
    markers = ("state.json", "dataset_dict.json")
    data_files = ("*.parquet", "*.arrow", "*.jsonl", "*.json", "*.csv")
    return any((path / m).is_file() for m in markers) or any(next(path.rglob(p), None) for p in data_files)


def _require_columns(dataset, columns, source) -> None:
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(f"{source} lacks the column(s) {', '.join(missing)} (it has {', '.join(dataset.column_names)})")


def _dataset_image(dataset, index: int, column: str):
    value = dataset[index][column]
    if isinstance(value, list):  # MagnifierBench: a list holding one image
        if not value:
            raise DataError(f"row {index} has no image")
        value = value[0]
    if isinstance(value, dict):  # an undecoded image feature
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str) and not Path(value).is_file():
        return _decode_base64(value)
    return value


def _decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise DataError("an image is neither a file nor base64 data") from None


def _looks_like_hub_id(source) -> bool:
    text = str(source)
    return text.count("/") == 1 and not text.startswith((".", "/")) and " " not in text


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, repo_type="dataset"))
    except Exception as err:  # offline, unknown repository: one line for the user
        raise DataError(f"could not fetch the dataset {repo_id} from the hub ({type(err).__name__}); download it "
                        "and give its directory") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {path}: {err}") from None
