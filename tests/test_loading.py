"""Both checkpoint layouts load through the one loader and give identical answers; bad checkpoints fail clearly."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flexattn.loading import EMBEDDED_MODEL, ModelLoadError
from flexattn.pipeline import FlexVLM

from .conftest import make_vlm, random_image, write_released_checkpoint, write_sentencepiece_tokenizer, write_transformers_checkpoint

QUESTION = "what letter is on the red circle ?"


@pytest.fixture(scope="module")
def source():
    return make_vlm(seed=3, num_layers=4, selection_layer=1, lowres_size=56, threshold=80)


def _same_answers(a: FlexVLM, b: FlexVLM, image):
    for mode in ("lowres", "flex", "select_all"):
        x = a.answer(image, QUESTION, mode=mode, max_new_tokens=5)
        y = b.answer(image, QUESTION, mode=mode, max_new_tokens=5)
        assert x.token_ids == y.token_ids, mode
        for px, py in zip(x.trace.passes, y.trace.passes):
            for lx, ly in zip(px, py):
                assert (lx.selected is None) == (ly.selected is None)
                if lx.selected is not None:
                    assert np.array_equal(lx.selected, ly.selected)


@pytest.mark.parametrize("tower_inside", [True, False])
def test_released_and_transformers_layouts_load_identically(source, tmp_path, tower_inside):
    native = FlexVLM.load(write_transformers_checkpoint(source, tmp_path / "native"))
    released_dir = write_released_checkpoint(source, tmp_path / "released", tower_inside=tower_inside)
    released = FlexVLM.load(released_dir)
    assert (native.layout, released.layout) == ("transformers", "released")
    assert not native.untrained_hr and not released.untrained_hr
    assert released.settings == source.settings
    for key, value in source.model.state_dict().items():
        assert torch.equal(released.model.state_dict()[key], value), key
    image = random_image(90, 50, seed=2)
    _same_answers(source, native, image)
    _same_answers(native, released, image)


def test_released_layout_with_sentencepiece_tokenizer(source, tmp_path):
    path = write_released_checkpoint(source, tmp_path / "released", tower_inside=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / name).unlink(missing_ok=True)
    write_sentencepiece_tokenizer(path, vocab_size=source.model.config.text_config.vocab_size)
    vlm = FlexVLM.load(path)
    ids = vlm.tokenizer("USER: hello").input_ids
    assert ids[0] == vlm.tokenizer.bos_token_id == 1
    got = vlm.answer(random_image(60, 80), QUESTION, max_new_tokens=3)
    assert got.stats.generated_tokens >= 1


def test_transformers_llava_without_hr_weights_is_an_untrained_plugin(source, tmp_path):
    path = write_transformers_checkpoint(source, tmp_path / "hf")
    weights = {k: v for k, v in load_file(path / "model.safetensors").items() if "_proj_hd" not in k}
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.pop("flex_attention")
    (path / "config.json").write_text(json.dumps(config))
    vlm = FlexVLM.load(path)
    assert vlm.untrained_hr and vlm.settings.untrained_hr_projections
    attn = vlm.model.model.language_model.layers[2].self_attn
    assert torch.equal(attn.k_proj_hd.weight, attn.k_proj.weight)
    assert torch.equal(attn.v_proj_hd.weight, attn.v_proj.weight)
    got = vlm.answer(random_image(64, 64), QUESTION, max_new_tokens=2)
    assert got.stats.untrained_hr_projections is True


def test_missing_checkpoint_names_it_in_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError) as err:
        FlexVLM.load(missing)
    assert str(missing) in str(err.value) and "\n" not in str(err.value)


def test_corrupt_weights_name_the_checkpoint(source, tmp_path):
    path = write_transformers_checkpoint(source, tmp_path / "corrupt")
    (path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError) as err:
        FlexVLM.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_not_a_llava_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelLoadError, match="not a LLaVA"):
        FlexVLM.load(tmp_path)


def test_pickle_weights_load_only_with_weights_only(source, tmp_path):
    """A .bin checkpoint with a non-tensor pickle payload is refused, never executed."""
    path = write_transformers_checkpoint(source, tmp_path / "pickled")
    state = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (print, ("executed!",))

    state["evil"] = Evil()
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError):
        FlexVLM.load(path)


def test_model_card_says_what_a_checkpoint_was_trained_on(tmp_path):
    from flexattn.model_card import model_card, read_training_info
    from flexattn.synthetic import BENCHES, FAMILY_KINDS, QUESTION_TEMPLATES

    card = model_card({"trained_on": "synthetic"})
    kinds = [kind for family in BENCHES["synthetic"] for kind in FAMILY_KINDS[family]]
    assert len(card.question_forms) == len(kinds) and "synthetic" in card.summary
    for form, kind in zip(card.question_forms, kinds):  # the generator's templates, placeholders shown as ‹name›
        assert form.replace("‹", "{").replace("›", "}") == QUESTION_TEMPLATES[kind]
    generic = model_card({})
    assert generic.question_forms == () and generic.trained_on is None
    assert read_training_info(tmp_path) == {}  # no file
    (tmp_path / "training_info.json").write_text("{not json")
    assert model_card(read_training_info(tmp_path)) == generic
    (tmp_path / "training_info.json").write_text('{"trained_on": "synthetic-long"}')
    assert model_card(read_training_info(tmp_path)).question_forms == (card.question_forms[-1],)  # multi only
    if (EMBEDDED_MODEL / "training_info.json").is_file():
        assert model_card(read_training_info(EMBEDDED_MODEL)).trained_on == "synthetic"
