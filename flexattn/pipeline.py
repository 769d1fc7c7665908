"""The Python API: load once, then ask questions about images in any mode and get text, trace and stats.

    vlm = FlexVLM.load()                       # embedded model; or a hub id / directory
    result = vlm.answer("photo.jpg", "What letter is on the red circle?", mode="flex")
    result.text, result.trace, result.stats

    for partial in vlm.stream(image, question):  # str chunks while generating, then the final Answer
        ...
"""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from . import cost
from .attention import FlexState
from .avl import AVLCache, AVLSettings
from .hr_features import HRFeatures
from .image import ImageViews, load_image, make_views
from .loading import LoadedModel, load
from .prompt import check_question, conversation, tokenize_around_image
from .settings import FlexSettings, check_mode
from .trace import Trace, TraceRecorder

MAX_NEW_TOKENS = 512


@dataclass
class PreparedImage:
    """One image's views and features; reused across questions (HR features are encoded once)."""

    image: Image.Image
    views: ImageViews
    lr_features: torch.Tensor  # (g*g, D)
    hr: HRFeatures  # encoded crop by crop: all at once, or lazily as selections touch them
    lr_grid: int
    prompt_cache: tuple | None = None  # (prompt token key, KV cache of all but its last token) of the last call

    @property
    def hr_grid(self) -> int:
        return self.lr_grid * self.views.zoom

    @property
    def hr_features(self) -> torch.Tensor:
        """(G*G, D), encoding every crop not encoded yet."""
        return self.hr.full()


@dataclass
class Answer:
    text: str
    mode: str
    token_ids: list[int]
    tokens: list[str]
    stats: dict
    trace: Trace | None = None
    settings: dict = field(default_factory=dict)

    def to_json(self, layers: bool = True, masks: bool = False) -> dict:
        """Plain-JSON view. `layers`: per-layer counts for the first token; `masks`: every selected HR mask, per
        generated token and layer, as sorted row-major indices into the HR grid."""
        out = {"answer": self.text, "mode": self.mode, "token_ids": self.token_ids, "tokens": self.tokens,
               "stats": self.stats, "settings": self.settings}
        passes = self.trace.passes if self.trace is not None else []
        if layers and passes:
            out["layers"] = [
                {"layer": lt.layer, "selected_hr_tokens": lt.selected_count, "hr_attended": lt.hr_attended,
                 "hr_attention_share": round(lt.hr_attention_share, 6)}
                for lt in passes[0]
            ]
        if masks and passes:
            out["masks"] = [
                {str(lt.layer): np.flatnonzero(lt.selected).tolist() for lt in layers_ if lt.selected is not None}
                for layers_ in passes
            ]
        return out


class _Timer(BaseStreamer):
    """Timestamps each token `generate` emits, then forwards to another streamer.

    `times[0]` is when generation started (generate's first put is the prompt); `times[k]` is when token k-1 came.
    """

    def __init__(self, inner: BaseStreamer | None):
        self.inner = inner
        self.times: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


