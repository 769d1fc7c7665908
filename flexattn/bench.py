"""Benchmark runner: what FlexAttention costs against plain LLaVA (`lowres`) and naive high-res (`naive_hd`).

    python -m flexattn bench --model 7b-shaped --zoom 3            # tables
    python -m flexattn bench --model 7b-shaped,embedded --zoom 2,3,4 --json

Models
  * `7b-shaped`: LLaVA-1.5-7B widths, heads and vocabulary (LLaMA-7B + CLIP ViT-L/14-336) with random weights,
    LLM and tower depth divided by `--depth-divisor` (selection layer scaled with it) so it runs on a CPU. Times
    are measured at that depth; analytic FLOPs are reported for the full-depth 7B (the cost model needs no run).
    Random weights attend broadly and would select nearly every HR token, so flex mode gets a planted selection: a
    compact square holding `--planted-share` of the HR tokens (printed with the tables).
  * `embedded` (assets/flexattn-tiny) or any checkpoint PATH / hub id: its own, learned selection; FLOPs for the
    model itself.

Modes, each without and with A-VL for decoding (`--avl off|on|both`, default both; the row's `avl` key)
  * `lowres`, `flex`, `select_all`: the pipeline's modes; flex encodes HR crops lazily (only those a selection
    touches), select_all encodes them all;
  * `naive_hd`: every HR token fed to the LLM as an ordinary input token: the prompt is text + the LR features
    + all G*G HR features (in that order, in the image's place) + text, with plain causal attention in every layer.
    Cost only: no weights are trained for it. With A-VL its cache treats every visual token (LR + HR) as visual.
  * A-VL rows: the call's cache is an `AVLCache` (default AVLSettings unless given), also handed to the FlexState
    (naive_hd: a "lowres" FlexState, so A-VL can hook in). Eviction follows the prefill's attention at each layer,
    so the KV bytes after prefill already show it; decoding steps attend to the kept text + core visual tokens
    (every `refresh_every`-th step: all kept visual). A-VL rows run right after the same mode's rows without A-VL
    and by default with 1 repeat and no warm-up of their own (A-VL changes decoding; the prefill is the same work
    plus A-VL's scoring). When A-VL rows run, every row decodes max(--decode-steps, 6, refresh_every + 1) greedy
    steps, so that decoding passes a refresh step and both variants decode the same number of steps.

What one mode's row holds (one image, one question; per repeat the image caches are dropped, a cold call):
  * `vision_s`: view making + vision tower + projector for the LR view and the HR crops the mode encodes;
  * `prefill_s`: the LLM forward over the prompt (lazy crop encoding inside it is counted as vision, not here);
  * `first_token_s`: both, image to first token; medians over `repeats` after `warmup` excluded calls;
  * `decode_ms_per_token`: median of greedy decoding steps after the last repeat's prefill (and their mean:
    A-VL's refresh steps cost more than its other steps);
  * `peak_memory_bytes`: on CUDA the rise of `torch.cuda.max_memory_allocated` over the call; on the CPU the rise
    of the process's resident-set high-water mark (Linux VmHWM, reset through /proc/self/clear_refs) over the
    call; weights already resident are not counted. None where neither is available;
  * `kv_cache_bytes`: bytes of the key/value tensors the cache holds after prefill (flex keeps no HR entries in the
    cache: its HR keys/values are recomputed from `hr_feature_bytes` of encoded HR features at each pass);
  * `kv_cache_bytes_end`: the same at the end of decoding; A-VL rows also give `kv_cache_bytes_full_cache_end`,
    what their cache would hold without eviction;
  * `visual_attended_per_step`: visual cache entries (LR tokens; naive_hd: LR + HR) the decoding query attends
    to, per decoding step (mean over layers): all of them without A-VL, the core (refresh steps: all kept) with it;
  * `flops`: analytic, image to first token (vision + projector + LLM prefill + HR projections/attention; A-VL rows
    add `avl_scoring`, A-VL's own scoring of the last row where FlexAttention does not already compute it), and
    `decode_flops_per_token`: the mean over the measured decoding steps, from the run's per-step HR counts and
    (A-VL) the keys each layer attended and scored (`cost.call_flops(..., avl_keys=...)`).
Ratios of each mode to naive_hd and to lowres are taken within one (model, zoom, A-VL) group; A-VL against no A-VL
per mode (KV bytes after prefill and at the end, decode time, decode FLOPs, visual tokens attended per step) are
in `avl_comparison` (and `avl_ratios` for the main model and zoom).

On CUDA: bfloat16 and CUDA events; absolute times are reported as such. On the CPU the ratios are the result;
absolute times are CPU wall-clock seconds, printed and labelled as such.
"""

from __future__ import annotations

import ctypes
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import cost
from .avl import AVLCache, AVLSettings
from .image import ImageProcessor
from .loading import EMBEDDED_MODEL, LoadedModel, ModelLoadError
from .pipeline import FlexVLM

MODES = ("lowres", "flex", "select_all", "naive_hd")
# A-VL (adaptive KV-cache decoding) variants run per mode: without and with A-VL (`--avl off|on|both`).
AVL_VARIANTS = (False, True)
AVL_MIN_DECODE_STEPS = 6  # decoding steps when A-VL rows run: past a refresh step (refresh_every 3) and its next
AVL_REPEATS, AVL_WARMUP = 1, 0  # A-VL rows' defaults: they follow the same mode's rows, which warmed it up
MAIN_ZOOM = 3
QUESTION = "what letter is on the red circle ?"
FOLLOW_UP = "what colour is the shape marked k ?"

# Paper targets, checked for the main model (7b-shaped, zoom 3) and printed.
TARGETS = {
    "flex_flops_vs_naive_hd": ("<=", 0.15),
    "flex_flops_vs_lowres": ("<=", 1.3),
    "flex_prefill_time_vs_naive_hd": ("<=", 0.25),
    "followup_speedup": (">=", 3.0),
}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- models ---------------------------------------------------------------------------------------------------


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
    image: object = None
    question: str = QUESTION
    follow_up: str = FOLLOW_UP
    lazy_images: list = field(default_factory=list)  # (image, question) pairs for the lazy-encoding check
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


def word_tokenizer(vocab_size: int = 32000):
    """A word-level tokenizer of `vocab_size` ids: LLaVA's v1 prompt words and the bench questions, then fillers."""
    from .presets import word_tokenizer as build
    from .prompt import SYSTEM

    return build(f"{SYSTEM} USER: ASSISTANT: {QUESTION} {FOLLOW_UP}".split(), vocab_size)


def seven_b_shaped(depth_divisor: int = 8, device=None, dtype=None, seed: int = 0) -> FlexVLM:
    """LLaVA-1.5-7B widths/heads/vocab with random weights, depth divided by `depth_divisor`.

    Parameters are allocated without the default initialisation and filled with uniform noise of std 0.02 (norm
    weights 1, biases 0): the weights only have to be finite and 7B-shaped; flex mode's selection is planted.
    """
    from transformers.initialization import no_init_weights

    from .modeling import FlexLlavaForConditionalGeneration
    from .presets import llava_7b_config

    device = torch.device(device) if device is not None else _default_device()
    dtype = dtype or _default_dtype(device, random_weights=True)
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


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _default_dtype(device: torch.device, random_weights: bool) -> torch.dtype:
    """bfloat16 on CUDA; on the CPU bfloat16 for random-weight cost runs where the CPU has native bf16 matmuls
    (AMX / AVX-512 BF16), else float32. Trained checkpoints on the CPU keep the loader's default (float32)."""
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if random_weights and _cpu_has_fast_bf16() else torch.float32


