"""Shared fixtures: tiny random FlexAttention LLaVAs, a word-level tokenizer, checkpoint writers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionModel, PreTrainedTokenizerFast

from flexattn.image import ImageProcessor
from flexattn.loading import LoadedModel
from flexattn.modeling import FlexLlavaForConditionalGeneration
from flexattn.pipeline import FlexVLM
from flexattn.presets import tiny_config, word_tokenizer

torch.set_num_threads(min(2, os.cpu_count() or 1))

WORDS = (
    "a chat between curious human and an artificial intelligence assistant . the gives helpful , detailed polite "
    "answers to human's questions user : what is this ? which letter colour red blue green left right of on"
).split()


def make_tokenizer(vocab_size: int = 96) -> PreTrainedTokenizerFast:
    return word_tokenizer(WORDS, vocab_size)


def make_model(seed: int = 0, **config_kwargs) -> FlexLlavaForConditionalGeneration:
    torch.manual_seed(seed)
    model = FlexLlavaForConditionalGeneration(tiny_config(**config_kwargs)).eval()
    model.set_attn_implementation({"text_config": "flexattn", "vision_config": "sdpa"})
    with torch.no_grad():
        # Random weights: widen the attention logits so maps have structure, and keep EOS from ending answers.
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
        model.lm_head.weight[2].zero_()
    return model


def make_vlm(seed: int = 0, **config_kwargs) -> FlexVLM:
    model = make_model(seed, **config_kwargs)
    tok = make_tokenizer(model.config.text_config.vocab_size)
    return FlexVLM(LoadedModel(model, tok, ImageProcessor(), "tiny", "transformers", False))


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def tiny_vlm() -> FlexVLM:
    return make_vlm(seed=0, num_layers=4, selection_layer=1, lowres_size=84, threshold=100)


def write_transformers_checkpoint(vlm: FlexVLM, path: Path) -> Path:
    vlm.model.save_pretrained(path)
    vlm.tokenizer.save_pretrained(path)
    vlm.processor.save_pretrained(path)
    return path


def write_released_checkpoint(vlm: FlexVLM, path: Path, tower_inside: bool) -> Path:
    """Write `vlm` in the released checkpoint layout (original LLaVA keys, config.extra as strings)."""
    model = vlm.model
    path.mkdir(parents=True, exist_ok=True)
    text = model.config.text_config
    s = model.flex_settings
    tower_dir = path / "clip-tower"
    clip = CLIPVisionModel(model.config.vision_config)
    clip.load_state_dict(model.model.vision_tower.state_dict())
    clip.save_pretrained(tower_dir)
    vlm.processor.save_pretrained(tower_dir)
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "vocab_size": text.vocab_size,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "mm_vision_tower": "clip-tower",
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_hidden_size": model.config.vision_config.hidden_size,
        "image_aspect_ratio": "pad",
        "extra": {
            "zoom_ratio": str(s.zoom),
            "lowres_size": str(s.lowres_size),
            "highres_size": str(s.hr_size),
            "threshold": str(int(s.threshold)),
            "warmup": "10",
            "selection_layer": str(s.selection_layer),
            "pool_size": str(s.pool_size),
        },
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    weights = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.language_model."):
            new = "model." + key[len("model.language_model.") :]
        elif key.startswith("model.multi_modal_projector.linear_1."):
            new = "model.mm_projector.0." + key.rsplit(".", 1)[1]
        elif key.startswith("model.multi_modal_projector.linear_2."):
            new = "model.mm_projector.2." + key.rsplit(".", 1)[1]
        elif key.startswith("model.vision_tower."):
            if not tower_inside:
                continue
            new = "model.vision_tower.vision_tower.vision_model." + key[len("model.vision_tower.") :]
        else:
            new = key
        weights[new] = value.contiguous().clone()
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    vlm.tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def tmp_checkpoints(tmp_path):
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def write_sentencepiece_tokenizer(path: Path, vocab_size: int) -> None:
    """A LLaMA-style sentencepiece tokenizer (tokenizer.model), as the released 7B checkpoint ships."""
    import sentencepiece as spm

    corpus = path / "corpus.txt"
    corpus.write_text(("a chat between a curious human and an artificial intelligence assistant . " + " ".join(WORDS) + "\n") * 20)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(path / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2,
    )
    corpus.unlink()
    (path / "tokenizer.vocab").unlink()
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
    }))
