"""The shipped embedded model (assets/flexattn-tiny): loads with no arguments and reads what only HR shows.

The samples are fixed held-out seeds (>= 10_000_000, never used in training), one or more per family.
"""

import json
from pathlib import Path

import pytest

from flexattn.loading import EMBEDDED_MODEL
from flexattn.pipeline import FlexVLM
from flexattn.synthetic import make_sample

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"

# The shipped checkpoint reads what only HR shows when a question is about one shape (held-out: flex 87 % on
# attribute questions, lowres 14 %), and not yet the reading family (0 %) or left/right (chance); see its
# TRAINING.md. The first held-out reading samples are among its misses. strict: once a retrained model answers
# them, this marker must be removed.
NOT_YET_READ = pytest.mark.xfail(
    reason="assets/flexattn-tiny does not yet read the reading family (0 % held-out)",
    strict=True,
)

# (seed, family): held-out samples. Attribute: of seeds 10_000_000 + 3i, the first colour question and the first
# letter question that flex answers and lowres does not (10_000_000 is a flex miss; at 10_000_003 lowres guesses
# the letter too), so they pin this checkpoint's behaviour; test_flex_reads_what_only_hr_shows measures the rates.
# Reading: the first two, unfiltered.
SAMPLES = [
    (10_000_006, "attribute"),
    (10_000_009, "attribute"),
    pytest.param(10_000_002, "reading", marks=NOT_YET_READ),
    pytest.param(10_000_005, "reading", marks=NOT_YET_READ),
]


@pytest.fixture(scope="module")
def vlm():
    return FlexVLM.load()


def test_embedded_model_ships_as_a_flexattention_checkpoint():
    config = json.loads((EMBEDDED_MODEL / "config.json").read_text())
    assert config["model_type"] == "llava" and config["flex_attention"]["selection_layer"] >= 1
    assert (EMBEDDED_MODEL / "model.safetensors").is_file()
    assert (EMBEDDED_MODEL / "tokenizer.json").is_file()
    assert (EMBEDDED_MODEL / "preprocessor_config.json").is_file()
    size = sum(p.stat().st_size for p in EMBEDDED_MODEL.iterdir() if p.is_file())
    assert size <= 50 * 2**20


def test_default_load_is_the_trained_embedded_model(vlm):
    assert Path(vlm.name).resolve() == EMBEDDED_MODEL.resolve()
    assert vlm.layout == "transformers" and not vlm.untrained_hr
    assert not vlm.settings.untrained_hr_projections


@pytest.mark.parametrize("seed,family", SAMPLES)
def test_flex_reads_what_lowres_cannot(vlm, seed, family):
    assert seed >= 10_000_000
    sample = make_sample(seed, family)
    flex = vlm.answer(sample.image, sample.question, mode="flex", max_new_tokens=12)
    low = vlm.answer(sample.image, sample.question, mode="lowres", max_new_tokens=12)
    assert flex.text == sample.answer
    assert low.text != flex.text
    # selection is a small part of the HR grid
    assert 0 < flex.stats.hr_attended_mean <= 0.35 * flex.stats.hr_tokens


@pytest.mark.parametrize("prefix", ["what letter", "what colour"])
def test_flex_reads_what_only_hr_shows(vlm, prefix):
    """Held-out "what letter is on the {colour} {shape} ?" and "what colour is the shape marked {letter} ?"
    questions: letters are only legible at HR, so lowres is near chance (1/12, 1/6) and flex is right far more
    often, through its own selection (for colours: selecting every shape and finding the letter among them)."""
    samples = [make_sample(10_000_000 + 3 * i, "attribute") for i in range(60)]
    samples = [s for s in samples if s.question.startswith(prefix)]
    assert len(samples) >= 25
    right = {mode: sum(vlm.answer(s.image, s.question, mode=mode, max_new_tokens=4).text == s.answer for s in samples)
             for mode in ("lowres", "flex")}
    assert right["flex"] >= right["lowres"] + 15, right


def test_examples_file_matches_its_images():
    from PIL import Image

    entries = json.loads((EXAMPLES / "examples.json").read_text())
    assert 6 <= len(entries) <= 8
    families = [e["family"] for e in entries]
    assert {"attribute", "spatial", "reading"} <= set(families) and families.count("reading") >= 2
    for e in entries:
        image = Image.open(EXAMPLES / e["image"])
        w, h = image.size
        assert e["question"] and e["answer"] and e["target_boxes"]
        for x0, y0, x1, y1 in e["target_boxes"]:
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
