"""Measuring: cold calls (prefill + greedy decoding) per mode, their analytic FLOPs, follow-up questions, lazy HR
encoding, and `run`, which puts them together into a BenchResult (field meanings: the package docstring)."""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import cost
from ..attention import FlexHooks
from ..avl import AVLCache, AVLSettings, cache_nbytes_per_layer
from ..cost import PARTS, Flops
from ..pipeline import MAX_NEW_TOKENS
from ..settings import COST_MODES, check_mode
from .models import BenchModel, log, planted_info, planted_region
from .results import (AVLComparison, BenchResult, FollowupRow, Group, LazyRow, LazySample, MainGroup, ModelInfo,
                      ModeRow, avl_ratios, check_targets, ratios)

# A-VL (adaptive KV-cache decoding) variants run per mode: without and with A-VL (the CLI's `--avl off|on|both`).
AVL_VARIANTS = (False, True)
AVL_CHOICES = {"off": (False,), "on": (True,), "both": (False, True)}
AVL_MIN_DECODE_STEPS = 6  # decoding steps when A-VL rows run: past a refresh step (refresh_every 3) and its next
AVL_REPEATS, AVL_WARMUP = 1, 0  # A-VL rows' defaults: they follow the same mode's rows, which warmed it up
MAIN_ZOOM = 3


# ---- clocks and memory ----------------------------------------------------------------------------------------


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
    """Peak memory added during a block (see the package docstring); `.bytes` is None where unmeasurable."""

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


# ---- one cold call --------------------------------------------------------------------------------------------


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
            if mode == "naive_hd":
                after_lr = start + prepared.lr_grid**2
                hr = prepared.hr_features[None].to(embeds.dtype)
                embeds = torch.cat([embeds[:, :after_lr], hr, embeds[:, after_lr:]], dim=1)
                image_tokens += hr.shape[1]
            cache = AVLCache(avl, n_layers, start, image_tokens) if avl is not None else None
            state = None
            if mode != "naive_hd" or avl is not None:
                hooks = FlexHooks(planted_selection=planted if mode == "flex" else None)
                state = vlm.flex_state(prepared, "lowres" if mode == "naive_hd" else mode, settings, start,
                                       avl=cache, hooks=hooks)
            t2 = clock.mark()
            out = model(inputs_embeds=embeds, flex_state=state, past_key_values=cache, logits_to_keep=1,
                        use_cache=True)
            t3 = clock.mark()
            cache = out.past_key_values
            kv = sum(cache_nbytes_per_layer(cache))
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
            kv_cache_bytes_end=sum(cache_nbytes_per_layer(cache)),
            image_tokens=image_tokens,
            avl=cache if avl is not None else None,
        )
    finally:
        del model.encode_pixels  # back to the class's method


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---- analytic FLOPs of a row ----------------------------------------------------------------------------------


def analytic_flops(bm: BenchModel, mode: str, zoom: int, prompt_len: int, attended: list[int],
                   crops: int | None, decode_passes: Sequence[Sequence[int]] | None = None, avl_keys=None,
                   projected: Sequence[Sequence[int]] | None = None) -> tuple[Flops, int | None, Flops | None]:
    """(FLOPs image to first token, decoding FLOPs per token, the same by part) for the cost model's config.

    attended: the prefill's HR counts per layer (measured depth); decode_passes: the same for each measured
    decoding step (default: one step with the prefill's counts); avl_keys: an A-VL call's keys_scored[pass][layer]
    (every pass, the prefill first); projected: HR tokens whose keys/values each pass projected (flexattn
    projects them once per image; default: every attended token in every pass). Counts measured on a shallower
    model are spread over the cost model's layers (cost.full_depth_call_flops). Decoding FLOPs are the mean over
    the decoding steps (the total rounded once, the parts each); None for an A-VL call that decoded nothing.
    """
    if decode_passes is None or not len(decode_passes):
        if avl_keys is not None and len(avl_keys) > 1:
            decode_passes = [attended] * (len(avl_keys) - 1)
        else:
            decode_passes = [] if avl_keys is not None else [attended]
    passes = [attended, *decode_passes]
    args = dict(selection_layer=bm.cost_selection_layer, zoom=zoom, hr_crops=crops, avl_keys=avl_keys,
                hr_projected=projected, measured_selection_layer=bm.measured_selection_layer)
    first = cost.full_depth_call_flops(bm.cost_config, mode, prompt_len, passes[:1], **args)
    steps = len(passes) - 1
    if not steps:
        return first, None, None
    decoding = cost.full_depth_call_flops(bm.cost_config, mode, prompt_len, passes, **args) - first
    return first, round(decoding.total / steps), Flops(*(round(getattr(decoding, k) / steps) for k in PARTS))