def benchmark_sample(seed: int = 0):
    """(image, question, follow-up) from the synthetic benchmark (what the embedded model was trained on)."""
    from .synthetic import make_sample

    sample = make_sample(seed, "attribute")
    letter = sample.shapes[0].letter
    return sample.image, sample.question, f"what colour is the shape marked {letter} ?"


def build_models(names: Sequence[str], depth_divisor: int = 8, planted_share: float = 0.10,
                 planted_center=(0.5, 0.5), device=None, dtype=None, lazy_samples: int = 4) -> list[BenchModel]:
    from .presets import llava_7b_config

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
                "by scripts/train_embedded.py): run the bench with --model 7b-shaped or a checkpoint PATH"
            )
        dev = torch.device(device) if device is not None else _default_device()
        vlm = FlexVLM.load(path, device=dev, dtype=dtype or _default_dtype(dev, random_weights=False))
        samples = [benchmark_sample(seed)[:2] for seed in range(max(1, lazy_samples))]
        out.append(BenchModel(name, vlm, image=image, question=question, follow_up=follow_up, lazy_images=samples,
                              description=f"{vlm.name}: its own, learned selection; FLOPs for the model itself"))
    return out


# ---- planted selection ----------------------------------------------------------------------------------------


def planted_region(hr_grid: int, share: float, center=(0.5, 0.5)) -> torch.Tensor:
    """(G*G,) bool: a square of round(sqrt(share) * G) HR tokens a side, centred at `center` (fractions y, x)."""
    side = min(hr_grid, max(1, round(math.sqrt(share) * hr_grid)))
    top = min(max(round(center[0] * hr_grid - side / 2), 0), hr_grid - side)
    left = min(max(round(center[1] * hr_grid - side / 2), 0), hr_grid - side)
    mask = torch.zeros(hr_grid, hr_grid, dtype=torch.bool)
    mask[top : top + side, left : left + side] = True
    return mask.flatten()


