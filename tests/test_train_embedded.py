"""scripts/train_embedded.py: what its questions ask each layer's LR map to find."""

import random

from .conftest import load_script


def _meta():
    kinds = (("circle", "red", "e", 49), ("square", "blue", "k", 203), ("diamond", "green", "p", 287))
    shapes = [{"kind": k, "colour": c, "letter": l, "centre": [x, 105], "box": [x - 20, 85, x + 21, 126]}
              for k, c, l, x in kinds]
    return {"shapes": shapes, "family": "attribute", "kind": "colour_of", "question": "", "answer": "", "targets": [1]}


def test_letter_naming_questions_target_every_shape_early_and_the_named_one_late():
    te = load_script("train_embedded")
    meta, rng = _meta(), random.Random(0)
    for _ in range(10):
        q = te.make_question(meta, "colour_of", rng)
        named = next(s for s in meta["shapes"] if s["colour"] == q.answer)
        assert q.question.endswith(f"marked {named['letter']} ?")
        assert q.targets == [[s["box"] for s in meta["shapes"]]] and q.named == [[named["box"]]]
        batch = te.make_batch(te_tokenizer(), [q], narrow=("colour_of",))
        early, late = batch.target_cells[0, 0], batch.late_target_cells[0, 0]  # the answering row's LR cells
        assert late.sum() > 0 and bool((late <= early).all()) and early.sum() > late.sum()
        # kinds not narrowed keep every shape in the late layers too
        same = te.make_batch(te_tokenizer(), [q], narrow=())
        assert bool((same.target_cells == same.late_target_cells).all())
    # a question about the shape it names directly has the same target early and late
    q = te.make_question(meta, "letter_of", rng)
    batch = te.make_batch(te_tokenizer(), [q], narrow=("colour_of", "letter_of"))
    assert bool((batch.target_cells == batch.late_target_cells).all())


def te_tokenizer():
    from flexattn.synthetic import build_tokenizer

    return build_tokenizer()