def flops_at_measured_depth(bm: BenchModel, mode: str, zoom: int, prompt_len: int, attended, crops,
                            avl_keys=None) -> int | None:
    """Total FLOPs image to first token at the measured depth (only given where the cost model is deeper)."""
    if not bm.scaled_cost:
        return None
    return cost.full_depth_call_flops(bm.vlm.model.config, mode, prompt_len, [attended], zoom=zoom,
                                      selection_layer=bm.vlm.settings.selection_layer, hr_crops=crops,
                                      avl_keys=avl_keys).total


# ---- rows -----------------------------------------------------------------------------------------------------


def avl_decode_steps(decode_steps: int, avl: AVLSettings | None) -> int:
    """Decoding steps of every row when A-VL rows run: enough to pass a refresh step and the step after it."""
    if avl is None:
        return decode_steps
    return max(decode_steps, AVL_MIN_DECODE_STEPS, avl.refresh_every + 1)


def measure_mode(bm: BenchModel, mode: str, zoom: int, clock: Clock, *, repeats: int, warmup: int,
                 decode_steps: int, measure: bool = True, planted=None,
                 avl: AVLSettings | bool | None = None) -> ModeRow:
    """One row: `warmup` + `repeats` cold calls of `mode` (the last one decodes `decode_steps` greedy steps), with
    A-VL when `avl` is given (True: default AVLSettings). measure=False: analytic figures only (no call)."""
    avl = AVLSettings.coerce(avl)
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
    else:  # naive_hd beyond naive_max_zoom: analytic figures only
        prepared = bm.vlm.prepare(bm.image, highres=False, zoom=zoom)
        embeds, _ = bm.vlm.prompt_embeds(prepared, bm.question)
        prompt_len = embeds.shape[1]
        G = prepared.lr_grid * zoom
        attended, crops = [], zoom * zoom
        llm_tokens, image_tokens = prompt_len + G * G, prepared.lr_grid**2 + G * G
        decode_passes = avl_keys = projected = None
    flops = decode = parts = None
    if avl is None or avl_keys is not None:  # A-VL's keys come from a run: no analytic A-VL figures
        flops, decode, parts = analytic_flops(bm, mode, zoom, prompt_len, attended, crops, decode_passes, avl_keys,
                                              projected)
    v = bm.vlm.model.config.vision_config
    g = v.image_size // v.patch_size
    hr_layers = attended[bm.vlm.settings.selection_layer + 1 :] if attended else []
    row = ModeRow(
        model=bm.name, zoom=zoom, mode=mode, avl=avl is not None, measured=measure,
        llm_tokens=llm_tokens, prompt_tokens=prompt_len, lr_tokens=g * g, hr_tokens=(g * zoom) ** 2,
        image_tokens_in_prompt=image_tokens, hr_crops_encoded=crops if mode != "lowres" else 0,
        hr_attended_per_layer=attended,
        # naive_hd: every HR token is an ordinary input token, attended in every layer
        hr_attended_mean=float((g * zoom) ** 2) if mode == "naive_hd" else
                         (sum(hr_layers) / len(hr_layers)) if hr_layers else 0.0,
        flops=flops, decode_flops_per_token=decode, decode_flops_per_token_parts=parts,
        flops_at_measured_depth=None if flops is None else
                                flops_at_measured_depth(bm, mode, zoom, prompt_len, attended, crops, avl_keys),
        avl_settings=avl,
    )
    if not measure:
        return row
    last = calls[-1]
    steps = last.decode_s
    if last.avl is not None:  # visual cache entries attended per decoding step, mean over layers
        per_step = [sum(layers) / len(layers) for layers in last.avl.visual_attended[1:] if layers]
    else:
        per_step = [float(image_tokens)] * len(steps)
    return dataclasses.replace(
        row,
        vision_s=_median([c.vision_s for c in calls]),
        prefill_s=_median([c.prefill_s for c in calls]),
        first_token_s=_median([c.vision_s + c.prefill_s for c in calls]),
        prefill_s_repeats=[c.prefill_s for c in calls],
        decode_steps=len(steps),
        decode_ms_per_token=(_median(steps) * 1000) if steps else None,
        decode_ms_per_token_mean=(statistics.mean(steps) * 1000) if steps else None,
        decode_ms_steps=[s * 1000 for s in steps],
        peak_memory_bytes=max((c.peak_memory_bytes for c in calls if c.peak_memory_bytes is not None), default=None),
        kv_cache_bytes=last.kv_cache_bytes,
        kv_cache_bytes_end=last.kv_cache_bytes_end,
        kv_cache_bytes_full_cache_end=sum(last.avl.full_cache_nbytes_per_layer()) if last.avl is not None
                                      else last.kv_cache_bytes_end,
        hr_feature_bytes=last.hr_feature_bytes,
        visual_attended_per_step=per_step,
        visual_attended_mean=statistics.mean(per_step) if per_step else None,
        kv_cache_bytes_per_layer_end=cache_nbytes_per_layer(last.avl) if last.avl is not None else None,
    )


