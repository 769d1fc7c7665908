"""Load a FlexAttention LLaVA from a hub id or a local directory, in either checkpoint layout.

* Released layout (`senfu/llava-v1.5-7b-flexattn`): original LLaVA keys (`model.layers.N...`,
  `model.mm_projector.{0,2}`, per-layer `self_attn.{k,v}_proj_hd`), `config.extra` with string values, the CLIP
  tower named by `mm_vision_tower` (or stored inside under `model.vision_tower.vision_tower.*`).
* transformers layout (`llava-hf/llava-1.5-7b-hf`, and this project's own models): a `LlavaConfig`; when it
  carries `flex_attention` settings and `k_proj_hd` weights it is a trained FlexAttention model, otherwise the
  HR projections start as copies of `k_proj` / `v_proj` (training-free plug-in, flagged as untrained).

Weights load from safetensors, or from `.bin` with `weights_only=True`; `trust_remote_code` is never used.

On a GPU the weights load straight to the device (`device_map`), so host RAM never holds the whole model; on
ZeroGPU Spaces (CUDA exists only inside `spaces.GPU` calls) they load on the CPU and move with `.to("cuda")` at
start-up, as that platform requires. Before any weight is read, the memory the model needs (`flexattn.memory`) is
checked against what the device and host have, and a model that cannot fit is refused in one line.
"""

from __future__ import annotations

import json
import logging
import os
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