class FlexVLM:
    def __init__(self, loaded: LoadedModel, cache_size: int = 4, lazy_hr: bool = False, reuse_prefix: bool = True):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.processor = loaded.processor
        self.name = loaded.name
        self.layout = loaded.layout
        self.untrained_hr = loaded.untrained_hr
        self._cache: OrderedDict[tuple, PreparedImage] = OrderedDict()
        self._cache_size = cache_size
        self.reuse_prefix = reuse_prefix  # follow-ups reuse the KV cache of the unchanged prompt prefix
        self.lazy_hr = lazy_hr  # encode HR crops only when a selection touches them (same outputs, less vision)
        self._lock = threading.Lock()  # one generation at a time per model (state is per call; the GPU is not)

    @classmethod
    def load(cls, name=None, device=None, dtype=None, **options) -> "FlexVLM":
        return cls(load(name, device=device, dtype=dtype), **options)

    @property
    def settings(self) -> FlexSettings:
        return self.model.flex_settings

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ---- images ------------------------------------------------------------------------------------------
    def prepare(self, image, highres: bool = True, zoom: int | None = None, lazy: bool = False) -> PreparedImage:
        """Load, view and encode an image (cached by content). With `highres` and not `lazy`, every HR crop is
        encoded now; otherwise HR crops are encoded when a selection first touches them."""
        image = image.image if isinstance(image, PreparedImage) else load_image(image)
        s = self.settings
        zoom = zoom or s.zoom
        hr_size = s.hr_size if zoom == s.zoom else s.lowres_size * zoom
        key = (hashlib.sha1(image.tobytes()).hexdigest(), image.size, s.lowres_size, hr_size, zoom)
        prepared = self._cache.get(key)
        with torch.inference_mode():
            if prepared is None:
                views = make_views(image, self.processor, s.lowres_size, zoom, hr_size)
                lr = self.model.encode_lowres(views)
                g = int(round(lr.shape[0] ** 0.5))
                prepared = PreparedImage(image, views, lr, self.model.highres_features(views, g), g)
                self._cache[key] = prepared
            if highres and not lazy:
                prepared.hr.full()
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return prepared

    def prompt_embeds(self, prepared: PreparedImage, question: str, history=()) -> tuple[torch.Tensor, int]:
        """(1, T, D) input embeddings of the v1 prompt with the LR features in place of <image>, and where they start."""
        ids_before, ids_after = tokenize_around_image(self.tokenizer, conversation(question, history))
        return self._embed(prepared, ids_before, ids_after), len(ids_before)

    def _embed(self, prepared: PreparedImage, ids_before: list[int], ids_after: list[int]) -> torch.Tensor:
        embed = self.model.get_input_embeddings()
        device = embed.weight.device
        with torch.inference_mode():
            embeds = torch.cat(
                [
                    embed(torch.tensor(ids_before, device=device)),
                    prepared.lr_features.to(embed.weight.dtype),
                    embed(torch.tensor(ids_after, device=device)),
                ]
            )
        return embeds[None]

    def flex_state(self, prepared: PreparedImage, mode: str, settings: FlexSettings, image_start: int,
                   recorder: TraceRecorder | None = None, planted_selection=None, shift_selection=None,
                   rows=None) -> FlexState:
        """The per-call state for one generation over `prepared` with the prompt's image at `image_start`."""
        g, G = prepared.lr_grid, prepared.hr_grid
        hr_cos = hr_sin = None
        if mode != "lowres":
            hr_cos, hr_sin = self.model.hr_rotary_tables(image_start, g, G)
        return FlexState(
            mode=mode,
            settings=settings,
            image_start=image_start,
            lr_grid=g,
            hr_features=prepared.hr if mode != "lowres" else None,
            hr_cos=hr_cos,
            hr_sin=hr_sin,
            original_sizes=[prepared.views.original_size],
            recorder=recorder,
            planted_selection=planted_selection,
            shift_selection=shift_selection,
            rows=rows,
        )

    # ---- prompt prefix reuse -----------------------------------------------------------------------------
    # In every mode, all rows of a pass but the last get ordinary causal attention, so the keys/values of a
    # prompt's tokens before its last one are exactly what a fresh prefill of any longer prompt sharing that prefix
    # would compute. (The last prompt token and generated tokens saw HR: their cache entries are not reusable.)

    @staticmethod
    def _reusable_prefix(prepared: PreparedImage, key: tuple):
        if prepared.prompt_cache is None:
            return None
        old_key, old_cache = prepared.prompt_cache
        common = 0
        for a, b in zip(old_key, key):
            if a != b:
                break
            common += 1
        common = min(common, len(old_key), len(key) - 1)  # feed at least the last prompt token afresh
        if common <= key.index(-1) + prepared.lr_grid**2:  # not even past the image: nothing worth reusing
            return None
        cache = copy.deepcopy(old_cache)
        cache.crop(common - cache.get_seq_length())
        return cache

    @staticmethod
    def _keep_prefix(prepared: PreparedImage, key: tuple, cache) -> None:
        if cache is None:
            return
        keep = len(key) - 1
        cache.crop(keep - cache.get_seq_length())
        prepared.prompt_cache = (key[:keep], cache)

    # ---- answering ---------------------------------------------------------------------------------------
    def answer(self, image, question: str, **options) -> Answer:
        return self._generate(image, question, streamer=None, **options)

    def stream(self, image, question: str, **options) -> Iterator[str | Answer]:
        """Yield text chunks as they are generated, then the final Answer. Errors are raised here."""
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        result: dict = {}

        def run():
            try:
                result["answer"] = self._generate(image, question, streamer=streamer, **options)
            except BaseException as err:  # handed to the consumer below
                result["error"] = err
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        for chunk in streamer:
            if chunk:
                yield chunk
        worker.join()
        if "error" in result:
            raise result["error"]
        yield result["answer"]

    def _generate(
        self,
        image,
        question: str,
        *,
        mode: str = "flex",
        history: Sequence[tuple[str, str]] = (),
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        threshold: float | None = None,
        selection_layer: int | None = None,
        pool_size: int | None = None,
        zoom: int | None = None,
        trace: bool | int = True,
        lazy_hr: bool | None = None,
        reuse_prefix: bool | None = None,
        planted_selection: torch.Tensor | None = None,
        shift_selection: tuple[int, int] | None = None,
        avl: AVLSettings | dict | bool | None = None,
        streamer: BaseStreamer | None = None,
    ) -> Answer:
        mode = check_mode(mode)
        question = check_question(question)
        if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}")
        settings = self.settings.with_overrides(
            threshold=threshold, selection_layer=selection_layer, pool_size=pool_size, zoom=zoom
        )
        n_layers = self.model.config.text_config.num_hidden_layers
        if not 0 <= settings.selection_layer < n_layers:
            raise ValueError(f"selection_layer must be in 0..{n_layers - 1}, got {settings.selection_layer}")

        with self._lock:
            vision_start = time.perf_counter()
            lazy = self.lazy_hr if lazy_hr is None else lazy_hr
            prepared = self.prepare(image, highres=mode != "lowres", zoom=settings.zoom, lazy=lazy)
            vision_seconds = time.perf_counter() - vision_start  # ~0 when the image's features were cached
            ids_before, ids_after = tokenize_around_image(self.tokenizer, conversation(question, history))
            inputs_embeds = self._embed(prepared, ids_before, ids_after)
            image_start = len(ids_before)
            prompt_key = (*ids_before, *[-1] * prepared.lr_grid**2, *ids_after)
            avl_settings = _avl_settings(avl)
            # A-VL evicts from the cache, so its caches are never reused as a prompt prefix.
            reuse = (self.reuse_prefix if reuse_prefix is None else reuse_prefix) and avl_settings is None
            cache = self._reusable_prefix(prepared, prompt_key) if reuse else None
            reused = cache.get_seq_length() if cache is not None else 0
            if avl_settings is not None:
                cache = AVLCache(avl_settings, n_layers, image_start, prepared.lr_grid**2)
            device = self.device
            g, G = prepared.lr_grid, prepared.hr_grid
            recorder = None
            if trace:
                recorder = TraceRecorder(g, G, settings.selection_layer, None if trace is True else int(trace))
            state = self.flex_state(prepared, mode, settings, image_start, recorder, planted_selection, shift_selection)
            state.avl = cache if avl_settings is not None else None
            timer = _Timer(streamer)
            if seed is not None:
                torch.manual_seed(seed)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
            with torch.inference_mode():
                output = self.model.generate(
                    inputs_embeds=inputs_embeds,
                    attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=device),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                    streamer=timer,
                    flex_state=state,
                    past_key_values=cache,
                    return_dict_in_generate=True,
                    **sampling,
                )
            kv_bytes = [_layer_nbytes(layer) for layer in output.past_key_values.layers]
            if reuse:
                self._keep_prefix(prepared, prompt_key, output.past_key_values)
        output = output.sequences
        token_ids = output[0].tolist()
        if token_ids and token_ids[-1] == self.tokenizer.eos_token_id:
            token_ids = token_ids[:-1]
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
        passes = len(timer.times) - 1
        prompt_len = inputs_embeds.shape[1]
        attended = state.hr_attended(n_layers)
        crops = prepared.hr.crops_encoded if mode != "lowres" else 0
        flops = cost.call_flops(  # LR view + the HR crops this image needed so far, as if encoded by this call
            self.model.config, mode, prompt_len, passes, attended, selection_layer=settings.selection_layer,
            zoom=settings.zoom, hr_crops=crops, avl_keys=cache.keys_scored if avl_settings is not None else None,
            hr_projected=state.hr_projected(n_layers),
        )
        times = timer.times
        decode = [b - a for a, b in zip(times[1:-1], times[2:])]
        stats = {
            "lr_tokens": g * g,
            "hr_tokens": G * G,
            "text_tokens": prompt_len - g * g,
            "prompt_tokens": prompt_len,
            "generated_tokens": passes,
            "hr_attended_per_layer": attended[0] if attended else [],
            "hr_attended_mean": _mean_attended(attended, settings.selection_layer),
            "hr_crops_encoded": crops,
            "hr_kv_projected": sum(map(sum, state.hr_projected(n_layers))),  # HR keys/values not found cached
            "prefix_tokens_reused": reused,
            "kv_bytes": sum(kv_bytes),  # held by the cache at the end of generation
            "kv_bytes_per_layer": kv_bytes,
            "latency_s": {
                "vision": vision_seconds,
                "prefill": times[1] - times[0] if passes else 0.0,
                "decode_per_token": sum(decode) / len(decode) if decode else 0.0,
                "total": times[-1] - times[0],
            },
            "flops": flops,
            "tflops": flops["total"] / 1e12,
            "untrained_hr_projections": settings.untrained_hr_projections,
        }
        if avl_settings is not None:
            steps = cache.visual_attended[1:]  # decoding steps (the prefill attends to every image token)
            per_step = [sum(layers) / len(layers) for layers in steps if layers]
            mean_visual = sum(per_step) / len(per_step) if per_step else float(g * g)
            stats["avl"] = {
                "settings": avl_settings.to_dict(),
                "kv_bytes_full_cache": sum(cache.full_cache_nbytes_per_layer()),  # the same cache without eviction
                "kv_bytes_full_cache_per_layer": cache.full_cache_nbytes_per_layer(),
                "visual_attended_per_step": per_step,
                "visual_attention_ratio": mean_visual / (g * g),
            }
        return Answer(
            text=text,
            mode=mode,
            token_ids=token_ids,
            tokens=[self.tokenizer.decode([t]) for t in token_ids],
            stats=stats,
            trace=recorder.finish() if recorder else None,
            settings=settings.to_dict(),
        )


def _avl_settings(avl) -> AVLSettings | None:
    if avl is None or avl is False:
        return None
    if avl is True:
        return AVLSettings()
    return avl if isinstance(avl, AVLSettings) else AVLSettings(**avl)


def _layer_nbytes(layer) -> int:
    if getattr(layer, "keys", None) is None or not getattr(layer, "is_initialized", True):
        return 0
    return layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()


def _mean_attended(attended: list[list[int]], selection_layer: int) -> float:
    values = [count for per_layer in attended for count in per_layer[selection_layer + 1 :]]
    return sum(values) / len(values) if values else 0.0
