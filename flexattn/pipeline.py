"""The Python API: load once, then ask questions about images in any mode and get text, trace and stats.

    vlm = FlexVLM.load()                       # embedded model; or a hub id / directory
    result = vlm.answer("photo.jpg", "What letter is on the red circle?", mode="flex")
    result.text, result.trace, result.stats

    for partial in vlm.stream(image, question):  # str chunks while generating, then the final Answer
        ...
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from . import cost, memory
from .attention import FlexHooks, FlexState
from .avl import AVLCache, AVLSettings, cache_nbytes_per_layer
from .hr_features import HRFeatures
from .image import ImageViews, load_image, make_views
from .loading import LoadedModel, load
from .memory import DeviceMemoryError
from .model_card import model_card
from .prompt import check_question, conversation, tokenize_around_image, unknown_words
from .results import Answer, AnswerStats, AVLStats, Latency
from .settings import MAX_NEW_TOKENS, FlexSettings, check_mode
from .trace import TraceRecorder


@dataclass
class PreparedImage:
    """One image's views and features; reused across questions (HR features are encoded once)."""

    image: Image.Image
    views: ImageViews
    lr_features: torch.Tensor  # (g*g, D)
    hr: HRFeatures  # encoded crop by crop: all at once, or lazily as selections touch them
    lr_grid: int
    # (prompt token key, per-layer (keys, values) of all but its last token) of the last call, stored compactly
    prompt_cache: tuple | None = None

    @property
    def hr_grid(self) -> int:
        return self.lr_grid * self.views.zoom

    @property
    def hr_features(self) -> torch.Tensor:
        """(G*G, D), encoding every crop not encoded yet."""
        return self.hr.full()

    @property
    def nbytes(self) -> int:
        """Device bytes this image holds: features, projected HR keys/values and the prompt prefix."""
        prefix = sum(k.nbytes + v.nbytes for k, v in self.prompt_cache[1]) if self.prompt_cache else 0
        return self.lr_features.nbytes + self.hr.nbytes + prefix

    def release(self) -> None:
        """Drop the caches that grow with questions (HR keys/values, the prompt prefix); done on eviction."""
        self.hr.drop_projections()
        self.prompt_cache = None


@dataclass(frozen=True)
class AnswerOptions:
    """Per-call options of `FlexVLM.answer` / `stream` (keyword arguments there), checked once here.

    threshold, selection_layer, pool_size, zoom: override the model's FlexSettings for this call (None: keep).
    trace: record the per-layer trace (True), not at all (False), or only the first N generated tokens (an int).
    lazy_hr: encode only the HR crops a selection touches (bit-identical outputs); None: the model's default.
    reuse_prefix: reuse the KV cache of the prompt prefix an earlier question on the same image computed.
    avl: A-VL decoding (AVLSettings, a dict of its fields, True for the authors' defaults, None/False: off).
    planted_selection, shift_selection: controls (see flexattn.attention.FlexHooks).
    """

    mode: str = "flex"
    history: tuple[tuple[str, str], ...] = ()
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    threshold: float | None = None
    selection_layer: int | None = None
    pool_size: int | None = None
    zoom: int | None = None
    trace: bool | int = True
    lazy_hr: bool | None = None
    reuse_prefix: bool | None = None
    avl: AVLSettings | None = None
    planted_selection: torch.Tensor | None = None
    shift_selection: tuple[int, int] | None = None

    def __post_init__(self):
        check_mode(self.mode)
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        object.__setattr__(self, "history", tuple(tuple(turn) for turn in self.history))
        object.__setattr__(self, "avl", AVLSettings.coerce(self.avl))

    def settings(self, base: FlexSettings, num_layers: int) -> FlexSettings:
        settings = base.with_overrides(threshold=self.threshold, selection_layer=self.selection_layer,
                                       pool_size=self.pool_size, zoom=self.zoom)
        if not 0 <= settings.selection_layer < num_layers:
            raise ValueError(f"selection_layer must be in 0..{num_layers - 1}, got {settings.selection_layer}")
        return settings


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


