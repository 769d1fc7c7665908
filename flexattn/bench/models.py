"""The models the bench runs (7B-shaped random weights, or a checkpoint), its sample, and flex's planted selection."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers.initialization import no_init_weights

from ..image import ImageProcessor
from ..loading import EMBEDDED_MODEL, LoadedModel, ModelLoadError, default_device, native_bf16
from ..modeling import FlexLlavaForConditionalGeneration
from ..pipeline import FlexVLM
from ..presets import llava_7b_config
from ..presets import word_tokenizer as build_word_tokenizer
from ..prompt import SYSTEM
from ..synthetic import make_sample

QUESTION = "what letter is on the red circle ?"
FOLLOW_UP = "what colour is the shape marked k ?"
DEPTH_DIVISORS = (1, 2, 4, 8)  # they divide both depths of the 7B: 32 LLM and 24 tower layers


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class BenchModel:
    """A model to benchmark, and how its analytic FLOPs are taken.

    cost_config: the config the cost model uses (default: the model's own); for the 7b-shaped model, the
    full-depth 7B. cost_selection_layer: its selection layer (default: the model's). planted_share: flex mode
    selects a planted compact square of that share of HR tokens (None: the model's own selection).
    """

    name: str
    vlm: FlexVLM
    cost_config: object | None = None
    cost_selection_layer: int | None = None
    planted_share: float | None = None
    planted_center: tuple[float, float] = (0.5, 0.5)
    image: Image.Image | None = None
    question: str = QUESTION
    follow_up: str = FOLLOW_UP
    lazy_images: list[tuple[Image.Image, str]] = field(default_factory=list)  # for the lazy-encoding check
    description: str = ""

    def __post_init__(self):
        if self.cost_config is None:
            self.cost_config = self.vlm.model.config
        if self.cost_selection_layer is None:
            self.cost_selection_layer = (getattr(self.cost_config, "flex_attention", None) or {}).get(
                "selection_layer", self.vlm.settings.selection_layer
            )

    @property
    def scaled_cost(self) -> bool:
        """True when FLOPs are for a deeper model than the one measured (the full-depth 7B)."""
        return self.cost_config is not self.vlm.model.config

    @property
    def measured_selection_layer(self) -> int | None:
        """The run's selection layer where its per-layer counts must be spread over a deeper model; else None."""
        return self.vlm.settings.selection_layer if self.scaled_cost else None


def word_tokenizer(vocab_size: int = 32000):
    """A word-level tokenizer of `vocab_size` ids: LLaVA's v1 prompt words and the bench questions, then fillers."""
    return build_word_tokenizer(f"{SYSTEM} USER: ASSISTANT: {QUESTION} {FOLLOW_UP}".split(), vocab_size)


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def default_dtype(device: torch.device, random_weights: bool) -> torch.dtype | None:
    """Random-weight cost runs: bfloat16 where the device has it natively (CUDA compute capability >= 8.0; CPUs
    with AMX / AVX-512 BF16), else float16 on CUDA and float32 on the CPU. Trained checkpoints: None, the loader's
    choice (float16 for the released 7B on a GPU, float32 on the CPU)."""
    if not random_weights:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(torch.cuda.get_device_capability(device)) else torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def seven_b_shaped(depth_divisor: int = 8, device=None, dtype=None, seed: int = 0) -> FlexVLM:
    """LLaVA-1.5-7B widths/heads/vocab with random weights, depth divided by `depth_divisor`.

    Parameters are allocated without the default initialisation and filled with uniform noise of std 0.02 (norm
    weights 1, biases 0): the weights only have to be finite and 7B-shaped; flex mode's selection is planted.
    """
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device, random_weights=True)
    config = llava_7b_config(depth_divisor=depth_divisor)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), device:
            model = FlexLlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(seed)
    bound = 0.02 * math.sqrt(3.0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
            elif "norm" in name:
                param.fill_(1.0)
            else:
                param.uniform_(-bound, bound, generator=generator)
        model.lm_head.weight[2].zero_()  # keep EOS from ending random answers early (as the test models do)
    model.set_attn_implementation({"text_config": "flexattn", "vision_config": "sdpa"})
    model.eval()
    tokenizer = word_tokenizer(config.text_config.vocab_size)
    return FlexVLM(LoadedModel(model, tokenizer, ImageProcessor(), "7b-shaped", "transformers", False))


def benchmark_sample(seed: int = 0) -> tuple[Image.Image, str, str]:
    """(image, question, follow-up) from the synthetic benchmark (what the embedded model was trained on)."""
    sample = make_sample(seed, "attribute")
    letter = sample.shapes[0].letter
    return sample.image, sample.question, f"what colour is the shape marked {letter} ?"


def build_models(names: Sequence[str], depth_divisor: int = 8, planted_share: float = 0.10,
                 planted_center=(0.5, 0.5), device=None, dtype=None, lazy_samples: int = 4) -> list[BenchModel]:
    """BenchModels for `names`: "7b-shaped" (random weights, LLM and tower depth / `depth_divisor`, flex given a
    planted square of `planted_share` of the HR tokens centred at `planted_center`), "embedded", or a checkpoint
    PATH / hub id (its own selection; `lazy_samples` benchmark images for the lazy-HR check). The options are
    checked before any model is built."""
    if depth_divisor not in DEPTH_DIVISORS:
        raise ValueError(f"depth_divisor must divide both depths (32 LLM and 24 tower layers): 1, 2, 4 or 8, got "
                         f"{depth_divisor}")
    if not 0 <= planted_share <= 1:
        raise ValueError(f"planted_share is a fraction of the HR tokens, got {planted_share}")
    if len(planted_center) != 2 or not all(0 <= c <= 1 for c in planted_center):
        raise ValueError(f"planted_center takes two fractions y, x in 0..1, got {planted_center!r}")
    out = []
    for name in names:
        image, question, follow_up = benchmark_sample(0)
        if name == "7b-shaped":
            log(f"building the 7b-shaped model (depth / {depth_divisor}) ...")
            start = time.perf_counter()
            vlm = seven_b_shaped(depth_divisor, device=device, dtype=dtype)
            log(f"  built in {time.perf_counter() - start:.1f} s")
            text, vision = vlm.model.config.text_config, vlm.model.config.vision_config
            desc = (f"LLaVA-1.5-7B widths/heads/vocab, random weights; measured at depth 1/{depth_divisor} "
                    f"(LLM {text.num_hidden_layers} of 32 layers, tower {vision.num_hidden_layers} of 24, selection "
                    f"layer {vlm.settings.selection_layer}); FLOPs for the full-depth 7B (selection layer 8)")
            share = planted_share if planted_share and planted_share > 0 else None
            out.append(BenchModel(name, vlm, cost_config=llava_7b_config(1), cost_selection_layer=8,
                                  planted_share=share, planted_center=tuple(planted_center), image=image,
                                  question=question, follow_up=follow_up,
                                  lazy_images=[(image, question)], description=desc))
            continue
        path = str(EMBEDDED_MODEL) if name == "embedded" else name
        if name == "embedded" and not (EMBEDDED_MODEL / "config.json").is_file():
            raise ModelLoadError(
                f"the embedded model is not there yet ({EMBEDDED_MODEL / 'config.json'} is missing; it is produced "
                "by train.py): run the bench with --model 7b-shaped or a checkpoint PATH"
            )
        dev = torch.device(device) if device is not None else default_device()
        vlm = FlexVLM.load(path, device=dev, dtype=dtype or default_dtype(dev, random_weights=False))
        samples = [benchmark_sample(seed)[:2] for seed in range(max(1, lazy_samples))]
        out.append(BenchModel(name, vlm, image=image, question=question, follow_up=follow_up, lazy_images=samples,
                              description=f"{vlm.name}: its own, learned selection; FLOPs for the model itself"))
    return out


# ---- planted selection ----------------------------------------------------------------------------------------


@dataclass
class PlantedInfo:
    """The planted selection at one zoom: a side x side square (`tokens` of `hr_tokens`, `share` of them; the
    share asked for is `share_requested`) centred at `center` (fractions y, x), touching `crops_touched` HR crops
    (any placement of the square: between crops_touched_any_placement[0] and [1])."""

    share_requested: float | None
    center: list[float]
    side: int
    tokens: int
    hr_tokens: int
    share: float
    crops_touched: int
    crops_touched_any_placement: list[int]


def planted_region(hr_grid: int, share: float, center=(0.5, 0.5)) -> torch.Tensor:
    """(G*G,) bool: a square of round(sqrt(share) * G) HR tokens a side, centred at `center` (fractions y, x)."""
    side = min(hr_grid, max(1, round(math.sqrt(share) * hr_grid)))
    top = min(max(round(center[0] * hr_grid - side / 2), 0), hr_grid - side)
    left = min(max(round(center[1] * hr_grid - side / 2), 0), hr_grid - side)
    mask = torch.zeros(hr_grid, hr_grid, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask.flatten()


def crops_touched(mask: torch.Tensor, zoom: int) -> int:
    """HR crops (of zoom x zoom) holding at least one token of the (G*G,) mask."""
    G = int(round(mask.numel() ** 0.5))
    g = G // zoom
    rows, cols = mask.reshape(G, G).nonzero(as_tuple=True)
    return len({(int(r) // g, int(c) // g) for r, c in zip(rows, cols)})


def crops_range(side: int, hr_grid: int, zoom: int) -> tuple[int, int]:
    """Fewest and most HR crops a side x side square can touch, over every placement."""
    g = hr_grid // zoom
    spans = [(o + side - 1) // g - o // g + 1 for o in range(hr_grid - side + 1)]
    return min(spans) ** 2, max(spans) ** 2


def planted_info(bm: BenchModel, zoom: int, planted: torch.Tensor) -> PlantedInfo:
    G = int(round(planted.numel() ** 0.5))
    side = int(round(int(planted.sum()) ** 0.5))
    low, high = crops_range(side, G, zoom)
    return PlantedInfo(share_requested=bm.planted_share, center=list(bm.planted_center), side=side,
                       tokens=int(planted.sum()), hr_tokens=G * G, share=int(planted.sum()) / (G * G),
                       crops_touched=crops_touched(planted, zoom), crops_touched_any_placement=[low, high])


# ---- option parsing (the CLI's comma lists) -------------------------------------------------------------------


def parse_list(text: str, kind: Callable = str) -> list:
    """"a, b" -> ["a", "b"], each converted by `kind` (ValueError naming the list when one is not)."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"empty list: {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise ValueError(f"not a list of {kind.__name__}: {text!r}") from None


def parse_center(text: str) -> tuple[float, float]:
    """"0.5,0.5" -> (0.5, 0.5): the planted square's centre, fractions y, x in 0..1."""
    center = parse_list(text, float)
    if len(center) != 2 or not all(0 <= c <= 1 for c in center):
        raise ValueError(f"the planted centre takes two fractions y,x in 0..1, got {text!r}")
    return center[0], center[1]


def parse_zooms(text: str) -> list[int]:
    """"3,2,3" -> [2, 3]: zooms between 1 and 8, sorted, each once."""
    zooms = parse_list(text, int)
    if any(z < 1 or z > 8 for z in zooms):
        raise ValueError(f"zoom must be between 1 and 8, got {text!r}")
    return sorted(set(zooms))
