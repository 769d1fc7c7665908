"""Memory: what a model's weights and one image's caches take, what is free, and how many images to keep.

Every figure comes from the model's configuration: parameters are counted on the meta device (no weights read,
so the loader can refuse before a long download or load), and per-image bytes follow the tensors the pipeline
keeps per image (`PreparedImage`). `python -m flexattn memory` prints them; the loader checks them and the
pipeline sizes its image cache with them.

For the released 7B (LLaMA 6.74 B + k/v_proj_hd 1.07 B + projector 0.02 B + CLIP-L/336 0.30 B = 8.14 B
parameters) in float16: 16.3 GB of weights; one image keeps at most 2.4 GB (4.7 MB LR and 42 MB HR features, 85 MB
of HR keys/values for each of the 23 layers after the selection layer, 0.5 MB of prompt keys/values per token).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .modeling import FlexLlavaForConditionalGeneration
from .settings import MAX_NEW_TOKENS

GB = 10**9
# Half of the memory free after the weights holds cached images; the other half is headroom for the answer being
# generated (its KV cache, activations, the per-layer HR tensors it gathers) and for allocator fragmentation.
IMAGE_CACHE_SHARE = 0.5
PROMPT_TEXT_TOKENS = 128  # text tokens around the image assumed for one image's prompt-prefix cache
CUDA_CONTEXT_BYTES = 600 * 10**6  # CUDA context + cuBLAS workspace, outside PyTorch's allocator (typical)
# Nominal device memory (GB) of the cards people run this on; ZeroGPU's default "large" size is half an
# RTX Pro 6000 Blackwell.
CARDS = {"T4": 16, "A10G": 24, "L4": 24, "A100 40GB": 40, "ZeroGPU large": 48, "A100 80GB": 80, "H100": 80}
PARAMETER_GROUPS = (  # (group, what a parameter name contains), first match wins
    ("hr_projections", "_proj_hd"),
    ("vision", "vision_tower"),
    ("projector", "multi_modal_projector"),
    ("language", ""),
)


class DeviceMemoryError(RuntimeError):
    """The device ran out of memory during a question; the message is one line, and the model keeps serving."""


def out_of_memory_message(error_text: str, device: torch.device) -> str:
    """One line for an out-of-memory error: what was asked for, and what the device has (when it can tell)."""
    match = re.search(r"Tried to allocate [\d.]+ [KMGT]iB", error_text)
    asked = f" ({match.group(0).lower()})" if match else ""
    free, total = free_device_bytes(device), total_device_bytes(device)
    where = f"; {free / GB:.1f} of {total / GB:.1f} GB free on {device} now" if free is not None else ""
    return (f"out of GPU memory while answering{asked}{where}. Cached images were released: ask again, or ask "
            f"for fewer new tokens or another mode, which need less")


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def count_parameters(config) -> dict[str, int]:
    """Parameters per group (language, hr_projections, projector, vision) of a FlexAttention LLaVA with `config`,
    counted on the meta device: exact for the architecture, and nothing is allocated."""
    with torch.device("meta"):
        model = FlexLlavaForConditionalGeneration(config)
    counts = {group: 0 for group, _ in PARAMETER_GROUPS}
    for name, param in model.named_parameters():
        group = next(group for group, part in PARAMETER_GROUPS if part in name)
        counts[group] += param.numel()
    return counts


@dataclass(frozen=True)
class ImageCacheBytes:
    """Device bytes one prepared image can keep (see `flexattn.pipeline.PreparedImage`)."""

    lr_features: int  # (g*g, D)
    hr_features: int  # (G*G, D)
    hr_keys_values_per_layer: int  # keys + values (G*G, kv_dim) each, and the row index, of one layer
    hr_layers: int  # layers after the selection layer: the ones that attend to HR tokens
    prefix_per_token: int  # the prompt-prefix KV cache, every layer, per token

    def worst(self, prompt_tokens: int) -> int:
        """Every HR token projected at every HR layer (select_all), plus the prefix of a `prompt_tokens` prompt."""
        hr = self.hr_keys_values_per_layer * self.hr_layers
        return self.lr_features + self.hr_features + hr + self.prefix_per_token * max(0, prompt_tokens - 1)


def kv_bytes_per_token(text_config, dtype: torch.dtype) -> int:
    """Keys and values of one token over every layer."""
    kv_dim = text_config.num_key_value_heads * _head_dim(text_config)
    return 2 * kv_dim * text_config.num_hidden_layers * dtype_bytes(dtype)


def image_cache_bytes(config, settings, dtype: torch.dtype) -> ImageCacheBytes:
    text, vision = config.text_config, config.vision_config
    size = dtype_bytes(dtype)
    g = settings.lowres_size // vision.patch_size
    hr_tokens = (g * settings.zoom) ** 2
    kv_dim = text.num_key_value_heads * _head_dim(text)
    return ImageCacheBytes(
        lr_features=g * g * text.hidden_size * size,
        hr_features=hr_tokens * text.hidden_size * size,
        hr_keys_values_per_layer=2 * hr_tokens * kv_dim * size + hr_tokens * 8,  # int64 row index
        hr_layers=max(0, text.num_hidden_layers - settings.selection_layer - 1),
        prefix_per_token=kv_bytes_per_token(text, dtype),
    )


def _head_dim(text_config) -> int:
    return getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads


@dataclass(frozen=True)
class MemoryNeeds:
    """What a model needs, in bytes. `device`: weights, one image's caches and one answer on the GPU;
    `host_direct`: host RAM when loading straight to the GPU (tensor by tensor: the largest tensor, twice over for
    a dtype conversion); `host_cpu`: host RAM when the weights sit in it (CPU inference, or ZeroGPU's CPU load)."""

    parameters: dict[str, int]
    dtype: torch.dtype
    weights: int
    image: int
    answer: int
    largest_tensor: int

    @property
    def device(self) -> int:
        return self.weights + self.image + self.answer

    @property
    def host_direct(self) -> int:
        return 2 * self.largest_tensor

    @property
    def host_cpu(self) -> int:
        return self.weights

    @property
    def total_parameters(self) -> int:
        return sum(self.parameters.values())

    def describe(self) -> str:
        p = self.parameters
        dtype = str(self.dtype).replace("torch.", "")
        return (f"{self.total_parameters / 1e9:.2f} B parameters (language {p['language'] / 1e9:.2f} B, HR "
                f"projections {p['hr_projections'] / 1e9:.2f} B, vision {p['vision'] / 1e9:.2f} B, projector "
                f"{p['projector'] / 1e9:.2f} B): {self.weights / GB:.1f} GB of weights in {dtype}, up to "
                f"{self.image / GB:.1f} GB for one image's caches and {self.answer / GB:.1f} GB for one answer")


def needs(config, settings, dtype: torch.dtype) -> MemoryNeeds:
    """The memory a model with `config` and `settings` needs in `dtype` (see MemoryNeeds)."""
    params = count_parameters(config)
    image = image_cache_bytes(config, settings, dtype)
    text = config.text_config
    g = settings.lowres_size // config.vision_config.patch_size
    prompt = g * g + PROMPT_TEXT_TOKENS
    # One answer: its KV cache (prompt + longest answer) and the per-layer gather of every HR key and value.
    answer = kv_bytes_per_token(text, dtype) * (prompt + MAX_NEW_TOKENS) + image.hr_keys_values_per_layer
    largest = max(text.vocab_size * text.hidden_size, text.intermediate_size * text.hidden_size)
    return MemoryNeeds(params, dtype, sum(params.values()) * dtype_bytes(dtype), image.worst(prompt), answer,
                       largest * 4)  # checkpoints may store fp32


def image_cache_budget(free_bytes: int, share: float = IMAGE_CACHE_SHARE) -> int:
    """Bytes the pipeline may keep in cached images, given the device memory free once the weights are loaded."""
    return max(0, int(free_bytes * share))


def images_that_fit(budget: int, per_image: int, at_most: int) -> int:
    """How many images of `per_image` bytes a `budget` holds: at least one (the image being asked about)."""
    return max(1, min(at_most, budget // per_image if per_image else at_most))


# ---- what is free ----------------------------------------------------------------------------------------------
def free_device_bytes(device: torch.device) -> int | None:
    """Bytes a CUDA device can still give this process (free memory plus what PyTorch holds unused); None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def total_device_bytes(device: torch.device) -> int | None:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def available_host_bytes(meminfo: str = "/proc/meminfo", cgroup: str = "/sys/fs/cgroup") -> int | None:
    """Host RAM this process can still use: MemAvailable, lowered by a cgroup (container) limit; None if unknown."""
    limits = []
    try:
        match = re.search(r"^MemAvailable:\s+(\d+) kB", Path(meminfo).read_text(), re.MULTILINE)
        if match:
            limits.append(int(match.group(1)) * 1024)
    except OSError:
        pass
    for limit_file, usage_file in (("memory.max", "memory.current"),  # cgroup v2
                                   ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):  # v1
        try:
            limit = Path(cgroup, limit_file).read_text().strip()
            usage = int(Path(cgroup, usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:  # "max" or a huge v1 number: no limit
            limits.append(int(limit) - usage)
        break
    return min(limits) if limits else None


def fit_problem(needs: MemoryNeeds, device: torch.device, free_device: int | None, host_available: int | None,
                on_host: bool) -> str | None:
    """Why the model cannot run here (one line), or None. `on_host`: the weights pass through host RAM whole."""
    dtype = str(needs.dtype).replace("torch.", "")
    if on_host and host_available is not None and needs.host_cpu > host_available:
        return (f"needs {needs.host_cpu / GB:.1f} GB of host RAM for its weights in {dtype}, only "
                f"{host_available / GB:.1f} GB is available")
    if free_device is not None and needs.device > free_device:
        return (f"needs {needs.device / GB:.1f} GB of GPU memory ({needs.weights / GB:.1f} GB of weights in {dtype}, "
                f"{(needs.image + needs.answer) / GB:.1f} GB to answer about one image), {device} has "
                f"{free_device / GB:.1f} GB free")
    return None


def card_table(needs_by_dtype: dict, cards: dict[str, float], context: int = CUDA_CONTEXT_BYTES,
               at_most: int = 4) -> list[dict]:
    """Per card (name -> GB of device memory) and dtype: whether the model fits, and how many images the cache
    keeps, as the loader and the pipeline would decide with the whole card free but for the CUDA context."""
    rows = []
    for card, gigabytes in cards.items():
        for dtype, need in needs_by_dtype.items():
            free = int(gigabytes * GB) - context
            fits = need.device <= free
            after = free - need.weights
            images = images_that_fit(image_cache_budget(after), need.image, at_most) if fits else 0
            rows.append({"card": card, "memory_gb": gigabytes, "dtype": str(dtype).replace("torch.", ""),
                         "fits": fits, "free_after_weights_gb": round(after / GB, 1), "cached_images": images})
    return rows


def format_report(needs_by_dtype: dict, rows: list[dict]) -> str:
    """`python -m flexattn memory`: needs per dtype, then per card whether it fits and how many images it caches."""
    lines = []
    for need in needs_by_dtype.values():
        lines += [need.describe() + ".",
                  f"  GPU: {need.device / GB:.1f} GB at least; host RAM: {need.host_cpu / GB:.1f} GB when the weights "
                  f"load on the CPU first (CPU, ZeroGPU), {need.host_direct / GB:.1f} GB at a time when they load "
                  f"straight to the GPU"]
    lines += ["", f"{'card':<14} {'GB':>4}  {'dtype':<9} {'fits':<5} {'free after weights':>18}  {'images cached':>13}"]
    for r in rows:
        after = f"{r['free_after_weights_gb']:.1f} GB" if r["fits"] else "-"
        lines.append(f"{r['card']:<14} {r['memory_gb']:>4}  {r['dtype']:<9} {'yes' if r['fits'] else 'no':<5} "
                     f"{after:>18}  {r['cached_images'] if r['fits'] else '-':>13}")
    lines.append(f"(nominal card memory less {CUDA_CONTEXT_BYTES / GB:.1f} GB of CUDA context; images cached: "
                 f"{IMAGE_CACHE_SHARE:.0%} of the free memory over one image's worst case, at most 4)")
    return "\n".join(lines)