from . import memory
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
    needs: memory.MemoryNeeds | None = None  # what the model needs in the dtype it was loaded in


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_zerogpu() -> bool:
    """A Hugging Face ZeroGPU Space (the variable its `spaces` package reads)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


def native_bf16(capability: tuple[int, int]) -> bool:
    """bfloat16 tensor cores from Ampere (compute capability 8.0) on. `torch.cuda.is_bf16_supported()` also says
    True on T4 / V100, where bfloat16 is emulated and slow."""
    return tuple(capability) >= (8, 0)


def default_dtype(device: torch.device, layout: str = "transformers",
                  capability: tuple[int, int] | None = None) -> torch.dtype:
    """float32 on the CPU. On CUDA: float16 for the released checkpoint (as its authors deploy it, and what it
    was trained in); otherwise bfloat16 where the GPU has it natively, else float16."""
    if device.type != "cuda":
        return torch.float32
    if layout == "released":
        return torch.float16
    capability = capability or torch.cuda.get_device_capability(device)
    return torch.bfloat16 if native_bf16(capability) else torch.float16


def choose_dtype(device: torch.device, layout: str, explicit: torch.dtype | None = None,
                 capability: tuple[int, int] | None = None) -> torch.dtype:
    """An explicit dtype wins (with a warning where bfloat16 would be emulated); else `default_dtype`."""
    if explicit is None:
        return default_dtype(device, layout, capability)
    if explicit == torch.bfloat16 and device.type == "cuda":
        capability = capability or torch.cuda.get_device_capability(device)
        if not native_bf16(capability):
            log.warning("bfloat16 on a GPU of compute capability %d.%d is emulated and slow; float16 is native",
                        *capability)
    return explicit


def device_map_for(device: torch.device) -> str | None:
    """Where from_pretrained puts the weights: straight onto a GPU; None (the CPU, then `.to`) on the CPU and on
    ZeroGPU, whose CUDA is emulated outside GPU calls and wants the model moved at start-up."""
    if device.type == "cpu" or on_zerogpu():
        return None
    return str(device)


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
    """Load model, tokenizer and image processor. `name` is a hub id or a directory (default: embedded model);
    `dtype` None picks `default_dtype`. Raises ModelLoadError (one line) when it cannot load or cannot fit."""
    name = str(name or EMBEDDED_MODEL)
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"cannot load model {name!r} on {device}: no CUDA GPU is available here")
    raw = read_config(name)
    layout = checkpoint_layout(name, raw)
    chosen = choose_dtype(device, layout, dtype)
    device_map = device_map_for(device)
    try:
        config, tower, defaulted = _config(name, raw, layout)
        needs = check_fits(name, config, chosen, device, on_host=device_map is None)
        if layout == "transformers":
            loaded = _load_transformers_layout(name, config, chosen, device_map, defaulted)
        else:
            loaded = _load_released_layout(name, config, tower, chosen, device_map)
    except ModelLoadError:
        raise
    except Exception as err:  # corrupt weights, missing files, shape mismatches
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(err)}") from err
    loaded.training_info = read_training_info(name)
    if device_map is None:
        loaded.model.to(device)
    loaded.model.eval()
    loaded.needs = needs
    return loaded


def model_config(name: str | Path) -> LlavaConfig:
    """The LlavaConfig (with FlexAttention settings) a checkpoint loads with, read without its weights."""
    name = str(name)
    raw = read_config(name)
    try:
        return _config(name, raw, checkpoint_layout(name, raw))[0]
    except ModelLoadError:
        raise
    except Exception as err:
        raise ModelLoadError(f"cannot read the configuration of {name!r}: {_first_line(err)}") from err


def _config(name: str, raw: dict, layout: str) -> tuple[LlavaConfig, str | None, bool]:
    """(config, vision tower to load separately, whether FlexAttention settings were defaulted)."""
    if layout == "transformers":
        config = LlavaConfig.from_pretrained(name)
        return config, None, _default_settings(config)
    config, tower = released_config(name, raw)
    return config, tower, False


def checkpoint_layout(name: str, raw: dict) -> str:
    if raw.get("model_type") == "llava":
        return "transformers"
    if "mm_vision_tower" in raw or raw.get("model_type") == "llava_llama":
        return "released"
    raise ModelLoadError(
        f"cannot load model {name!r}: model_type {raw.get('model_type')!r} is not a LLaVA-1.5 checkpoint"
    )


def check_fits(name: str, config: LlavaConfig, dtype: torch.dtype, device: torch.device, on_host: bool,
               free_device: int | None = None, host_available: int | None = None) -> memory.MemoryNeeds:
    """The model's memory needs; ModelLoadError (one line) when the device or the host cannot hold them.
    Free memory is measured when not given (ZeroGPU has no device to measure before a GPU call)."""
    needs = memory.needs(config, FlexSettings.from_dict(config.flex_attention), dtype)
    if free_device is None and device.type == "cuda" and not on_zerogpu():
        free_device = memory.free_device_bytes(device)
    if host_available is None and on_host:
        host_available = memory.available_host_bytes()
    problem = memory.fit_problem(needs, device, free_device, host_available, on_host)
    if problem:
        raise ModelLoadError(f"cannot load model {name!r}: it {problem}")
    log.info("%s: %s", name, needs.describe())
    return needs


def _from_pretrained(name, config, dtype, device_map, **kwargs):
    model, info = FlexLlavaForConditionalGeneration.from_pretrained(
        name,
        config=config,
        dtype=dtype,
        device_map=device_map,
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


def _default_settings(config: LlavaConfig) -> bool:
    """Give a LLaVA config without FlexAttention settings zoom 3 and selection at a quarter of the depth; True if
    it had none (a plain LLaVA: its HR projections, if any, were not trained for them)."""
    if getattr(config, "flex_attention", None):
        return False
    vision = config.vision_config
    layers = config.text_config.num_hidden_layers
    config.flex_attention = FlexSettings(lowres_size=vision.image_size, zoom=3,
                                         selection_layer=max(1, layers // 4)).to_dict()
    return True


def _load_transformers_layout(name: str, config: LlavaConfig, dtype, device_map, defaulted: bool) -> LoadedModel:
    model, missing = _from_pretrained(name, config, dtype, device_map)
    _check_missing(name, missing, allowed=("_proj_hd",))
    untrained = _missing_hr(missing) or defaulted
    if _missing_hr(missing):
        model.copy_hr_projections_from_lowres()
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


def _load_released_layout(name: str, config: LlavaConfig, tower: str, dtype, device_map) -> LoadedModel:
    model, missing = _from_pretrained(name, config, dtype, device_map, key_mapping=OFFICIAL_KEY_MAPPING)
    if any(k.startswith("model.vision_tower.") for k in missing):
        try:  # on the model's device too: the copy below stays there
            clip = CLIPVisionModel.from_pretrained(tower, dtype=dtype, device_map=device_map)
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