def measure_followup(bm: BenchModel, zoom: int, clock: Clock, *, repeats: int, warmup: int, new_tokens: int,
                     planted=None, mode: str = "flex") -> FollowupRow:
    """A cold first question against a second question on the same image (cached LR/HR features, reused prompt
    prefix), both end to end through FlexVLM.answer."""
    vlm = bm.vlm
    options = dict(mode=mode, max_new_tokens=new_tokens, trace=False, zoom=zoom, lazy_hr=True,
                   planted_selection=planted if mode == "flex" else None)
    cold_s, warm_s, cold_first_s, warm_first_s = [], [], [], []
    first = second = None

    def to_first_token(wall: float, answer) -> float:  # end to end, less the decoding after the first token
        latency = answer.stats.latency_s
        return wall - (latency.generation - latency.prefill)

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
            f"{to_first_token(t2 - t1, second):.3f} s; prefix reused: {second.stats.prefix_tokens_reused} tokens)")
        if i >= warmup:
            cold_s.append(t1 - t0)
            warm_s.append(t2 - t1)
            cold_first_s.append(to_first_token(t1 - t0, first))
            warm_first_s.append(to_first_token(t2 - t1, second))
    cold, warm = _median(cold_first_s), _median(warm_first_s)
    cold_full, warm_full = _median(cold_s), _median(warm_s)
    return FollowupRow(
        model=bm.name, zoom=zoom, mode=mode, max_new_tokens=new_tokens,
        # headline: end to end (image, or cached features, to the first answer token): prefill-dominated
        first_s=cold, followup_s=warm, followup_speedup=cold / warm if warm else None,
        # the same calls to their last token (max_new_tokens answers): decoding, identical in both, dilutes it
        first_full_s=cold_full, followup_full_s=warm_full,
        followup_speedup_full_answer=cold_full / warm_full if warm_full else None,
        first_s_repeats=cold_first_s, followup_s_repeats=warm_first_s,
        first_full_s_repeats=cold_s, followup_full_s_repeats=warm_s,
        first_prompt_tokens=first.stats.prompt_tokens, followup_prompt_tokens=second.stats.prompt_tokens,
        prefix_tokens_reused=second.stats.prefix_tokens_reused,
        first_latency_s=first.stats.latency_s, followup_latency_s=second.stats.latency_s,
        first_generated_tokens=first.stats.generated_tokens, followup_generated_tokens=second.stats.generated_tokens,
    )


