"""scripts/hr_spatial_probe.py and train_embedded's "spatial_row" questions (TRAINING.md item 26)."""

import random

from .conftest import load_script


def _meta(centres, family="spatial"):
    letters = "ekpr"
    shapes = [{"kind": "circle", "colour": "red", "letter": letters[i], "centre": [x, y],
               "box": [x - 20, y - 20, x + 21, y + 21]} for i, (x, y) in enumerate(centres)]
    return {"shapes": shapes, "family": family, "kind": "spatial", "question": "", "answer": "", "targets": [0, 1]}


def test_row_questions_pair_two_letters_on_one_hr_row():
    te = load_script("train_embedded")
    # e and k share a row; p is far below both; r shares p's column region but not a row with anyone
    meta = _meta([(49, 105), (203, 105), (119, 259), (287, 203)])
    rng = random.Random(0)
    answers = set()
    for _ in range(40):
        q = te.make_question(meta, "spatial_row", rng, 2)
        assert {q.question.split()[2], q.question.split()[-2]} == {"e", "k"}
        assert q.answer == ("left" if q.question.split()[2] == "e" else "right")
        first = [49, 105] if q.answer == "left" else [203, 105]
        assert len(q.targets[0]) == 2 and q.reads[0][0] == first and len(q.reads[0]) == 2  # glyphs, first-named first
        answers.add(q.answer)
    assert answers == {"left", "right"}
    # every shape is the selection target without `among`, as for any question that names a letter
    assert len(te.make_question(meta, "spatial_row", rng).targets[0]) == 4
    assert te.make_question(_meta([(49, 105), (203, 147)]), "spatial_row", rng) is None  # no shared row


def test_heldout_sets_keep_rows_and_other_pairs_apart():
    probe = load_script("hr_spatial_probe")
    one_row, two_rows = [(49, 105), (203, 105)], [(49, 105), (203, 147)]
    metas = [_meta(one_row), _meta(two_rows), _meta(one_row, "attribute")]
    sets = probe.heldout_sets(metas, among=2)
    assert [i for i, _ in sets["row"]] == [0, 2]
    assert [i for i, _ in sets["other"]] == [1]
    assert all(probe.same_row(q) for _, q in sets["row"]) and not probe.same_row(sets["other"][0][1])
    assert [i for i, _ in sets["attribute"]] == [2]
