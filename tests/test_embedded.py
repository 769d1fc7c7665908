"""The shipped embedded model (assets/flexattn-tiny): loads with no arguments and reads what only HR shows.

Every sample here is held out (seeds >= 10_000_000, never used in training or for choosing settings).
"""

import json
from pathlib import Path

import pytest

from flexattn.loading import EMBEDDED_MODEL
from flexattn.pipeline import FlexVLM
from flexattn.synthetic import make_sample

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
HELDOUT = 10_000_000

# (seed, family): per family, the first held-out samples that flex answers and lowres does not, so they pin this
# checkpoint's behaviour (found by scanning seeds from HELDOUT; the rate tests below measure how often it happens).
# Spatial is left out: this checkpoint answers left/right at chance in every mode (held-out flex 46 %, lowres 52 %),
# so a sample it gets right would pin luck, not a skill (see assets/flexattn-tiny/TRAINING.md).
SAMPLES = [
    (HELDOUT + 0, "attribute"),  # what colour is the shape marked n ?
    (HELDOUT + 2, "attribute"),  # what colour is the shape marked x ?
    (HELDOUT + 3, "attribute"),  # what letter is on the purple triangle ?
    (HELDOUT + 0, "multi"),  # what letters are on the yellow diamond and the orange circle ?
    (HELDOUT + 1, "multi"),  # what letters are on the yellow square and the purple diamond ?
]


@pytest.fixture(scope="module")
def vlm():
    return FlexVLM.load()


def test_embedded_model_ships_as_a_flexattention_checkpoint():
    config = json.loads((EMBEDDED_MODEL / "config.json").read_text())
    assert config["model_type"] == "llava" and config["flex_attention"]["selection_layer"] >= 1
    for name in ("model.safetensors", "tokenizer.json", "preprocessor_config.json", "training_info.json"):
        assert (EMBEDDED_MODEL / name).is_file(), name
    size = sum(p.stat().st_size for p in EMBEDDED_MODEL.iterdir() if p.is_file())
    assert size <= 50 * 2**20


def test_default_load_is_the_trained_embedded_model(vlm):
    assert Path(vlm.name).resolve() == EMBEDDED_MODEL.resolve()
    assert vlm.layout == "transformers" and not vlm.untrained_hr
    assert not vlm.settings.untrained_hr_projections


@pytest.mark.parametrize("seed,family", SAMPLES)
def test_flex_reads_what_lowres_cannot(vlm, seed, family):
    assert seed >= HELDOUT
    sample = make_sample(seed, family)
    flex = vlm.answer(sample.image, sample.question, mode="flex", max_new_tokens=12)
    low = vlm.answer(sample.image, sample.question, mode="lowres", max_new_tokens=12)
    assert flex.text == sample.answer
    assert low.text != flex.text
    # selection is a small part of the HR grid
    assert 0 < flex.stats.hr_attended_mean <= 0.35 * flex.stats.hr_tokens


def _letters_right(vlm, samples, mode):
    """Answer letters right, position by position, over samples whose answers are letters."""
    right = 0
    for s in samples:
        said = vlm.answer(s.image, s.question, mode=mode, max_new_tokens=12, trace=False).text.split()
        right += sum(a == b for a, b in zip(said, s.answer.split()))
    return right


def test_flex_reads_letters_that_only_hr_shows(vlm):
    """Letters are legible only at HR, so lowres is near chance (1/12 a letter). Measured when this checkpoint was
    shipped: "what letter is on the {colour} {shape} ?" flex 15 of 29, lowres 1; multi answers' letters, position by
    position, flex 44 of 74, lowres 3. The margins below leave room for platform rounding, not for losing the skill."""
    attribute = [make_sample(HELDOUT + i, "attribute") for i in range(60)]
    letter = [s for s in attribute if s.question.startswith("what letter")]
    assert len(letter) >= 25
    assert _letters_right(vlm, letter, "flex") >= _letters_right(vlm, letter, "lowres") + 8
    multi = [make_sample(HELDOUT + i, "multi") for i in range(30)]
    assert _letters_right(vlm, multi, "flex") >= _letters_right(vlm, multi, "lowres") + 25


def test_multi_selection_moves_with_the_answer_token(vlm):
    """Each letter of a multi answer needs its own shape: the mask the last HR layer uses differs from token to
    token (the app's token slider shows it walking)."""
    sample = make_sample(HELDOUT + 1, "multi")
    answer = vlm.answer(sample.image, sample.question, mode="flex", max_new_tokens=12)
    last = len(answer.trace.passes[0]) - 1
    masks = [answer.trace.used_mask(t, last) for t in range(len(sample.answer.split()))]
    assert all(m is not None and m.any() for m in masks)
    assert any((a != b).any() for a, b in zip(masks, masks[1:]))


def test_examples_file_matches_its_images(vlm):
    """Per family (and the long multi set) at least two held-out examples, each answered right in flex, with one
    target box list per answer token inside the image."""
    from PIL import Image

    entries = json.loads((EXAMPLES / "examples.json").read_text())
    names = [e["image"].split("_")[0] for e in entries]
    for key in ("attribute", "spatial", "multi", "multi-long"):
        assert names.count(key) >= 2, key
    for e in entries:
        assert int(e["image"].split("_")[1].split(".")[0]) >= HELDOUT
        image = Image.open(EXAMPLES / e["image"])
        w, h = image.size
        assert len(e["token_boxes"]) == len(e["answer"].split())
        for x0, y0, x1, y1 in [b for boxes in e["token_boxes"] for b in boxes] + e["target_boxes"]:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    for e in entries[::3]:  # one per family: still answered right by the shipped model
        answer = vlm.answer(Image.open(EXAMPLES / e["image"]), e["question"], mode="flex", max_new_tokens=12)
        assert answer.text == e["answer"], e["image"]
