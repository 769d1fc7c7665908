"""Tiny copies of the papers' benchmarks in their published layouts (and as hub-style datasets), for tests."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from .conftest import random_image

VSTAR_BOXES = {"direct_attributes": [[20, 30, 40, 20]], "relative_position": [[10, 10, 30, 30], [140, 90, 40, 40]]}
TEXTVQA_ROWS = [  # (question, 10 human answers)
    ("what is written on the sign ?", ["stop"] * 6 + ["stop sign"] * 4),
    ("what number is on the shirt ?", ["2"] * 2 + ["two"] + ["5"] * 7),
    ("what brand is this ?", ["coca cola"] * 10),
]
MAGNIFIER_ROWS = [  # (id, instruction, answer)
    ("m0", "What colour is the shape ? A. red, B. blue, C. green, D. white", "A"),
    ("m1", "Is the shape left of the letter? A. yes, B. no", "B"),
]


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_vstar(root: Path) -> Path:
    """<root>/<subset>/sa_<i>.jpg beside sa_<i>.json, two questions per subset."""
    for s, (subset, boxes) in enumerate(VSTAR_BOXES.items()):
        (root / subset).mkdir(parents=True)
        for i in range(2):
            random_image(200, 150, seed=10 * s + i).save(root / subset / f"sa_{i}.jpg")
            (root / subset / f"sa_{i}.json").write_text(json.dumps({
                "target_object": [f"object {k}" for k in range(len(boxes))], "bbox": boxes,
                "question": "what is the colour of the shape ?", "options": ["red", "blue", "green", "white"]}))
    return root


def write_textvqa(root: Path) -> Path:
    """TextVQA_0.5.1_val.json beside train_images/<image_id>.jpg; the first two questions share an image."""
    (root / "train_images").mkdir(parents=True)
    data = []
    for i, (question, answers) in enumerate(TEXTVQA_ROWS):
        image_id = f"img{max(i - 1, 0):02d}"
        random_image(160, 120, seed=i).save(root / "train_images" / f"{image_id}.jpg")
        data.append({"question_id": 100 + i, "question": question, "image_id": image_id, "answers": answers,
                     "image_classes": ["sign"], "set_name": "val"})
    (root / "TextVQA_0.5.1_val.json").write_text(json.dumps({"dataset_type": "val", "data": data}))
    return root


def write_textvqa_parquet(root: Path) -> Path:
    """The same questions as a hub dataset's files: data/validation-*.parquet with an image column."""
    import datasets

    rows = {"question_id": [], "question": [], "image_id": [], "answers": [], "image": []}
    for i, (question, answers) in enumerate(TEXTVQA_ROWS):
        rows["question_id"].append(100 + i)
        rows["question"].append(question)
        rows["image_id"].append(f"img{i:02d}")
        rows["answers"].append(answers)
        rows["image"].append({"bytes": png_bytes(random_image(160, 120, seed=i)), "path": None})
    features = datasets.Features({"question_id": datasets.Value("int64"), "question": datasets.Value("string"),
                                  "image_id": datasets.Value("string"),
                                  "answers": datasets.Sequence(datasets.Value("string")), "image": datasets.Image()})
    (root / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(root / "data" / "validation-00000.parquet"))
    return root


def write_magnifier_authors(root: Path) -> Path:
    """FlexAttention's copy: data_instructions.json beside images.json (base64 images)."""
    root.mkdir(parents=True)
    data = {key: {"instruction": instruction, "answer": answer, "image_ids": [f"img_{key}"], "rel_ins_ids": []}
            for key, instruction, answer in MAGNIFIER_ROWS}
    images = {f"img_{key}": base64.b64encode(png_bytes(random_image(180, 120, seed=i))).decode()
              for i, (key, _, _) in enumerate(MAGNIFIER_ROWS)}
    (root / "data_instructions.json").write_text(json.dumps({"meta": {}, "data": data}))
    (root / "images.json").write_text(json.dumps(images))
    return root


def write_magnifier_dataset(root: Path) -> Path:
    """The hub dataset's columns (id, instruction, answer, images: one image), written by save_to_disk."""
    import datasets

    rows = {"id": [], "instruction": [], "answer": [], "images": []}
    for i, (key, instruction, answer) in enumerate(MAGNIFIER_ROWS):
        rows["id"].append(key)
        rows["instruction"].append(instruction)
        rows["answer"].append(answer)
        rows["images"].append([{"bytes": png_bytes(random_image(180, 120, seed=i)), "path": None}])
    features = datasets.Features({"id": datasets.Value("string"), "instruction": datasets.Value("string"),
                                  "answer": datasets.Value("string"), "images": datasets.Sequence(datasets.Image())})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(root))
    return root
