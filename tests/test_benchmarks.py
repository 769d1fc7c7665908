"""The benchmark readers on tiny copies in each published layout, and through `datasets`."""

import pytest

from flexattn.benchmarks import DataError, load_benchmark
from flexattn.image import load_image

from .bench_fixtures import (
    MAGNIFIER_ROWS,
    TEXTVQA_ROWS,
    write_magnifier_authors,
    write_magnifier_dataset,
    write_textvqa,
    write_textvqa_parquet,
    write_vstar,
)


def test_vstar_reads_questions_options_and_target_boxes(tmp_path):
    items = load_benchmark("vstar", write_vstar(tmp_path))
    assert [it.key for it in items] == ["direct_attributes/sa_0", "direct_attributes/sa_1",
                                        "relative_position/sa_0", "relative_position/sa_1"]
    first, spatial = items[0], items[2]
    assert first.options[0] == "red" and first.targets == ["object 0"]
    assert first.boxes == [(20, 30, 60, 50)]  # [x, y, w, h] -> (x0, y0, x1, y1)
    assert spatial.boxes == [(10, 10, 40, 40), (140, 90, 180, 130)] and spatial.subset == "relative_position"
    assert load_image(first.image_source()).size == (200, 150)
    assert len(load_benchmark("vstar", tmp_path, limit=3)) == 3


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache under tmp_path, not the user's."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")


def test_textvqa_published_layout_and_parquet_dataset_agree(tmp_path, datasets_cache):
    layout = load_benchmark("textvqa", write_textvqa(tmp_path / "layout"))
    hub = load_benchmark("textvqa", write_textvqa_parquet(tmp_path / "hub"))  # default split: validation
    for items in (layout, hub):
        assert [it.key for it in items] == ["100", "101", "102"]
        assert [(it.question, it.answers) for it in items] == [(q, a) for q, a in TEXTVQA_ROWS]
        assert load_image(items[2].image_source()).size == (160, 120)
    assert layout[0].image == layout[1].image  # two questions about one image
    with pytest.raises(DataError, match="split"):
        load_benchmark("textvqa", tmp_path / "hub", split="test")


def test_magnifierbench_authors_copy_and_saved_dataset_agree(tmp_path):
    authors = load_benchmark("magnifierbench", write_magnifier_authors(tmp_path / "authors"))
    saved = load_benchmark("magnifierbench", write_magnifier_dataset(tmp_path / "saved"))
    for items in (authors, saved):
        assert [(it.key, it.question, it.answers) for it in items] == [(k, q, [a]) for k, q, a in MAGNIFIER_ROWS]
        assert items[1].options == {"A": "yes", "B": "no"}
        assert load_image(items[0].image_source()).size == (180, 120)


def test_unreadable_benchmarks_give_one_line_errors(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as on a machine without the hub
    (tmp_path / "empty").mkdir()
    cases = [("vstar", tmp_path / "empty", "no V\\* Bench annotations"),
             ("vstar", "nobody/no-such-bench", "could not fetch the dataset nobody/no-such-bench"),
             ("textvqa", tmp_path / "empty", "neither TextVQA_0.5.1_val.json nor a dataset"),
             ("magnifierbench", tmp_path / "missing", "could not open")]
    for bench, source, message in cases:
        with pytest.raises(DataError, match=message) as err:
            load_benchmark(bench, source)
        assert "\n" not in str(err.value)
    layout = write_textvqa(tmp_path / "tv")
    next((layout / "train_images").glob("*.jpg")).unlink()
    with pytest.raises(DataError, match="image\\(s\\) missing"):
        load_benchmark("textvqa", layout)