def crops_touched(mask: torch.Tensor, zoom: int) -> int:
    G = int(round(mask.numel() ** 0.5))
    g = G // zoom
    rows, cols = mask.reshape(G, G).nonzero(as_tuple=True)
    return len({(int(r) // g, int(c) // g) for r, c in zip(rows, cols)})


def crops_range(side: int, hr_grid: int, zoom: int) -> tuple[int, int]:
    """Fewest and most HR crops a side x side square can touch, over every placement."""
    g = hr_grid // zoom
    spans = [(o + side - 1) // g - o // g + 1 for o in range(hr_grid - side + 1)]
    return min(spans) ** 2, max(spans) ** 2


# ---- measuring ------------------------------------------------------------------------------------------------


class Clock:
    """perf_counter on the CPU; CUDA events on CUDA (read after a synchronize)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        return end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "rise of torch.cuda.max_memory_allocated over the call"
    if _read_status("VmHWM") is not None and _reset_peak_rss():
        return "rise of the resident-set high-water mark (VmHWM) over the call"
    return "unavailable"


def _read_status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory added during a block (see the module docstring); `.bytes` is None where unmeasurable."""

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            gc.collect()
            _malloc_trim()  # hand freed heap pages back, so memory reused from earlier calls counts again
            self._base = _read_status("VmRSS") if _reset_peak_rss() else None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._base is not None:
            peak = _read_status("VmHWM")
            self.bytes = None if peak is None else max(0, peak - self._base)
        return False


def cache_bytes(cache) -> int:
    """Bytes of the key/value tensors a transformers cache holds."""
    total = 0
    layers = getattr(cache, "layers", None)
    if layers is not None:
        for layer in layers:
            for name in ("keys", "values"):
                t = getattr(layer, name, None)
                if isinstance(t, torch.Tensor):
                    total += t.numel() * t.element_size()
        return total
    for item in cache or ():
        for t in item:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@dataclass
class ColdCall:
    vision_s: float
    prefill_s: float
    prompt_len: int  # text + LR tokens (naive_hd adds the HR tokens on top: llm_tokens)
    llm_tokens: int
    crops: int
    attended: list[int]  # HR tokens the last row attended, per layer, in the prefill
    kv_cache_bytes: int  # after prefill (with A-VL: after its eviction, which runs inside the prefill)
    hr_feature_bytes: int
    peak_memory_bytes: int | None
    logits: torch.Tensor
    decode_s: list[float]
    decoded: list[int]
    attended_passes: list[list[int]] = field(default_factory=list)  # [pass][layer], pass 0 the prefill
    projected_passes: list[list[int]] = field(default_factory=list)  # [pass][layer] HR keys/values projected
    kv_cache_bytes_end: int | None = None  # after the last decoding step
    image_tokens: int = 0  # visual tokens in the LLM's prompt (LR; naive_hd: LR + HR)
    avl: AVLCache | None = None  # the A-VL cache of the call (its keys_scored, visual_attended, bytes)


def cold_call(bm: BenchModel, mode: str, zoom: int, clock: Clock, planted=None, lazy: bool = True,
              decode_steps: int = 0, image=None, question=None, avl: AVLSettings | None = None) -> ColdCall:
    """One cold call: drop cached features, encode the image for `mode`, prefill, then `decode_steps` greedy steps.

    With `avl`, the call's KV cache is an AVLCache handed to the FlexState as well (naive_hd, which has no FlexState
    of its own, gets a "lowres" one so that A-VL can hook into its attention; all its LR + HR tokens are visual).
    """
    vlm, model = bm.vlm, bm.vlm.model
    image = bm.image if image is None else image
    question = bm.question if question is None else question
    settings = vlm.settings.with_overrides(zoom=zoom)
    n_layers = model.config.text_config.num_hidden_layers
    vlm._cache.clear()
    encode_spans = []
    original = model.encode_pixels

    def timed_encode(pixels):
        start = clock.mark()
        out = original(pixels)
        encode_spans.append((start, clock.mark()))
        return out

    model.encode_pixels = timed_encode  # HR crops encoded lazily inside the forward are counted as vision
    try:
        with torch.inference_mode(), PeakMemory(vlm.device) as memory:
            t0 = clock.mark()
            eager = mode in ("select_all", "naive_hd") or (mode == "flex" and not lazy)
            prepared = vlm.prepare(image, highres=eager, zoom=zoom, lazy=not eager)
            t1 = clock.mark()
            prepare_spans = len(encode_spans)
            embeds, start = vlm.prompt_embeds(prepared, question)
            prompt_len = embeds.shape[1]
            image_tokens = prepared.lr_grid**2
            state = cache = None
            if mode == "naive_hd":
                after_lr = start + prepared.lr_grid**2
                hr = prepared.hr_features[None].to(embeds.dtype)
                embeds = torch.cat([embeds[:, :after_lr], hr, embeds[:, after_lr:]], dim=1)
                image_tokens += hr.shape[1]
                if avl is not None:
                    state = vlm.flex_state(prepared, "lowres", settings, start)
            else:
                state = vlm.flex_state(prepared, mode, settings, start,
                                       planted_selection=planted if mode == "flex" else None)
            if avl is not None:
                cache = AVLCache(avl, n_layers, start, image_tokens)
                state.avl = cache
            t2 = clock.mark()
            out = model(inputs_embeds=embeds, flex_state=state, past_key_values=cache, logits_to_keep=1,
                        use_cache=True)
            t3 = clock.mark()
            cache = out.past_key_values
            kv = cache_bytes(cache)
        logits = out.logits[0, -1].float().cpu()
        decode_s, decoded = [], []
        if decode_steps:
            embed = model.get_input_embeddings()
            token = out.logits[:, -1].argmax(-1)
            with torch.inference_mode():
                for _ in range(decode_steps):
                    decoded.append(int(token[0]))
                    a = clock.mark()
                    step = model(inputs_embeds=embed(token)[:, None], past_key_values=cache, flex_state=state,
                                 logits_to_keep=1, use_cache=True)
                    b = clock.mark()
                    decode_s.append((a, b))
                    cache = step.past_key_values
                    token = step.logits[:, -1].argmax(-1)
        clock.sync()
        lazy_s = sum(clock.seconds(a, b) for a, b in encode_spans[prepare_spans:])
        if state is not None and state.pass_index >= 0:
            attended_passes = state.hr_attended(n_layers)
            projected_passes = state.hr_projected(n_layers)
        else:
            attended_passes = [[0] * n_layers for _ in range(1 + len(decoded))]
            projected_passes = attended_passes
        crops = prepared.hr.crops_encoded if mode != "lowres" else 0
        hr_bytes = crops * prepared.lr_grid**2 * model.config.text_config.hidden_size * model.dtype.itemsize
        return ColdCall(
            vision_s=clock.seconds(t0, t1) + lazy_s,
            prefill_s=clock.seconds(t2, t3) - lazy_s,
            prompt_len=prompt_len,
            llm_tokens=embeds.shape[1],
            crops=crops,
            attended=attended_passes[0],
            kv_cache_bytes=kv,
            hr_feature_bytes=hr_bytes,
            peak_memory_bytes=memory.bytes,
            logits=logits,
            decode_s=[clock.seconds(a, b) for a, b in decode_s],
            decoded=decoded,
            attended_passes=attended_passes,
            projected_passes=projected_passes,
            kv_cache_bytes_end=cache_bytes(cache),
            image_tokens=image_tokens,
            avl=cache if avl is not None else None,
        )
    finally:
        del model.encode_pixels  # back to the class's method


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _full_depth_counts(bm: BenchModel, attended: list[int]) -> list[int]:
    """HR tokens attended per layer of the cost model: the run's own, or (full-depth 7B) the run's mean over its
    HR layers at every HR layer of the deeper model."""
    if not bm.scaled_cost:
        return list(attended)
    s_run = bm.vlm.settings.selection_layer
    hr_layers = attended[s_run + 1 :]
    m = round(sum(hr_layers) / len(hr_layers)) if hr_layers else 0
    n = bm.cost_config.text_config.num_hidden_layers
    sel = bm.cost_selection_layer
    return [0 if layer <= sel else m for layer in range(n)]


def _full_depth_avl_keys(bm: BenchModel, keys_scored) -> list[list[tuple[int, int]]]:
    """A-VL's (keys attended, extra keys scored) per pass and layer for the cost model's depth: the run's own, or
    (full-depth 7B) per pass the run's mean below its selection layer at every layer below the deeper model's, and
    its mean from the selection layer on at every layer from there (A-VL keeps the same number of entries in every
    layer; FlexAttention's selection scoring adds keys only from the selection layer on)."""
    if not bm.scaled_cost:
        return [[tuple(k) for k in per_layer] for per_layer in keys_scored]
    s_run, sel = bm.vlm.settings.selection_layer, bm.cost_selection_layer
    n = bm.cost_config.text_config.num_hidden_layers

    def mean(items):
        return tuple(round(sum(k[i] for k in items) / len(items)) for i in (0, 1))

    out = []
    for per_layer in keys_scored:
        below, above = per_layer[:s_run], per_layer[s_run:]
        low = mean(below) if below else mean(above)
        high = mean(above) if above else low
        out.append([low if layer < sel else high for layer in range(n)])
    return out


def analytic_flops(bm: BenchModel, mode: str, zoom: int, prompt_len: int, attended: list[int],
                   crops: int | None, decode_passes: Sequence[Sequence[int]] | None = None,
                   avl_keys=None, projected: Sequence[Sequence[int]] | None = None) -> tuple[dict, dict | None]:
    """(FLOPs image to first token per part, decoding FLOPs per token per part) for the cost model's config.

    attended: the prefill's HR counts per layer (measured depth); decode_passes: the same for each measured
    decoding step (default: one step with the prefill's counts); avl_keys: an A-VL call's keys_scored[pass][layer]
    (every pass, the prefill first); projected: HR tokens whose keys/values each pass projected (flexattn
    projects them once per image; default: every attended token in every pass). Decoding FLOPs are the mean over
    the decoding steps; None for an A-VL call that decoded nothing.
    """
    if decode_passes is None or not len(decode_passes):
        if avl_keys is not None and len(avl_keys) > 1:
            decode_passes = [attended] * (len(avl_keys) - 1)
        else:
            decode_passes = [] if avl_keys is not None else [attended]
    passes = [attended, *decode_passes]
    counts = [_full_depth_counts(bm, c) for c in passes] if mode == "flex" else None
    keys = _full_depth_avl_keys(bm, avl_keys[: len(passes)]) if avl_keys is not None else None
    proj = None
    if projected is not None and mode in ("flex", "select_all"):
        proj = [_full_depth_counts(bm, p) for p in projected[: len(passes)]]
        if mode == "select_all":  # the cost model fills in select_all's counts; scale the projected ones the same way
            hr_tokens = ((bm.cost_config.vision_config.image_size // bm.cost_config.vision_config.patch_size) * zoom) ** 2
            proj = [[hr_tokens if c else 0 for c in p] for p in proj]
    args = dict(selection_layer=bm.cost_selection_layer, zoom=zoom, hr_crops=crops if mode == "flex" else None)
    first = cost.call_flops(bm.cost_config, mode, prompt_len, 1, counts[:1] if counts else None,
                            avl_keys=keys[:1] if keys else None, hr_projected=proj[:1] if proj else None, **args)
    steps = len(passes) - 1
    if not steps:
        return first, None
    total = cost.call_flops(bm.cost_config, mode, prompt_len, len(passes), counts, avl_keys=keys, hr_projected=proj,
                            **args)
    decode = {k: round((total[k] - first[k]) / steps) for k in ("llm", "hr_attention", "avl_scoring", "total")
              if k in total}
    return first, decode


def run_flops_at_depth(bm: BenchModel, mode: str, zoom: int, prompt_len: int, attended, crops,
                       avl_keys=None) -> int | None:
    """FLOPs at the measured depth (only differs from `flops` for the 7b-shaped model)."""
    if not bm.scaled_cost:
        return None
    config = bm.vlm.model.config
    hr = [list(attended)] if mode == "flex" else None
    return cost.call_flops(config, mode, prompt_len, 1, hr, selection_layer=bm.vlm.settings.selection_layer,
                           zoom=zoom, hr_crops=crops if mode == "flex" else None,
                           avl_keys=[list(avl_keys[0])] if avl_keys else None)["total"]


def _avl_settings(avl) -> AVLSettings | None:
    if avl is None or avl is False:
        return None
    return AVLSettings() if avl is True else avl


def avl_decode_steps(decode_steps: int, avl: AVLSettings | None) -> int:
    """Decoding steps of every row when A-VL rows run: enough to pass a refresh step and the step after it."""
    if avl is None:
        return decode_steps
    return max(decode_steps, AVL_MIN_DECODE_STEPS, avl.refresh_every + 1)


def measure_mode(bm: BenchModel, mode: str, zoom: int, clock: Clock, *, repeats: int, warmup: int,
                 decode_steps: int, measure: bool = True, planted=None, avl: AVLSettings | bool | None = None) -> dict:
    """One row: `warmup` + `repeats` cold calls of `mode` (the last one decodes `decode_steps` greedy steps), with
    A-VL when `avl` is given (True: default AVLSettings)."""
    avl = _avl_settings(avl)
    row = {"model": bm.name, "zoom": zoom, "mode": mode, "avl": avl is not None, "measured": measure}
    calls = []
    if measure:
        for i in range(warmup + repeats):
            last = i == warmup + repeats - 1
            call = cold_call(bm, mode, zoom, clock, planted=planted, decode_steps=decode_steps if last else 0,
                             avl=avl)
            tag = "warm-up" if i < warmup else f"repeat {i - warmup + 1}/{repeats}"
            extra = ""
            if last and call.decode_s:
                extra = (f"  decode {statistics.median(call.decode_s) * 1000:7.1f} ms/token (median of "
                         f"{len(call.decode_s)})  KV {call.kv_cache_bytes / 2**20:.1f} -> "
                         f"{call.kv_cache_bytes_end / 2**20:.1f} MiB")
            log(f"  [{bm.name} zoom {zoom}] {mode:<10} {'A-VL' if avl else '    '} {tag:<12} vision "
                f"{call.vision_s:7.3f} s  prefill {call.prefill_s:7.3f} s  ({call.llm_tokens} LLM tokens, "
                f"{call.crops} HR crops){extra}")
            if i >= warmup:
                calls.append(call)
        ref = calls[-1]
        prompt_len, attended, crops = ref.prompt_len, ref.attended, ref.crops
        llm_tokens, image_tokens = ref.llm_tokens, ref.image_tokens
        decode_passes = ref.attended_passes[1:]
        projected = ref.projected_passes
        avl_keys = ref.avl.keys_scored if ref.avl is not None else None
    else:  # naive_hd beyond --naive-max-zoom: analytic figures only
        prepared = bm.vlm.prepare(bm.image, highres=False, zoom=zoom)
        embeds, _ = bm.vlm.prompt_embeds(prepared, bm.question)
        prompt_len = embeds.shape[1]
        G = prepared.lr_grid * zoom
        attended, crops = [], zoom * zoom
        llm_tokens, image_tokens = prompt_len + G * G, prepared.lr_grid**2 + G * G
        decode_passes = avl_keys = projected = None
    if avl is not None and avl_keys is None:  # A-VL's keys come from a run: no analytic A-VL figures
        flops, decode = None, None
    else:
        flops, decode = analytic_flops(bm, mode, zoom, prompt_len, attended, crops, decode_passes, avl_keys,
                                       projected)
    v = bm.vlm.model.config.vision_config
    g = v.image_size // v.patch_size
    s_run = bm.vlm.settings.selection_layer
    hr_layers = attended[s_run + 1 :] if attended else []
    row.update({
        "llm_tokens": llm_tokens,
        "prompt_tokens": prompt_len,
        "lr_tokens": g * g,
        "hr_tokens": (g * zoom) ** 2,
        "image_tokens_in_prompt": image_tokens,
        "hr_crops_encoded": crops if mode != "lowres" else 0,
        "hr_attended_per_layer": attended,
        # naive_hd: every HR token is an ordinary input token, attended in every layer
        "hr_attended_mean": float((g * zoom) ** 2) if mode == "naive_hd" else
                            (sum(hr_layers) / len(hr_layers)) if hr_layers else 0.0,
        "flops": flops,
        "decode_flops_per_token": decode["total"] if decode else None,
        "decode_flops_per_token_parts": decode,
        "flops_at_measured_depth": None if flops is None else
                                   run_flops_at_depth(bm, mode, zoom, prompt_len, attended, crops, avl_keys),
    })
    if avl is not None:
        row["avl_settings"] = avl.to_dict()
    if measure:
        last = calls[-1]
        steps = last.decode_s
        if last.avl is not None:  # visual cache entries attended per decoding step, mean over layers
            per_step = [sum(layers) / len(layers) for layers in last.avl.visual_attended[1:] if layers]
        else:
            per_step = [float(image_tokens)] * len(steps)
        row.update({
            "vision_s": _median([c.vision_s for c in calls]),
            "prefill_s": _median([c.prefill_s for c in calls]),
            "first_token_s": _median([c.vision_s + c.prefill_s for c in calls]),
            "prefill_s_repeats": [c.prefill_s for c in calls],
            "decode_steps": len(steps),
            "decode_ms_per_token": (_median(steps) * 1000) if steps else None,
            "decode_ms_per_token_mean": (statistics.mean(steps) * 1000) if steps else None,
            "decode_ms_steps": [s * 1000 for s in steps],
            "peak_memory_bytes": max((c.peak_memory_bytes for c in calls if c.peak_memory_bytes is not None),
                                     default=None),
            "kv_cache_bytes": last.kv_cache_bytes,
            "kv_cache_bytes_end": last.kv_cache_bytes_end,
            "kv_cache_bytes_full_cache_end": sum(last.avl.full_cache_nbytes_per_layer()) if last.avl is not None
                                             else last.kv_cache_bytes_end,
            "hr_feature_bytes": last.hr_feature_bytes,
            "visual_attended_per_step": per_step,
            "visual_attended_mean": statistics.mean(per_step) if per_step else None,
        })
        if last.avl is not None:
            row["kv_cache_bytes_per_layer_end"] = last.avl.nbytes_per_layer()
    else:
        row.update({k: None for k in ("vision_s", "prefill_s", "first_token_s", "decode_ms_per_token",
                                      "decode_ms_per_token_mean", "peak_memory_bytes", "kv_cache_bytes",
                                      "kv_cache_bytes_end", "kv_cache_bytes_full_cache_end", "hr_feature_bytes",
                                      "visual_attended_mean")})
        row.update({"prefill_s_repeats": [], "decode_ms_steps": [], "visual_attended_per_step": [],
                    "decode_steps": 0})
    return row


def ratios(rows: list[dict]) -> dict:
    """Per mode: its FLOPs and times over naive_hd's and lowres's in the same (model, zoom, A-VL) group."""
    by_mode = {r["mode"]: r for r in rows}
    out = {}

    def ratio(a, b):
        return a / b if a is not None and b else None

    def total(row):
        return (row.get("flops") or {}).get("total")

    for mode, r in by_mode.items():
        naive, low = by_mode.get("naive_hd", {}), by_mode.get("lowres", {})
        out[mode] = {
            "flops_vs_naive_hd": ratio(total(r), total(naive)),
            "flops_vs_lowres": ratio(total(r), total(low)),
            "prefill_time_vs_naive_hd": ratio(r.get("prefill_s"), naive.get("prefill_s")),
            "prefill_time_vs_lowres": ratio(r.get("prefill_s"), low.get("prefill_s")),
            "first_token_time_vs_naive_hd": ratio(r.get("first_token_s"), naive.get("first_token_s")),
            "first_token_time_vs_lowres": ratio(r.get("first_token_s"), low.get("first_token_s")),
        }
    return out


def avl_ratios(without: list[dict], with_avl: list[dict]) -> dict:
    """Per mode: the A-VL row's figures over the same mode's row without A-VL (same model and zoom)."""
    plain = {r["mode"]: r for r in without}
    out = {}

    def ratio(a, b):
        return a / b if a is not None and b else None

    for r in with_avl:
        base = plain.get(r["mode"])
        if base is None:
            continue
        out[r["mode"]] = {
            "kv_ratio": ratio(r.get("kv_cache_bytes_end"), base.get("kv_cache_bytes_end")),
            "kv_ratio_after_prefill": ratio(r.get("kv_cache_bytes"), base.get("kv_cache_bytes")),
            "kv_ratio_vs_own_full_cache": ratio(r.get("kv_cache_bytes_end"), r.get("kv_cache_bytes_full_cache_end")),
            "decode_time_ratio": ratio(r.get("decode_ms_per_token"), base.get("decode_ms_per_token")),
            "decode_time_ratio_mean": ratio(r.get("decode_ms_per_token_mean"), base.get("decode_ms_per_token_mean")),
            "decode_flops_ratio": ratio(r.get("decode_flops_per_token"), base.get("decode_flops_per_token")),
            "visual_attended_ratio": ratio(r.get("visual_attended_mean"), base.get("visual_attended_mean")),
            "prefill_time_ratio": ratio(r.get("prefill_s"), base.get("prefill_s")),
        }
    return out


def measure_followup(bm: BenchModel, zoom: int, clock: Clock, *, repeats: int, warmup: int, new_tokens: int,
                     planted=None, mode: str = "flex") -> dict:
    """A cold first question against a second question on the same image (cached LR/HR features, reused prompt
    prefix), both end to end through FlexVLM.answer."""
    vlm = bm.vlm
    options = dict(mode=mode, max_new_tokens=new_tokens, trace=False, zoom=zoom, lazy_hr=True,
                   planted_selection=planted if mode == "flex" else None)
    cold_s, warm_s, cold_first_s, warm_first_s = [], [], [], []
    first = second = None

    def to_first_token(wall: float, answer) -> float:  # end to end, less the decoding after the first token
        latency = answer.stats["latency_s"]
        return wall - (latency["total"] - latency["prefill"])

    for i in range(warmup + repeats):
        vlm._cache.clear()
        clock.sync()
        t0 = time.perf_counter()
        first = vlm.answer(bm.image, bm.question, **options)
        clock.sync()
        t1 = time.perf_counter()
        second = vlm.answer(bm.image, bm.follow_up, history=[(bm.question, first.text)], **options)
        clock.sync()
        t2 = time.perf_counter()
        tag = "warm-up" if i < warmup else f"repeat {i - warmup + 1}/{repeats}"
        log(f"  [{bm.name} zoom {zoom}] follow-up {tag:<12} first {t1 - t0:7.3f} s  follow-up {t2 - t1:7.3f} s  "
            f"(to the first answer token: {to_first_token(t1 - t0, first):.3f} s, "
            f"{to_first_token(t2 - t1, second):.3f} s; prefix reused: {second.stats['prefix_tokens_reused']} tokens)")
        if i >= warmup:
            cold_s.append(t1 - t0)
            warm_s.append(t2 - t1)
            cold_first_s.append(to_first_token(t1 - t0, first))
            warm_first_s.append(to_first_token(t2 - t1, second))
    cold, warm = _median(cold_first_s), _median(warm_first_s)
    cold_full, warm_full = _median(cold_s), _median(warm_s)
    return {
        "model": bm.name, "zoom": zoom, "mode": mode, "max_new_tokens": new_tokens,
        # headline: end to end (image, or cached features, to the first answer token): prefill-dominated
        "first_s": cold, "followup_s": warm, "followup_speedup": cold / warm if warm else None,
        # the same calls to their last token (max_new_tokens answers): decoding, identical in both, dilutes it
        "first_full_s": cold_full, "followup_full_s": warm_full,
        "followup_speedup_full_answer": cold_full / warm_full if warm_full else None,
        "first_s_repeats": cold_first_s, "followup_s_repeats": warm_first_s,
        "first_full_s_repeats": cold_s, "followup_full_s_repeats": warm_s,
        "first_prompt_tokens": first.stats["prompt_tokens"],
        "followup_prompt_tokens": second.stats["prompt_tokens"],
        "prefix_tokens_reused": second.stats["prefix_tokens_reused"],
        "first_latency_s": first.stats["latency_s"], "followup_latency_s": second.stats["latency_s"],
        "first_generated_tokens": first.stats["generated_tokens"],
        "followup_generated_tokens": second.stats["generated_tokens"],
    }


def measure_lazy(bm: BenchModel, zoom: int, clock: Clock, *, new_tokens: int, planted=None) -> dict:
    """Lazy vs eager HR encoding in flex mode: crops encoded, and whether outputs are identical (prefill logits
    bit for bit, and the generated tokens), over the model's lazy-check images."""
    vlm = bm.vlm
    samples = []
    for image, question in bm.lazy_images or [(bm.image, bm.question)]:
        answers = {}
        for lazy in (False, True):
            vlm._cache.clear()
            answers[lazy] = vlm.answer(image, question, mode="flex", max_new_tokens=new_tokens, trace=False,
                                       zoom=zoom, lazy_hr=lazy, planted_selection=planted)
        calls = {lazy: cold_call(bm, "flex", zoom, clock, planted=planted, lazy=lazy, image=image, question=question)
                 for lazy in (False, True)}
        samples.append({
            "crops_encoded_lazy": answers[True].stats["hr_crops_encoded"],
            "crops_encoded_eager": answers[False].stats["hr_crops_encoded"],
            "crops_encoded_lazy_prefill": calls[True].crops,
            "identical_tokens": answers[True].token_ids == answers[False].token_ids,
            "identical_prefill_logits": bool(torch.equal(calls[True].logits, calls[False].logits)),
            "vision_s_lazy": calls[True].vision_s,
            "vision_s_eager": calls[False].vision_s,
        })
    n = len(samples)
    out = {
        "model": bm.name, "zoom": zoom, "samples": n, "crops_total": zoom * zoom,
        "crops_encoded_lazy_mean": sum(s["crops_encoded_lazy"] for s in samples) / n,
        "crops_encoded_eager_mean": sum(s["crops_encoded_eager"] for s in samples) / n,
        "identical_outputs": all(s["identical_tokens"] and s["identical_prefill_logits"] for s in samples),
        "per_sample": samples,
    }
    log(f"  [{bm.name} zoom {zoom}] lazy HR: {out['crops_encoded_lazy_mean']:g} of {zoom * zoom} crops encoded "
        f"(eager {out['crops_encoded_eager_mean']:g}); identical outputs: {out['identical_outputs']}")
    return out


def planted_info(bm: BenchModel, zoom: int, planted: torch.Tensor) -> dict:
    G = int(round(planted.numel() ** 0.5))
    side = int(round(int(planted.sum()) ** 0.5))
    low, high = crops_range(side, G, zoom)
    return {"share_requested": bm.planted_share, "center": list(bm.planted_center), "side": side,
            "tokens": int(planted.sum()), "hr_tokens": G * G, "share": int(planted.sum()) / (G * G),
            "crops_touched": crops_touched(planted, zoom), "crops_touched_any_placement": [low, high]}


def run(models: Sequence[BenchModel], zooms: Sequence[int] = (MAIN_ZOOM,), *, repeats: int = 3, warmup: int = 1,
        decode_steps: int = 4, followup_tokens: int = 4, modes: Sequence[str] = MODES,
        naive_max_zoom: int | None = None, followup: bool = True, lazy_check: bool = True,
        avl_variants: Sequence[bool] = AVL_VARIANTS, avl_settings: AVLSettings | None = None,
        avl_repeats: int | None = AVL_REPEATS, avl_warmup: int | None = AVL_WARMUP) -> dict:
    """Benchmark every model at every zoom; returns the JSON-able result (see the module docstring).

    avl_variants: which of without (False) / with (True) A-VL to run per mode; avl_settings: A-VL's settings
    (default AVLSettings()); avl_repeats / avl_warmup: the A-VL rows' repeats and warm-up calls (None: the same as
    `repeats` / `warmup`).
    """
    if not models:
        raise ValueError("no model to benchmark")
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    variants = [v for v in (False, True) if v in tuple(avl_variants)]
    if not variants:
        raise ValueError("avl_variants must hold False, True or both")
    avl = (avl_settings or AVLSettings()) if True in variants else None
    avl_repeats = repeats if avl_repeats is None else avl_repeats
    avl_warmup = warmup if avl_warmup is None else avl_warmup
    if avl_repeats < 1 or avl_warmup < 0:
        raise ValueError("avl_repeats must be >= 1 and avl_warmup >= 0")
    steps = avl_decode_steps(decode_steps, avl)
    device = models[0].vlm.device
    clock = Clock(device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "timing": "CUDA events, absolute times" if clock.cuda else
                  "CPU wall-clock (perf_counter): compare ratios; absolute times are this CPU's",
        "memory": memory_method(device),
        "repeats": repeats, "warmup": warmup, "decode_steps": steps, "decode_steps_requested": decode_steps,
        "avl_variants": variants,
        "avl": avl.to_dict() if avl is not None else None,
        "avl_repeats": avl_repeats if avl is not None else None,
        "avl_warmup": avl_warmup if avl is not None else None,
        "models": [], "runs": [], "groups": [], "avl_comparison": [], "followup": [], "lazy_hr": [],
    }
    started = time.perf_counter()
    for bm in models:
        model = bm.vlm.model
        text, vision = model.config.text_config, model.config.vision_config
        result["models"].append({
            "name": bm.name, "description": bm.description, "dtype": str(model.dtype).replace("torch.", ""),
            "measured_llm_layers": text.num_hidden_layers, "measured_tower_layers": vision.num_hidden_layers,
            "measured_selection_layer": bm.vlm.settings.selection_layer,
            "flops_llm_layers": bm.cost_config.text_config.num_hidden_layers,
            "flops_tower_layers": bm.cost_config.vision_config.num_hidden_layers,
            "flops_selection_layer": bm.cost_selection_layer,
            "lowres_size": bm.vlm.settings.lowres_size,
            "planted_share": bm.planted_share,
            "planted": {},
        })
        for zoom in zooms:
            G = (vision.image_size // vision.patch_size) * zoom
            planted = planted_region(G, bm.planted_share, bm.planted_center) if bm.planted_share else None
            if planted is not None:
                info = planted_info(bm, zoom, planted)
                result["models"][-1]["planted"][str(zoom)] = info
                log(f"[{bm.name} zoom {zoom}] planted selection: {info['side']}x{info['side']} = {info['tokens']} of "
                    f"{info['hr_tokens']} HR tokens ({info['share']:.1%}), touching {info['crops_touched']} of "
                    f"{zoom * zoom} crops")
            rows = {variant: [] for variant in variants}
            for mode in modes:  # per mode: without A-VL, then with it (warmed up by the calls before it)
                measure = not (mode == "naive_hd" and naive_max_zoom is not None and zoom > naive_max_zoom)
                for variant in variants:
                    n, w = (avl_repeats, avl_warmup) if variant else (repeats, warmup)
                    rows[variant].append(measure_mode(bm, mode, zoom, clock, repeats=n, warmup=w,
                                                      decode_steps=steps, measure=measure, planted=planted,
                                                      avl=avl if variant else None))
            for variant in variants:
                result["runs"].extend(rows[variant])
                result["groups"].append({"model": bm.name, "zoom": zoom, "avl": variant,
                                         "ratios": ratios(rows[variant])})
            if len(variants) == 2:
                result["avl_comparison"].append({"model": bm.name, "zoom": zoom,
                                                 "ratios": avl_ratios(rows[False], rows[True])})
            if followup and "flex" in modes:
                result["followup"].append(measure_followup(bm, zoom, clock, repeats=repeats, warmup=warmup,
                                                           new_tokens=followup_tokens, planted=planted))
            if lazy_check and "flex" in modes:
                result["lazy_hr"].append(measure_lazy(bm, zoom, clock, new_tokens=followup_tokens, planted=planted))
    main = models[0].name
    main_zoom = MAIN_ZOOM if MAIN_ZOOM in zooms else zooms[0]
    result["main"] = {"model": main, "zoom": main_zoom, "avl": variants[0]}  # without A-VL where it ran
    group = next(g for g in result["groups"] if (g["model"], g["zoom"], g["avl"]) == (main, main_zoom, variants[0]))
    result["ratios"] = group["ratios"]
    comparison = next((c for c in result["avl_comparison"] if (c["model"], c["zoom"]) == (main, main_zoom)), None)
    result["avl_ratios"] = comparison["ratios"] if comparison else None
    fu = next((f for f in result["followup"] if (f["model"], f["zoom"]) == (main, main_zoom)), None)
    result["followup_speedup"] = fu["followup_speedup"] if fu else None
    result["targets"] = check_targets(result)
    result["targets_apply"] = main == "7b-shaped"  # the issue's targets are set for the 7b-shaped model
    result["elapsed_s"] = time.perf_counter() - started
    return result


def check_targets(result: dict) -> dict:
    flex = result["ratios"].get("flex", {})
    values = {
        "flex_flops_vs_naive_hd": flex.get("flops_vs_naive_hd"),
        "flex_flops_vs_lowres": flex.get("flops_vs_lowres"),
        "flex_prefill_time_vs_naive_hd": flex.get("prefill_time_vs_naive_hd"),
        "followup_speedup": result.get("followup_speedup"),
    }
    out = {}
    for name, (op, limit) in TARGETS.items():
        v = values[name]
        met = None if v is None else (v <= limit if op == "<=" else v >= limit)
        out[name] = {"value": v, "target": f"{op} {limit}", "met": met}
    lazy = next((x for x in result["lazy_hr"]
                 if (x["model"], x["zoom"]) == (result["main"]["model"], result["main"]["zoom"])), None)
    if lazy is not None:
        out["lazy_hr_identical_outputs"] = {"value": lazy["identical_outputs"], "target": "true",
                                            "met": lazy["identical_outputs"]}
        out["lazy_hr_fewer_crops"] = {"value": lazy["crops_encoded_lazy_mean"], "target": f"< {lazy['crops_total']}",
                                      "met": lazy["crops_encoded_lazy_mean"] < lazy["crops_total"]}
    return out


# ---- reporting ------------------------------------------------------------------------------------------------


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _scale(value: float) -> tuple[float, str]:
    return next((x for x in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs")) if value >= x[0]), (1.0, "FLOPs"))


def _mib(value) -> str:
    return _fmt(None if value is None else value / 2**20, ".1f")


def _prefill_table(result: dict, m: dict, group: dict, rows: list[dict], unit: str) -> list[str]:
    side = m["lowres_size"] * group["zoom"]
    lines = ["", f"zoom {group['zoom']} (HR {side} px, {rows[0]['hr_tokens']} HR tokens), "
                 f"A-VL {'on' if group['avl'] else 'off'}"
             + (f" ({result['avl_repeats']} repeat(s), {result['avl_warmup']} warm-up: A-VL rows run right after "
                "the same mode without A-VL)" if group["avl"] and (result["avl_repeats"], result["avl_warmup"]) !=
                (result["repeats"], result["warmup"]) else "")]
    scale, unit_f = _scale(max((r["flops"] or {}).get("total", 0) for r in rows))
    lines.append(f"FLOPs in {unit_f}" + (" (full-depth model)" if m["flops_llm_layers"] !=
                                          m["measured_llm_layers"] else "")
                 + ("; A-VL: its own scoring of the last row" if group["avl"] else ""))
    header = (f"{'mode':<11}{'LLM tok':>8}{'crops':>6}{'HR att':>7} | {'vision':>7}{'proj':>7}{'LLM':>8}"
              f"{'HR':>7}{'A-VL':>7}{'total':>8}{'/naive':>7}{'/lowres':>8} | {'prefill ' + unit:>12}{'/naive':>7}"
              f"{'/lowres':>8}{'1st tok':>8}{'/naive':>7} | {'dec ms/t':>9}{'peak MiB':>9}{'KV MiB':>8}")
    lines += [header, "-" * len(header)]
    for r in rows:
        f = {k: v / scale for k, v in (r["flops"] or {}).items()}
        q = group["ratios"][r["mode"]]
        lines.append(
            f"{r['mode']:<11}{r['llm_tokens']:>8}{r['hr_crops_encoded']:>6}{r['hr_attended_mean']:>7.0f} | "
            f"{_fmt(f.get('vision'), '.2f'):>7}{_fmt(f.get('projector'), '.3f'):>7}{_fmt(f.get('llm'), '.2f'):>8}"
            f"{_fmt(f.get('hr_attention'), '.3f'):>7}{_fmt(f.get('avl_scoring'), '.3f'):>7}"
            f"{_fmt(f.get('total'), '.2f'):>8}{_fmt(q['flops_vs_naive_hd'], '.3f'):>7}"
            f"{_fmt(q['flops_vs_lowres'], '.2f'):>8} | "
            f"{_fmt(r['prefill_s'], '.3f'):>12}{_fmt(q['prefill_time_vs_naive_hd'], '.3f'):>7}"
            f"{_fmt(q['prefill_time_vs_lowres'], '.2f'):>8}{_fmt(r['first_token_s'], '.2f'):>8}"
            f"{_fmt(q['first_token_time_vs_naive_hd'], '.3f'):>7} | "
            f"{_fmt(r['decode_ms_per_token'], '.1f'):>9}"
            f"{_fmt(None if r['peak_memory_bytes'] is None else r['peak_memory_bytes'] / 2**20, '.0f'):>9}"
            f"{_mib(r['kv_cache_bytes']):>8}"
            + ("" if r["measured"] else "   (not measured: --naive-max-zoom)")
        )
    return lines


def _decode_table(result: dict, m: dict, zoom: int) -> list[str]:
    """Decoding per mode, without and with A-VL, and A-VL's figures over the same mode's without it."""
    rows = [r for r in result["runs"] if (r["model"], r["zoom"]) == (m["name"], zoom)]
    comparison = next((c["ratios"] for c in result["avl_comparison"] if (c["model"], c["zoom"]) == (m["name"], zoom)),
                      {})
    # scaled to the smallest: per-token figures differ by orders of magnitude (select_all recomputes HR keys)
    scale, unit_f = _scale(min((r["decode_flops_per_token"] for r in rows if r["decode_flops_per_token"]),
                               default=0))
    depth = " (full-depth model)" if m["flops_llm_layers"] != m["measured_llm_layers"] else ""
    lines = ["", f"decoding, zoom {zoom}: {result['decode_steps']} greedy steps after the last repeat's prefill; KV "
                 f"MiB at measured depth; FLOPs per token in {unit_f}{depth}; visual = cache entries attended per "
                 "step (LR; naive_hd LR + HR), mean over layers; /off = A-VL on over off, same mode"]
    header = (f"{'mode':<11}{'A-VL':>5} | {'KV MiB':>7}{'KV end':>8}{'/off':>7}{'/off pre':>9} | {'ms/t med':>9}"
              f"{'/off':>7}{'ms/t mean':>10}{'/off':>7} | {'dec ' + unit_f[:-1] + '/t':>11}{'A-VL':>7}{'/off':>7} | "
              f"{'visual':>8}{'/off':>7}  per step")
    lines += [header, "-" * len(header)]
    for mode in MODES:
        for r in (x for x in rows if x["mode"] == mode):
            q = comparison.get(mode, {}) if r["avl"] else {}
            parts = r["decode_flops_per_token_parts"] or {}
            per_step = " ".join(f"{v:.0f}" for v in r["visual_attended_per_step"])
            dec = None if r["decode_flops_per_token"] is None else r["decode_flops_per_token"] / scale
            lines.append(
                f"{mode:<11}{'on' if r['avl'] else 'off':>5} | {_mib(r['kv_cache_bytes']):>7}"
                f"{_mib(r['kv_cache_bytes_end']):>8}{_fmt(q.get('kv_ratio'), '.3f', ''):>7}"
                f"{_fmt(q.get('kv_ratio_after_prefill'), '.3f', ''):>9} | "
                f"{_fmt(r['decode_ms_per_token'], '.1f'):>9}{_fmt(q.get('decode_time_ratio'), '.3f', ''):>7}"
                f"{_fmt(r['decode_ms_per_token_mean'], '.1f'):>10}"
                f"{_fmt(q.get('decode_time_ratio_mean'), '.3f', ''):>7} | "
                f"{_fmt(dec, '.1f'):>11}"
                f"{_fmt(parts['avl_scoring'] / scale if 'avl_scoring' in parts else None, '.2f', ''):>7}"
                f"{_fmt(q.get('decode_flops_ratio'), '.3f', ''):>7} | "
                f"{_fmt(r['visual_attended_mean'], '.0f'):>8}{_fmt(q.get('visual_attended_ratio'), '.3f', ''):>7}"
                f"  {per_step}" + ("" if r["measured"] else "   (not measured: --naive-max-zoom)")
            )
    return lines


def format_report(result: dict) -> str:
    lines = [f"device: {result['device']}; timing: {result['timing']}",
             f"peak memory: {result['memory']}; repeats {result['repeats']} (median), warm-up {result['warmup']} "
             f"excluded; decode: median of {result['decode_steps']} greedy steps"
             + (f" (raised from --decode-steps {result['decode_steps_requested']} so that A-VL decoding passes a "
                "refresh step; the same for rows without A-VL)"
                if result["decode_steps"] != result["decode_steps_requested"] else ""),
             "FLOPs: analytic, image to first token (vision + projector + LLM prefill + HR projections/attention)"]
    if result.get("avl"):
        a = result["avl"]
        lines.append(
            f"A-VL: vision_evict_rate {a['vision_evict_rate']:g}, compute_skip_rate {a['compute_skip_rate']:g}, "
            f"refresh_every {a['refresh_every']}, text_evict_rate {a['text_evict_rate']:g}, selection scored over "
            f"the {a['selection_scores']} visual tokens; A-VL rows: {result['avl_repeats']} repeat(s), "
            f"{result['avl_warmup']} warm-up of their own (each runs right after the same mode without A-VL)")
    unit = "s" if "CUDA" in result["timing"] else "s CPU"
    for m in result["models"]:
        lines += ["", f"== {m['name']} ({m['dtype']}): {m['description']} =="]
        for zoom, info in m["planted"].items():
            lines.append(f"   zoom {zoom}: planted selection {info['side']}x{info['side']} = {info['tokens']} of "
                         f"{info['hr_tokens']} HR tokens ({info['share']:.1%}; --planted-share "
                         f"{info['share_requested']:g}), centre {tuple(info['center'])}, touches {info['crops_touched']}"
                         f" of {int(zoom) ** 2} crops (any placement: {info['crops_touched_any_placement'][0]}-"
                         f"{info['crops_touched_any_placement'][1]})")
        zooms = sorted({g["zoom"] for g in result["groups"] if g["model"] == m["name"]})
        for zoom in zooms:
            for group in (g for g in result["groups"] if (g["model"], g["zoom"]) == (m["name"], zoom)):
                rows = [r for r in result["runs"]
                        if (r["model"], r["zoom"], r["avl"]) == (m["name"], zoom, group["avl"])]
                lines += _prefill_table(result, m, group, rows, unit)
            lines += _decode_table(result, m, zoom)
            for fu in (x for x in result["followup"] if (x["model"], x["zoom"]) == (m["name"], zoom)):
                lines.append(
                    f"follow-up question ({fu['mode']}; end to end, to the first answer token): cold first "
                    f"{fu['first_s']:.3f} s, follow-up {fu['followup_s']:.3f} s (features cached, "
                    f"{fu['prefix_tokens_reused']} of {fu['followup_prompt_tokens']} prompt tokens reused) -> "
                    f"{fu['followup_speedup']:.1f}x faster; whole {fu['max_new_tokens']}-token answers: "
                    f"{fu['first_full_s']:.3f} s vs {fu['followup_full_s']:.3f} s -> "
                    f"{fu['followup_speedup_full_answer']:.1f}x")
            for lz in (x for x in result["lazy_hr"] if (x["model"], x["zoom"]) == (m["name"], zoom)):
                vis_l = statistics.mean(s["vision_s_lazy"] for s in lz["per_sample"])
                vis_e = statistics.mean(s["vision_s_eager"] for s in lz["per_sample"])
                lines.append(
                    f"lazy HR encoding (flex, {lz['samples']} image(s)): {lz['crops_encoded_lazy_mean']:g} of "
                    f"{lz['crops_total']} crops encoded on average (eager: {lz['crops_encoded_eager_mean']:g}); "
                    f"outputs identical to eager: {'yes' if lz['identical_outputs'] else 'NO'}; vision {vis_l:.3f} s "
                    f"vs {vis_e:.3f} s eager")
    main = result["main"]
    note = "" if result.get("targets_apply") else "; the targets are set for 7b-shaped: here for reference only"
    lines += ["", f"targets ({main['model']}, zoom {main['zoom']}, A-VL {'on' if main['avl'] else 'off'}{note}):"]
    for name, t in result["targets"].items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        value = t["value"]
        shown = _fmt(value, ".3f") if isinstance(value, float) else str(value)
        lines.append(f"  {name:<32} {shown:>8}  (target {t['target']}): {verdict}")
    if result.get("avl_ratios"):
        lines += ["", f"A-VL over no A-VL ({main['model']}, zoom {main['zoom']}):"]
        for mode, q in result["avl_ratios"].items():
            lines.append(
                f"  {mode:<11} KV bytes {_fmt(q['kv_ratio'], '.3f')} "
                f"(after prefill {_fmt(q['kv_ratio_after_prefill'], '.3f')}), decode time "
                f"{_fmt(q['decode_time_ratio'], '.3f')} (median; mean {_fmt(q['decode_time_ratio_mean'], '.3f')})"
                f", decode FLOPs {_fmt(q['decode_flops_ratio'], '.3f')}, visual tokens attended "
                f"{_fmt(q['visual_attended_ratio'], '.3f')}")
    lines.append(f"elapsed: {result['elapsed_s']:.0f} s")
    return "\n".join(lines)


def write_chart(result: dict, path: str | Path) -> Path:
    """Plotly chart: analytic FLOPs and measured prefill time against HR resolution, one line per model and mode."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "analytic TFLOPs, image to first token", "measured prefill time (s)" +
        ("" if "CUDA" in result["timing"] else ", CPU wall-clock"), "analytic decoding GFLOPs per token"))
    sizes = {m["name"]: m["lowres_size"] for m in result["models"]}
    several = len(result["models"]) > 1
    for m in result["models"]:
        for avl in result["avl_variants"]:
            for mode in MODES:
                rows = sorted((r for r in result["runs"]
                               if (r["model"], r["mode"], r["avl"]) == (m["name"], mode, avl)), key=lambda r: r["zoom"])
                if not rows:
                    continue
                name = (f"{m['name']} " if several else "") + mode + (" +A-VL" if avl else "")
                x = [sizes[m["name"]] * r["zoom"] for r in rows]
                text = [f"zoom {r['zoom']}" for r in rows]
                dash = "dash" if avl else None
                fig.add_trace(go.Scatter(x=x, y=[(r["flops"] or {}).get("total", float("nan")) / 1e12 for r in rows],
                                         mode="lines+markers", name=name, legendgroup=name, text=text,
                                         line={"dash": dash}), row=1, col=1)
                fig.add_trace(go.Scatter(x=x, y=[r["prefill_s"] for r in rows], mode="lines+markers", name=name,
                                         legendgroup=name, showlegend=False, text=text, line={"dash": dash}),
                              row=1, col=2)
                decode = [float("nan") if r["decode_flops_per_token"] is None else r["decode_flops_per_token"] / 1e9
                          for r in rows]
                fig.add_trace(go.Scatter(x=x, y=decode, mode="lines+markers", name=name, legendgroup=name,
                                         showlegend=False, text=text, line={"dash": dash}), row=1, col=3)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="HR side (px)", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    main = result["main"]
    fig.update_layout(title=f"FlexAttention cost against resolution ({result['device']}; main: {main['model']})",
                      template="plotly_white")
    path = Path(path)
    fig.write_html(str(path), include_plotlyjs=True)  # self-contained: opens without network
    return path


def parse_list(text: str, kind: Callable = str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"empty list: {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise ValueError(f"not a list of {kind.__name__}: {text!r}") from None


def parse_modes(text: str) -> list[str]:
    modes = parse_list(text)
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    return modes


def parse_zooms(text: str) -> list[int]:
    zooms = parse_list(text, int)
    if any(z < 1 or z > 8 for z in zooms):
        raise ValueError(f"zoom must be between 1 and 8, got {text!r}")
    return sorted(set(zooms))