class _Cancelled(StoppingCriteria):
    """Stops `generate` at the next token once `event` is set (the stream's consumer went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it measures that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FlexVLM:
    """The model with its tokenizer, processor and per-image caches.

    cache_size: at most this many images keep their features and keys/values between questions.
    cache_budget: how many device bytes they may hold together; None: on a GPU, half the memory free once the
        weights are loaded (measured at the first question), on the CPU no limit but `cache_size`.
    """

    def __init__(self, loaded: LoadedModel, cache_size: int = 4, lazy_hr: bool = False, reuse_prefix: bool = True,
                 cache_budget: int | None = None):
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.processor = loaded.processor
        self.name = loaded.name
        self.layout = loaded.layout
        self.untrained_hr = loaded.untrained_hr
        self.card = model_card(loaded.training_info)  # what the model is and can answer, for people
        self.needs = loaded.needs
        self._cache: OrderedDict[tuple, PreparedImage] = OrderedDict()
        self._cache_size = cache_size
        self._cache_budget = cache_budget
        self.reuse_prefix = reuse_prefix  # follow-ups reuse the KV cache of the unchanged prompt prefix
        self.lazy_hr = lazy_hr  # encode HR crops only when a selection touches them (same outputs, less vision)
        self._lock = threading.RLock()  # one generation at a time per model (state is per call; the GPU is not)

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
    def forget_images(self) -> None:
        """Drop every cached image (features, projected HR keys/values, prompt prefixes): the next call's cost and
        counts are those of a first question about its image (evaluations score each item as if alone)."""
        with self._lock:
            self._cache.clear()

    def prepare(self, image, highres: bool = True, zoom: int | None = None, lazy: bool = False) -> PreparedImage:
        """Load, view and encode an image (cached by content). With `highres` and not `lazy`, every HR crop is
        encoded now; otherwise HR crops are encoded when a selection first touches them."""
        image = image.image if isinstance(image, PreparedImage) else load_image(image)
        s = self.settings
        zoom = zoom or s.zoom
        hr_size = s.hr_size if zoom == s.zoom else s.lowres_size * zoom
        key = (hashlib.sha1(image.tobytes()).hexdigest(), image.size, s.lowres_size, hr_size, zoom)
        with self._lock, torch.inference_mode():  # eviction releases tensors: never under a running question
            prepared = self._cache.get(key)
            if prepared is None:
                views = make_views(image, self.processor, s.lowres_size, zoom, hr_size)
                lr = self.model.encode_lowres(views)
                g = int(round(lr.shape[0] ** 0.5))
                prepared = PreparedImage(image, views, lr, self.model.highres_features(views, g), g)
                self._cache[key] = prepared
            if highres and not lazy:
                prepared.hr.full()
            self._cache.move_to_end(key)
            self._evict(keep=key, zoom=zoom)
        return prepared

    @property
    def cache_budget(self) -> int | None:
        """The byte budget of cached images (see the class docstring); measured once, on first use."""
        if self._cache_budget is None:
            free = memory.free_device_bytes(self.device)
            if free is not None:
                self._cache_budget = memory.image_cache_budget(free + self.cached_bytes)
        return self._cache_budget

    @property
    def cached_bytes(self) -> int:
        return sum(p.nbytes for p in self._cache.values())

    def _evict(self, keep: tuple, zoom: int) -> None:
        """Drop least recently used images beyond `cache_size`, and while the others and the worst the image being
        asked about can grow to (every HR key/value projected, a long prompt) exceed the byte budget."""
        budget = self.cache_budget
        worst = 0
        if budget is not None:
            settings = self.settings.with_overrides(zoom=zoom)
            g = settings.lowres_size // self.model.config.vision_config.patch_size
            per_image = memory.image_cache_bytes(self.model.config, settings, self.model.dtype)
            worst = max(per_image.worst(g * g + memory.PROMPT_TEXT_TOKENS), self._cache[keep].nbytes)
        for old in list(self._cache):
            others = sum(p.nbytes for k, p in self._cache.items() if k != keep)
            over_count = len(self._cache) > self._cache_size
            over_bytes = budget is not None and others + worst > budget
            if not (over_count or over_bytes):
                break
            if old != keep:
                self._cache.pop(old).release()

    def clear_cache(self) -> None:
        """Release every cached image (after running out of memory, or to start afresh)."""
        with self._lock:
            for prepared in self._cache.values():
                prepared.release()
            self._cache.clear()

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

    def flex_state(self, prepared: PreparedImage, mode: str, settings: FlexSettings, image_start: int, *,
                   recorder: TraceRecorder | None = None, avl: AVLCache | None = None,
                   hooks: FlexHooks | None = None) -> FlexState:
        """The per-call state for one generation over `prepared` with the prompt's image at `image_start`."""
        g, G = prepared.lr_grid, prepared.hr_grid
        hr_cos = hr_sin = None
        if mode != "lowres":
            hr_cos, hr_sin = self.model.hr_rotary_tables(image_start, g, G)
        return FlexState(
            mode=mode, settings=settings, image_start=image_start, lr_grid=g,
            hr_features=prepared.hr if mode != "lowres" else None, hr_cos=hr_cos, hr_sin=hr_sin,
            original_sizes=[prepared.views.original_size], recorder=recorder, avl=avl, hooks=hooks,
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
        # DynamicCache copies what it is given (and only then grows by concatenation): the stored prefix is never
        # aliased or changed by the generation that reuses it.
        return DynamicCache(ddp_cache_data=[(k[..., :common, :], v[..., :common, :]) for k, v in old_cache])

    @staticmethod
    def _keep_prefix(prepared: PreparedImage, key: tuple, cache) -> None:
        if cache is None:
            return
        keep = len(key) - 1
        # A compact copy: a view into the generation's cache would keep its whole storage (prompt + answer) alive.
        layers = tuple((layer.keys[..., :keep, :].clone(), layer.values[..., :keep, :].clone())
                       for layer in cache.layers)
        prepared.prompt_cache = (key[:keep], layers)

    # ---- answering ---------------------------------------------------------------------------------------
    def answer(self, image, question: str, **options) -> Answer:
        """Answer `question` about `image` (a path, bytes, PIL image, array or PreparedImage); options: see
        AnswerOptions."""
        return self._generate(image, question, AnswerOptions(**options), streamer=None)

    def stream(self, image, question: str, **options) -> Iterator[str | Answer]:
        """Yield text chunks as they are generated, then the final Answer. Errors are raised here.

        Closing the iterator early (a cancelled request, a closed page) stops generation at the next token and
        returns once the model is free for the next question."""
        opts = AnswerOptions(**options)  # bad options fail here, in the caller's thread
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        cancel = threading.Event()
        result: dict = {}

        def run():
            try:
                result["answer"] = self._generate(image, question, opts, streamer=streamer, cancel=cancel)
            except BaseException as err:  # handed to the consumer below
                result["error"] = err
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        try:
            for chunk in streamer:
                if chunk:
                    yield chunk
        except GeneratorExit:
            cancel.set()
            worker.join()  # one decoding step at most: the lock is free when close() returns
            raise
        worker.join()
        if "error" in result:
            raise result["error"]
        yield result["answer"]

    def _generate(self, image, question: str, opts: AnswerOptions, streamer: BaseStreamer | None,
                  cancel: threading.Event | None = None) -> Answer:
        with self._lock:  # (re-entrant) still held while the caches are released after running out of memory
            try:
                return self._answer(image, question, opts, streamer, cancel)
            except torch.OutOfMemoryError as err:
                message = str(err)  # its traceback holds the call's tensors: let them go before clearing
            self.clear_cache()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        raise DeviceMemoryError(memory.out_of_memory_message(message, self.device))

    def _answer(self, image, question: str, opts: AnswerOptions, streamer: BaseStreamer | None,
                cancel: threading.Event | None) -> Answer:
        question = check_question(question)
        n_layers = self.model.config.text_config.num_hidden_layers
        settings = opts.settings(self.settings, n_layers)
        mode = opts.mode
        with self._lock:
            _synchronize(self.device)
            vision_start = time.perf_counter()
            lazy = self.lazy_hr if opts.lazy_hr is None else opts.lazy_hr
            prepared = self.prepare(image, highres=mode != "lowres", zoom=settings.zoom, lazy=lazy)
            _synchronize(self.device)  # the tower's kernels are queued: wait for them before reading the clock
            vision_seconds = time.perf_counter() - vision_start  # ~0 when the image's features were cached
            ids_before, ids_after = tokenize_around_image(self.tokenizer, conversation(question, opts.history))
            inputs_embeds = self._embed(prepared, ids_before, ids_after)
            image_start = len(ids_before)
            prompt_key = (*ids_before, *[-1] * prepared.lr_grid**2, *ids_after)
            # A-VL evicts from the cache, so its caches are never reused as a prompt prefix.
            reuse = (self.reuse_prefix if opts.reuse_prefix is None else opts.reuse_prefix) and opts.avl is None
            cache = self._reusable_prefix(prepared, prompt_key) if reuse else None
            reused = cache.get_seq_length() if cache is not None else 0
            if opts.avl is not None:
                cache = AVLCache(opts.avl, n_layers, image_start, prepared.lr_grid**2)
            recorder = None
            if opts.trace:
                recorder = TraceRecorder(prepared.lr_grid, prepared.hr_grid, settings.selection_layer,
                                         None if opts.trace is True else int(opts.trace))
            hooks = FlexHooks(planted_selection=opts.planted_selection, shift_selection=opts.shift_selection)
            state = self.flex_state(prepared, mode, settings, image_start, recorder=recorder,
                                    avl=cache if opts.avl is not None else None, hooks=hooks)
            timer = _Timer(streamer)  # generate hands it each token with .cpu(): its clock follows the device
            if opts.seed is not None:
                torch.manual_seed(opts.seed)
            sampling = {"do_sample": True, "temperature": opts.temperature, "top_p": opts.top_p} \
                if opts.do_sample else {"do_sample": False}
            stopping = StoppingCriteriaList([_Cancelled(cancel)]) if cancel is not None else None
            with torch.inference_mode():
                output = self.model.generate(
                    inputs_embeds=inputs_embeds,
                    attention_mask=torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=self.device),
                    max_new_tokens=opts.max_new_tokens,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
                    streamer=timer,
                    stopping_criteria=stopping,
                    flex_state=state,
                    past_key_values=cache,
                    return_dict_in_generate=True,
                    **sampling,
                )
            kv_bytes = cache_nbytes_per_layer(output.past_key_values)
            if reuse:
                self._keep_prefix(prepared, prompt_key, output.past_key_values)
        token_ids = output.sequences[0].tolist()
        if token_ids and token_ids[-1] == self.tokenizer.eos_token_id:
            token_ids = token_ids[:-1]
        stats = self._stats(prepared, state, settings, opts, inputs_embeds.shape[1], timer.times, vision_seconds,
                            reused, kv_bytes, output.past_key_values if opts.avl is not None else None)
        return Answer(
            text=self.tokenizer.decode(token_ids, skip_special_tokens=True).strip(),
            mode=mode,
            token_ids=token_ids,
            tokens=[self.tokenizer.decode([t]) for t in token_ids],
            stats=stats,
            trace=recorder.finish() if recorder else None,
            settings=settings.to_dict(),
            unknown_words=unknown_words(self.tokenizer, question),
            model=str(self.name),
        )

    def _stats(self, prepared: PreparedImage, state: FlexState, settings: FlexSettings, opts: AnswerOptions,
               prompt_len: int, times: list[float], vision_seconds: float, reused: int, kv_bytes: list[int],
               avl_cache: AVLCache | None) -> AnswerStats:
        n_layers = self.model.config.text_config.num_hidden_layers
        g, G = prepared.lr_grid, prepared.hr_grid
        passes = len(times) - 1
        attended = state.hr_attended(n_layers)
        projected = state.hr_projected(n_layers)
        crops = prepared.hr.crops_encoded if opts.mode != "lowres" else 0
        flops = cost.call_flops(  # LR view + the HR crops this image needed so far, as if encoded by this call
            self.model.config, opts.mode, prompt_len, passes, attended, selection_layer=settings.selection_layer,
            zoom=settings.zoom, hr_crops=crops, avl_keys=avl_cache.keys_scored if avl_cache is not None else None,
            hr_projected=projected,
        )
        decode = [b - a for a, b in zip(times[1:-1], times[2:])]
        hr_layers = [count for per_layer in attended for count in per_layer[settings.selection_layer + 1 :]]
        avl = None
        if avl_cache is not None:
            steps = avl_cache.visual_attended[1:]  # decoding steps (the prefill attends to every image token)
            per_step = [sum(layers) / len(layers) for layers in steps if layers]
            mean_visual = sum(per_step) / len(per_step) if per_step else float(g * g)
            full = avl_cache.full_cache_nbytes_per_layer()
            avl = AVLStats(opts.avl, sum(full), full, per_step, mean_visual / (g * g))
        return AnswerStats(
            lr_tokens=g * g,
            hr_tokens=G * G,
            text_tokens=prompt_len - g * g,
            prompt_tokens=prompt_len,
            generated_tokens=passes,
            hr_attended_per_layer=attended[0] if attended else [],
            hr_attended_mean=sum(hr_layers) / len(hr_layers) if hr_layers else 0.0,
            hr_crops_encoded=crops,
            hr_kv_projected=sum(map(sum, projected)),
            prefix_tokens_reused=reused,
            kv_bytes=sum(kv_bytes),
            kv_bytes_per_layer=kv_bytes,
            latency_s=Latency(
                vision=vision_seconds,
                prefill=times[1] - times[0] if passes else 0.0,
                decode_per_token=sum(decode) / len(decode) if decode else 0.0,
                generation=times[-1] - times[0],
            ),
            flops=flops,
            untrained_hr_projections=settings.untrained_hr_projections,
            avl=avl,
        )