def measure_lazy(bm: BenchModel, zoom: int, clock: Clock, *, new_tokens: int, planted=None) -> LazyRow:
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
        samples.append(LazySample(
            crops_encoded_lazy=answers[True].stats.hr_crops_encoded,
            crops_encoded_eager=answers[False].stats.hr_crops_encoded,
            crops_encoded_lazy_prefill=calls[True].crops,
            identical_tokens=answers[True].token_ids == answers[False].token_ids,
            identical_prefill_logits=bool(torch.equal(calls[True].logits, calls[False].logits)),
            vision_s_lazy=calls[True].vision_s,
            vision_s_eager=calls[False].vision_s,
        ))
    n = len(samples)
    out = LazyRow(
        model=bm.name, zoom=zoom, samples=n, crops_total=zoom * zoom,
        crops_encoded_lazy_mean=sum(s.crops_encoded_lazy for s in samples) / n,
        crops_encoded_eager_mean=sum(s.crops_encoded_eager for s in samples) / n,
        identical_outputs=all(s.identical_tokens and s.identical_prefill_logits for s in samples),
        per_sample=samples,
    )
    log(f"  [{bm.name} zoom {zoom}] lazy HR: {out.crops_encoded_lazy_mean:g} of {zoom * zoom} crops encoded "
        f"(eager {out.crops_encoded_eager_mean:g}); identical outputs: {out.identical_outputs}")
    return out


# ---- the run --------------------------------------------------------------------------------------------------


def check_run_options(*, repeats: int = 3, warmup: int = 1, decode_steps: int = 4, followup_tokens: int = 4,
                      avl_repeats: int | None = AVL_REPEATS, avl_warmup: int | None = AVL_WARMUP) -> None:
    """ValueError unless repeats >= 1, warmup >= 0, decode_steps >= 0, followup_tokens in 1..MAX_NEW_TOKENS and
    (where given) avl_repeats >= 1, avl_warmup >= 0. `run` calls it; callers may, before building models."""
    if repeats < 1 or warmup < 0 or decode_steps < 0 or not 1 <= followup_tokens <= MAX_NEW_TOKENS:
        raise ValueError(f"repeats must be >= 1, warmup >= 0, decode_steps >= 0 and followup_tokens in "
                         f"1..{MAX_NEW_TOKENS}; got {repeats}, {warmup}, {decode_steps}, {followup_tokens}")
    if (avl_repeats is not None and avl_repeats < 1) or (avl_warmup is not None and avl_warmup < 0):
        raise ValueError(f"avl_repeats must be >= 1 and avl_warmup >= 0; got {avl_repeats}, {avl_warmup}")


def model_info(bm: BenchModel) -> ModelInfo:
    text, vision = bm.vlm.model.config.text_config, bm.vlm.model.config.vision_config
    return ModelInfo(
        name=bm.name, description=bm.description, dtype=str(bm.vlm.model.dtype).replace("torch.", ""),
        measured_llm_layers=text.num_hidden_layers, measured_tower_layers=vision.num_hidden_layers,
        measured_selection_layer=bm.vlm.settings.selection_layer,
        flops_llm_layers=bm.cost_config.text_config.num_hidden_layers,
        flops_tower_layers=bm.cost_config.vision_config.num_hidden_layers,
        flops_selection_layer=bm.cost_selection_layer, lowres_size=bm.vlm.settings.lowres_size,
        planted_share=bm.planted_share,
    )


