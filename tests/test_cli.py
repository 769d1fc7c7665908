"""`python -m flexattn answer` prints one JSON object; bad inputs give one clear error line."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from flexattn import EMBEDDED_MODEL
from flexattn.prompt import unknown_words

from .conftest import make_vlm, random_image, write_transformers_checkpoint

EXAMPLES = EMBEDDED_MODEL.parent / "examples"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    vlm = make_vlm(seed=5, num_layers=4, selection_layer=1, lowres_size=56, threshold=80)
    return write_transformers_checkpoint(vlm, tmp_path_factory.mktemp("ckpt") / "tiny")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "flexattn", *args], capture_output=True, text=True, timeout=300)


def test_answer_json(checkpoint, tmp_path):
    image = tmp_path / "wide.png"
    random_image(120, 60).save(image)
    out = run_cli("answer", "--model", str(checkpoint), "--image", str(image), "--question", "what is this ?",
                  "--mode", "flex", "--max-new-tokens", "3", "--json", "--masks")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["mode"] == "flex" and isinstance(result["answer"], str)
    assert result["stats"]["lr_tokens"] == 16 and result["stats"]["hr_tokens"] == 144
    layers = result["layers"]
    assert [entry["layer"] for entry in layers] == [0, 1, 2, 3]
    assert all(entry["selected_hr_tokens"] == 0 for entry in layers[:1])
    assert layers[2]["hr_attended"] == layers[1]["selected_hr_tokens"]
    masks = result["masks"]
    assert len(masks) == result["stats"]["generated_tokens"]  # one entry per pass (EOS's pass included)
    assert sorted(masks[0]) == ["1", "2", "3"]
    assert len(masks[0]["1"]) == layers[1]["selected_hr_tokens"]
    assert all(0 <= i < 144 for i in masks[0]["2"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--image", "/no/such.png", "--question", "what ?"], "image file not found"),
        (["--question", "   "], "question is empty"),
    ],
)
def test_answer_errors_are_one_line(checkpoint, tmp_path, args, message):
    image = tmp_path / "ok.png"
    random_image(40, 40).save(image)
    full = ["answer", "--model", str(checkpoint), "--image", str(image), "--question", "what ?"] + args
    out = run_cli(*full)
    assert out.returncode == 2
    assert out.stderr.strip() == f"error: {out.stderr.strip().removeprefix('error: ')}"
    assert message in out.stderr and out.stderr.strip().count("\n") == 0  # checked before any model load


def test_saved_trace_holds_exactly_the_masks_json_prints(checkpoint, tmp_path, capsys):
    """`answer --save-trace FILE` and `load_trace` give back the masks `answer --json --masks` prints."""
    from flexattn.cli import main
    from flexattn.trace_file import load_trace

    image = tmp_path / "wide.png"
    random_image(120, 60, seed=7).save(image)
    args = ["answer", "--model", str(checkpoint), "--image", str(image), "--question", "what colour is the cat ?",
            "--max-new-tokens", "4"]
    assert main([*args, "--json", "--masks"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["unknown_words"] == ["cat"] and any(printed["masks"][0].values())
    trace_path = tmp_path / "run.npz"
    assert main([*args, "--save-trace", str(trace_path)]) == 0
    assert f"trace saved to {trace_path}" in capsys.readouterr().err
    opened = load_trace(trace_path).answer.to_json(masks=True)
    assert opened["masks"] == printed["masks"]
    assert opened["answer"] == printed["answer"] and opened["unknown_words"] == ["cat"]
    assert main([*args, "--save-trace", str(tmp_path / "no-such-dir" / "run.npz")]) == 2  # before loading a model
    assert "no such directory" in capsys.readouterr().err


@pytest.mark.skipif(not (EMBEDDED_MODEL / "tokenizer.json").is_file(), reason="no embedded model")
def test_embedded_model_names_the_words_it_does_not_know(capsys):
    """The embedded model's tokenizer knows every word of the app's example questions, and not "cat"."""
    from flexattn.cli import main

    tokenizer = AutoTokenizer.from_pretrained(EMBEDDED_MODEL)
    examples = json.loads((EXAMPLES / "examples.json").read_text())
    assert examples and all(unknown_words(tokenizer, e["question"]) == [] for e in examples)
    image = EXAMPLES / examples[0]["image"]
    assert main(["answer", "--image", str(image), "--question", "what colour is the cat ?", "--max-new-tokens", "2",
                 "--json", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["unknown_words"] == ["cat"]
