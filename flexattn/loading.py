"""Load a FlexAttention LLaVA from a hub id or a local directory, in either checkpoint layout.

* Released layout (`senfu/llava-v1.5-7b-flexattn`): original LLaVA keys (`model.layers.N...`,
  `model.mm_projector.{0,2}`, per-layer `self_attn.{k,v}_proj_hd`), `config.extra` with string values, the CLIP
  tower named by `mm_vision_tower` (or stored inside under `model.vision_tower.vision_tower.*`).
* transformers layout (`llava-hf/llava-1.5-7b-hf`, and this project's own models): a `LlavaConfig`; when it
  carries `flex_attention` settings and `k_proj_hd` weights it is a trained FlexAttention model, otherwise the
  HR projections start as copies of `k_proj` / `v_proj` (training-free plug-in, flagged as untrained).

Weights load from safetensors, or from `.bin` with `weights_only=True`; `trust_remote_code` is never used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlavaConfig,
)
from transformers.utils import cached_file

from .image import ImageProcessor
from .model_card import read_training_info
from .modeling import FlexLlavaForConditionalGeneration
from .settings import FlexSettings

REPO_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_MODEL = REPO_ROOT / "assets" / "flexattn-tiny"
OFFICIAL_7B = "senfu/llava-v1.5-7b-flexattn"
ATTN = {"text_config": "flexattn", "vision_config": "sdpa"}

# Released-layout key -> transformers LlavaForConditionalGeneration key.
OFFICIAL_KEY_MAPPING = {
    r"^model\.vision_tower\.vision_tower\.vision_model\.": "model.vision_tower.",
    r"^model\.mm_projector\.0\.": "model.multi_modal_projector.linear_1.",
    r"^model\.mm_projector\.2\.": "model.multi_modal_projector.linear_2.",
    r"^model\.(layers|embed_tokens|norm)\.": r"model.language_model.\1.",
}

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A checkpoint that cannot be loaded; the message is one line naming it."""


@dataclass
class LoadedModel:
    model: FlexLlavaForConditionalGeneration
    tokenizer: object
    processor: ImageProcessor
    name: str
    layout: str  # "released" or "transformers"
    untrained_hr: bool
    training_info: dict = field(default_factory=dict)  # the checkpoint's training_info.json (local ones), if any


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def read_config(name: str) -> dict:
    try:
        path = cached_file(name, "config.json")
    except Exception as err:  # hub or filesystem: the message says which
        raise ModelLoadError(f"cannot load model {name!r}: no config.json found ({_first_line(err)})") from None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"cannot load model {name!r}: config.json is unreadable ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def load(name: str | Path | None = None, device=None, dtype=None) -> LoadedModel:
    """Load model, tokenizer and image processor. `name` is a hub id or a directory (default: embedded model)."""
    name = str(name or EMBEDDED_MODEL)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    raw = read_config(name)
    try:
        if raw.get("model_type") == "llava":
            loaded = _load_transformers_layout(name, raw, dtype)
        elif "mm_vision_tower" in raw or raw.get("model_type") == "llava_llama":
            loaded = _load_released_layout(name, raw, dtype)
        else:
            raise ModelLoadError(
                f"cannot load model {name!r}: model_type {raw.get('model_type')!r} is not a LLaVA-1.5 checkpoint"
            )
    except ModelLoadError:
        raise
    except Exception as err:  # corrupt weights, missing files, shape mismatches
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(err)}") from err
    loaded.training_info = read_training_info(name)
    loaded.model.to(device).eval()
    return loaded


def _from_pretrained(name, config, dtype, **kwargs):
    model, info = FlexLlavaForConditionalGeneration.from_pretrained(
        name,
        config=config,
        dtype=dtype,
        attn_implementation=ATTN,
        output_loading_info=True,
        use_safetensors=None,
        **kwargs,
    )
    if info.get("mismatched_keys"):
        raise ModelLoadError(f"cannot load model {name!r}: weights of the wrong shape: {info['mismatched_keys'][:3]}")
    return model, set(info.get("missing_keys", ()))


def _missing_hr(missing: set[str]) -> bool:
    return any("_proj_hd" in k for k in missing)