def run(models: Sequence[BenchModel], zooms: Sequence[int] = (MAIN_ZOOM,), *, repeats: int = 3, warmup: int = 1,
        decode_steps: int = 4, followup_tokens: int = 4, modes: Sequence[str] = COST_MODES,
        naive_max_zoom: int | None = None, followup: bool = True, lazy_check: bool = True,
        avl_variants: Sequence[bool] = AVL_VARIANTS, avl_settings: AVLSettings | None = None,
        avl_repeats: int | None = AVL_REPEATS, avl_warmup: int | None = AVL_WARMUP) -> BenchResult:
    """Benchmark every model at every zoom (see the package docstring).

    avl_variants: which of without (False) / with (True) A-VL to run per mode; avl_settings: A-VL's settings
    (default AVLSettings()); avl_repeats / avl_warmup: the A-VL rows' repeats and warm-up calls (None: the same as
    `repeats` / `warmup`).
    """
    if not models:
        raise ValueError("no model to benchmark")
    for mode in modes:
        check_mode(mode, COST_MODES)
    check_run_options(repeats=repeats, warmup=warmup, decode_steps=decode_steps, followup_tokens=followup_tokens,
                      avl_repeats=avl_repeats, avl_warmup=avl_warmup)
    variants = [v for v in (False, True) if v in tuple(avl_variants)]
    if not variants:
        raise ValueError("avl_variants must hold False, True or both")
    avl = (avl_settings or AVLSettings()) if True in variants else None
    avl_repeats = repeats if avl_repeats is None else avl_repeats
    avl_warmup = warmup if avl_warmup is None else avl_warmup
    steps = avl_decode_steps(decode_steps, avl)
    device = models[0].vlm.device
    clock = Clock(device)
    infos, runs, groups, comparisons, followups, lazies = [], [], [], [], [], []
    started = time.perf_counter()
    for bm in models:
        infos.append(model_info(bm))
        vision = bm.vlm.model.config.vision_config
        for zoom in zooms:
            G = (vision.image_size // vision.patch_size) * zoom
            planted = planted_region(G, bm.planted_share, bm.planted_center) if bm.planted_share else None
            if planted is not None:
                info = infos[-1].planted[str(zoom)] = planted_info(bm, zoom, planted)
                log(f"[{bm.name} zoom {zoom}] planted selection: {info.side}x{info.side} = {info.tokens} of "
                    f"{info.hr_tokens} HR tokens ({info.share:.1%}), touching {info.crops_touched} of "
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
                runs.extend(rows[variant])
                groups.append(Group(bm.name, zoom, variant, ratios(rows[variant])))
            if len(variants) == 2:
                comparisons.append(AVLComparison(bm.name, zoom, avl_ratios(rows[False], rows[True])))
            if followup and "flex" in modes:
                followups.append(measure_followup(bm, zoom, clock, repeats=repeats, warmup=warmup,
                                                  new_tokens=followup_tokens, planted=planted))
            if lazy_check and "flex" in modes:
                lazies.append(measure_lazy(bm, zoom, clock, new_tokens=followup_tokens, planted=planted))
    main = MainGroup(models[0].name, MAIN_ZOOM if MAIN_ZOOM in zooms else zooms[0], variants[0])  # no A-VL if ran
    group = next(g for g in groups if (g.model, g.zoom, g.avl) == (main.model, main.zoom, main.avl))
    comparison = next((c for c in comparisons if (c.model, c.zoom) == (main.model, main.zoom)), None)
    fu = next((f for f in followups if (f.model, f.zoom) == (main.model, main.zoom)), None)
    lazy = next((x for x in lazies if (x.model, x.zoom) == (main.model, main.zoom)), None)
    followup_speedup = fu.followup_speedup if fu else None
    return BenchResult(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        timing="CUDA events, absolute times" if clock.cuda else
               "CPU wall-clock (perf_counter): compare ratios; absolute times are this CPU's",
        memory=memory_method(device),
        repeats=repeats, warmup=warmup, decode_steps=steps, decode_steps_requested=decode_steps,
        avl_variants=variants, avl=avl,
        avl_repeats=avl_repeats if avl is not None else None, avl_warmup=avl_warmup if avl is not None else None,
        models=infos, runs=runs, groups=groups, avl_comparison=comparisons, followup=followups, lazy_hr=lazies,
        main=main, ratios=group.ratios, avl_ratios=comparison.ratios if comparison else None,
        followup_speedup=followup_speedup,
        targets=check_targets(group.ratios, followup_speedup, lazy),
        targets_apply=main.model == "7b-shaped",  # the targets are set for the 7b-shaped model
        elapsed_s=time.perf_counter() - started,
    )
