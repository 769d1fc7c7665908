"""Trace files (flexattn.trace_file): a lossless round trip with no pickle, and one-line errors for anything else;
the question checks that go with them (unknown words, control characters)."""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile

import numpy as np
import pytest
from transformers import AutoTokenizer

from flexattn.prompt import PromptError, check_question, unknown_words
from flexattn.trace_file import GroundTruth, TraceFileError, load_trace, save_trace

from .conftest import make_tokenizer, random_image, write_sentencepiece_tokenizer

QUESTION = "what colour is the cat ?"


@pytest.fixture(scope="module")
def answers(tiny_vlm):
    """A flex answer with A-VL (every optional trace field present) and a lowres one (no HR entries at all)."""
    image = random_image(300, 200, seed=3)
    return image, {
        "flex": tiny_vlm.answer(image, QUESTION, max_new_tokens=4, avl=True),
        "lowres": tiny_vlm.answer(image, QUESTION, mode="lowres", max_new_tokens=2),
    }


def _same_traces(a, b) -> None:
    assert (a.lr_grid, a.hr_grid, a.selection_layer) == (b.lr_grid, b.hr_grid, b.selection_layer)
    assert len(a.passes) == len(b.passes)
    for pa, pb in zip(a.passes, b.passes):
        assert [lt.layer for lt in pa] == [lt.layer for lt in pb]
        for x, y in zip(pa, pb):
            for name in ("lr_attention", "hr_attention", "selected", "avl_state"):
                u, v = getattr(x, name), getattr(y, name)
                assert (u is None) == (v is None), name
                if u is not None:
                    assert u.dtype == v.dtype and np.array_equal(u, v), name
            assert (x.hr_attended, x.hr_attention_share, x.avl_refresh) == (y.hr_attended, y.hr_attention_share,
                                                                            y.avl_refresh)


@pytest.mark.parametrize("mode", ["flex", "lowres"])
def test_a_saved_trace_reads_back_exactly(answers, tiny_vlm, tmp_path, mode):
    image, by_mode = answers
    answer = by_mode[mode]
    truth = GroundTruth([[10, 20, 60, 80]], [[[10, 20, 60, 80]], []])
    path = save_trace(answer, image, QUESTION, tmp_path / "run.trace", history=[("what is this ?", "red")],
                      text_config=tiny_vlm.model.config.text_config, ground_truth=truth)
    assert path == tmp_path / "run.trace" and path.is_file()  # the name as given (np.savez would add .npz)
    opened = load_trace(path)
    _same_traces(answer.trace, opened.answer.trace)
    assert opened.answer.to_json(masks=True) == answer.to_json(masks=True)  # text, tokens, stats, settings, masks
    assert opened.answer.stats == answer.stats and opened.answer.unknown_words == ["cat"]
    assert opened.question == QUESTION and opened.history == [("what is this ?", "red")]
    assert opened.image_size == image.size and np.array_equal(np.asarray(opened.image), np.asarray(image))
    assert opened.text_config.hidden_size == tiny_vlm.model.config.text_config.hidden_size
    assert opened.ground_truth == truth and opened.ground_truth.for_token(1) == [] and truth.for_token(5) == []
    with np.load(path, allow_pickle=False) as data:  # plain arrays only: nothing in the file needs unpickling
        assert all(data[name].dtype != object for name in data.files)


def test_a_large_image_is_stored_smaller_but_keeps_its_geometry(answers, tmp_path):
    _, by_mode = answers
    big = random_image(3000, 1000, seed=4)
    opened = load_trace(save_trace(by_mode["lowres"], big, QUESTION, tmp_path / "big.npz"))
    assert max(opened.image.size) == 2048 and opened.image_size == (3000, 1000)


def _npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def test_foreign_and_damaged_files_give_one_line_errors(answers, tmp_path):
    image, by_mode = answers
    good = save_trace(by_mode["flex"], image, QUESTION, tmp_path / "good.npz")
    png = tmp_path / "photo.npz"
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    png.write_bytes(buf.getvalue())
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    other_meta = _npz(tmp_path / "other.npz", meta=np.frombuffer(json.dumps({"format": "x"}).encode(), np.uint8))
    newer = tmp_path / "newer.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(newer, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "meta.npy":
                meta = json.loads(bytes(np.load(io.BytesIO(data))).decode())
                buf = io.BytesIO()
                np.save(buf, np.frombuffer(json.dumps({**meta, "version": 99}).encode(), np.uint8))
                data = buf.getvalue()
            dst.writestr(item, data)
    broken = tmp_path / "broken.npz"  # a real trace whose masks no longer fit its grid
    with np.load(good, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    _npz(broken, **{**arrays, "selected": arrays["selected"][:, :3]})
    pickled = _npz(tmp_path / "pickled.npz", meta=arrays["meta"], lr_attention=np.array([{"x": 1}], dtype=object))
    cases = {
        tmp_path / "missing.npz": "not found",
        png: "not a flexattn trace file .not an .npz archive",
        truncated: "not a flexattn trace file",
        _npz(tmp_path / "arrays.npz", x=np.zeros(3)): "has no trace metadata",
        other_meta: "another format",
        newer: "newer flexattn",
        broken: "damaged",
        pickled: "damaged",  # an object array is refused (allow_pickle=False), never unpickled
    }
    for path, message in cases.items():
        with pytest.raises(TraceFileError, match=message) as err:
            load_trace(path)
        assert "\n" not in str(err.value)


def test_saving_needs_a_trace_and_a_writable_place(answers, tiny_vlm, tmp_path):
    image, by_mode = answers
    with pytest.raises(TraceFileError, match="no trace"):
        save_trace(dataclasses.replace(by_mode["flex"], trace=None), image, QUESTION, tmp_path / "x.npz")
    with pytest.raises(TraceFileError, match="cannot write"):
        save_trace(by_mode["flex"], image, QUESTION, tmp_path / "no" / "such" / "dir.npz")
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


# ---- the question ------------------------------------------------------------------------------------------
def test_unknown_words_of_a_word_level_tokenizer():
    tok = make_tokenizer()
    assert unknown_words(tok, QUESTION) == ["cat"]
    assert unknown_words(tok, "what colour is the cat ? cat picture") == ["cat", "picture"]  # each once, in order
    assert unknown_words(tok, "which letter is on the red circle ?") == ["circle"]
    assert unknown_words(tok, "what is this ?") == []


def test_unknown_words_of_a_subword_tokenizer(tmp_path):
    """A sentencepiece tokenizer spells any word it has the characters for: nothing is unknown but characters it
    has no piece for, which it drops (this one has no byte pieces; LLaMA's has one for every byte: nothing at all)."""
    write_sentencepiece_tokenizer(tmp_path, vocab_size=120)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert unknown_words(tok, "what colour is the cat in this picture ?") == []
    assert unknown_words(tok, "what colour is the 猫 ?") == ["猫"]


def test_the_question_loses_its_control_characters():
    assert check_question("  what\x00 is\x1b[31m this\x7f\x85 ?\t\r\nok ") == "what is[31m this ? \nok"
    with pytest.raises(PromptError, match="empty"):
        check_question("\x00\x01 \x1b")