def _load_transformers_layout(name: str, raw: dict, dtype) -> LoadedModel:
    config = LlavaConfig.from_pretrained(name)
    model, missing = _from_pretrained(name, config, dtype)
    _check_missing(name, missing, allowed=("_proj_hd",))
    untrained = _missing_hr(missing) or not getattr(config, "flex_attention", None)
    if _missing_hr(missing):
        model.copy_hr_projections_from_lowres()
    if not getattr(config, "flex_attention", None):
        vision = config.vision_config
        layers = config.text_config.num_hidden_layers
        settings = FlexSettings(lowres_size=vision.image_size, zoom=3, selection_layer=max(1, layers // 4))
        model.config.flex_attention = settings.to_dict()
    if untrained:
        model.config.flex_attention = {**model.config.flex_attention, "untrained_hr_projections": True}
    tokenizer = AutoTokenizer.from_pretrained(name)
    processor = ImageProcessor.from_pretrained(name)
    return LoadedModel(model, tokenizer, processor, name, "transformers", untrained)


def released_config(name: str, raw: dict) -> tuple[LlavaConfig, str]:
    """LlavaConfig equivalent of a released-layout config.json (+ where the vision tower comes from)."""
    tower = raw.get("mm_vision_tower")
    if not tower:
        raise ModelLoadError(f"cannot load model {name!r}: config has no mm_vision_tower")
    tower = _resolve_relative(name, tower)
    if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ModelLoadError(f"cannot load model {name!r}: projector {raw.get('mm_projector_type')!r} is not mlp2x_gelu")
    text_fields = {k: v for k, v in raw.items() if not k.startswith("mm_") and k not in ("extra", "architectures", "model_type")}
    text = LlamaConfig(**text_fields)
    try:
        vision = CLIPVisionConfig.from_pretrained(tower)
    except Exception as err:
        raise ModelLoadError(f"cannot load vision tower {tower!r} named by {name!r}: {_first_line(err)}") from None
    config = LlavaConfig(
        text_config=text,
        vision_config=vision,
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if raw.get("mm_vision_select_feature", "patch") == "patch" else "full",
        projector_hidden_act="gelu",
        image_token_id=text.vocab_size - 1,  # unused: prompts are embedded around the image directly
        tie_word_embeddings=False,
    )
    config.flex_attention = FlexSettings.from_official_extra(raw.get("extra") or {}, text.num_hidden_layers).to_dict()
    return config, tower


def _resolve_relative(name: str, tower: str) -> str:
    """A tower given as a relative path is looked up beside the checkpoint first."""
    local = Path(name) / tower
    return str(local) if Path(name).is_dir() and local.is_dir() else tower


def _load_released_layout(name: str, raw: dict, dtype) -> LoadedModel:
    config, tower = released_config(name, raw)
    model, missing = _from_pretrained(name, config, dtype, key_mapping=OFFICIAL_KEY_MAPPING)
    if any(k.startswith("model.vision_tower.") for k in missing):
        try:
            clip = CLIPVisionModel.from_pretrained(tower, dtype=dtype)
        except Exception as err:
            raise ModelLoadError(f"cannot load vision tower {tower!r} named by {name!r}: {_first_line(err)}") from None
        model.model.vision_tower.load_state_dict(clip.state_dict())
        missing = {k for k in missing if not k.startswith("model.vision_tower.")}
    _check_missing(name, missing, allowed=())
    tokenizer = AutoTokenizer.from_pretrained(name)
    try:
        processor = ImageProcessor.from_pretrained(name)
    except OSError:
        processor = ImageProcessor.from_pretrained(tower)
    return LoadedModel(model, tokenizer, processor, name, "released", False)


def _check_missing(name: str, missing: set[str], allowed: tuple[str, ...]) -> None:
    # lm_head may be tied in some exports; anything else missing means a broken checkpoint.
    bad = sorted(k for k in missing if not any(a in k for a in allowed) and k != "lm_head.weight")
    if bad:
        raise ModelLoadError(f"cannot load model {name!r}: {len(bad)} weights missing, e.g. {bad[0]}")
