"""Event functions: plain Python in, plain values (and plotly figures) out, so they can be called directly.

Errors meant for the user are raised as `gr.Error`; notices are `gr.Info` / `gr.Warning` calls (both are
harmless outside a running app). The per-browser-session state is a plain dict (see `new_session`); figures
are always redrawn from the trace cached in it, never by running the model again.
"""

from __future__ import annotations

import html
import logging
import re
import time
from collections.abc import Iterator, Sequence

import gradio as gr
import numpy as np
from PIL import Image

from flexattn import Answer, ImageError, PromptError
from flexattn.avl import AVLSettings
from flexattn.cost import flex_layer_extra_flops
from flexattn.image import open_image
from flexattn.prompt import check_question

from . import figures, runtime
from .examples import Example, file_sha1, targets_by_sha1
from .geometry import Frame, selection_recall

log = logging.getLogger(__name__)

COMPARE_HEADERS = ["mode", "A-VL", "answer", "HR tokens attended (mean/layer)", "TFLOPs", "latency (s)",
                   "KV cache (KiB)", "visual attention ratio"]
AVL_DEFAULTS = AVLSettings()  # the authors' rates; the page's A-VL sliders start here


def avl_options(on: bool, vision_evict_rate: float = AVL_DEFAULTS.vision_evict_rate,
                compute_skip_rate: float = AVL_DEFAULTS.compute_skip_rate,
                refresh_every: int = AVL_DEFAULTS.refresh_every,
                text_evict_rate: float = AVL_DEFAULTS.text_evict_rate,
                selection_scores: str = AVL_DEFAULTS.selection_scores) -> AVLSettings | None:
    """The page's A-VL switch and settings as the `avl=` argument of FlexVLM.answer/stream (None when off)."""
    if not on:
        return None
    try:
        return AVLSettings(vision_evict_rate=float(vision_evict_rate), compute_skip_rate=float(compute_skip_rate),
                           refresh_every=int(refresh_every), text_evict_rate=float(text_evict_rate),
                           selection_scores=str(selection_scores))
    except (TypeError, ValueError) as err:
        raise gr.Error(f"A-VL: {err}", title="Cannot do that") from None


def _kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


def new_session() -> dict:
    """The per-session state: the current image, the conversation about it, and the last answer's trace."""
    return {
        "image_key": None,  # SHA-1 of the uploaded file's bytes
        "image_path": None,  # inside Gradio's upload cache; never sent back to the page
        "view": None,  # figures.ImageView (<= 1000 px) of the image
        "thumb": None,  # figures.ImageView (<= 128 px) for the small multiples
        "targets": [],  # ground-truth boxes when the image is a known example
        "notices": [],
        "history": [],  # [(question, answer)] passed to the model for follow-ups
        "chat": [],  # the same conversation as chat messages
        "pending": None,  # the question being answered
        "answer": None,  # the last answer: text, tokens, stats, trace, ...
    }


def _error(err: Exception) -> gr.Error:
    return gr.Error(str(err), title="Cannot do that")


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class Events:
    def __init__(self, examples: Sequence[Example] = (), trace_passes: int | None = None):
        self.targets = targets_by_sha1(list(examples))
        self._trace_passes = trace_passes
        self._rejected: dict[str, float] = {}  # upload path -> when image_changed last rejected it

    @property
    def vlm(self):
        return runtime.model()

    @property
    def n_layers(self) -> int:
        return self.vlm.model.config.text_config.num_hidden_layers

    # ---- image intake --------------------------------------------------------------------------------------
    def size_notices(self, image: Image.Image) -> list[str]:
        """What the model's fixed views do to an image of this size."""
        notes = []
        s = self.vlm.settings
        w, h = image.size
        if max(w, h) > s.hr_size:
            notes.append(f"The image is {w}×{h}, larger than the model's HR size: it is padded to a square and "
                         f"downscaled to {s.hr_size}×{s.hr_size} px. The overlays are drawn on the full image.")
        elif max(w, h) < s.lowres_size:
            notes.append(f"The image is {w}×{h}, smaller than the model's LR size ({s.lowres_size} px): it is "
                         f"upscaled, and detail it does not have cannot be recovered.")
        return notes

    def intake(self, path: str | None, state: dict, notify: bool = True) -> dict:
        """Load and check the image at `path` (Gradio's upload cache); a new image starts a new conversation."""
        if not path:
            raise gr.Error("Upload an image first (or pick an example).", title="No image")
        try:
            key = file_sha1(path)
        except OSError:
            raise gr.Error("The uploaded file could not be read; please upload it again.", title="No image") from None
        if state.get("image_key") == key:
            state["image_path"] = path
            return state
        try:
            opened = open_image(path)
        except ImageError as err:
            raise _error(err) from None
        image = opened.image
        fresh = new_session()
        fresh.update(
            image_key=key, image_path=path, view=figures.image_view(image),
            thumb=figures.image_view(image, figures.THUMB_SIDE, quality=75),
            targets=self.targets.get(key, []), notices=opened.notices + self.size_notices(image),
        )
        for note in fresh["notices"] if notify else ():
            gr.Info(note)
        return fresh

    def image_changed(self, path: str | None, state: dict | None) -> dict:
        """On upload / example / clear: check the image now (errors show at once) and reset the conversation."""
        state = state or new_session()
        if not path:
            return new_session()
        try:
            return self.intake(path, state)
        except gr.Error:
            # The browser re-sends a change event for an upload it cannot preview: report each rejection once.
            now = time.monotonic()
            seen = self._rejected.get(path)
            self._rejected = {p: t for p, t in self._rejected.items() if now - t < 10} | {path: now}
            if seen is not None and now - seen < 10:
                return state
            raise

    # ---- asking --------------------------------------------------------------------------------------------
    def start_turn(self, path: str | None, question: str, state: dict | None) -> tuple[list, dict]:
        """Check the inputs and show the question in the chat; the answer comes from `answer_turn`."""
        state = self.intake(path, state or new_session())
        try:
            question = check_question(question)
        except PromptError as err:
            raise _error(err) from None
        state["pending"] = question
        return [*state["chat"], {"role": "user", "content": question}], state

    def options(self, mode: str, threshold: float | None, selection_layer: int | None, max_new_tokens: int,
                do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                trace: bool | int = True, avl: AVLSettings | None = None) -> dict:
        """The keyword options of FlexVLM.answer / stream (checked there, in flexattn.AnswerOptions)."""
        if trace is True:
            trace = self._trace_passes or runtime.trace_passes(self.vlm)
        return dict(
            mode=mode,
            threshold=None if threshold is None else float(threshold),
            selection_layer=None if selection_layer is None else int(selection_layer),
            max_new_tokens=int(max_new_tokens),
            do_sample=bool(do_sample),
            temperature=float(temperature) if do_sample else 1.0,
            top_p=float(top_p) if do_sample else 1.0,
            seed=None if seed is None or seed == "" else int(seed),
            trace=trace,
            avl=avl,
        )

    def answer_turn(self, state: dict, mode: str = "flex", threshold: float | None = None,
                    selection_layer: int | None = None, max_new_tokens: int = 64, do_sample: bool = False,
                    temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None,
                    image: str | None = None, question: str | None = None, avl: bool = False,
                    vision_evict_rate: float = AVL_DEFAULTS.vision_evict_rate,
                    compute_skip_rate: float = AVL_DEFAULTS.compute_skip_rate,
                    refresh_every: int = AVL_DEFAULTS.refresh_every,
                    text_evict_rate: float = AVL_DEFAULTS.text_evict_rate,
                    selection_scores: str = AVL_DEFAULTS.selection_scores,
                    ) -> Iterator[tuple[list, dict, str]]:
        """Stream the answer to the pending question into the chat; keep its trace for the figures.

        `image` / `question` (the page's current inputs) cover a session whose pending turn was overwritten by a
        concurrent image-change event; the API can leave them out. `avl` switches A-VL on for this answer, with
        the rates that follow it.
        """
        state = state or new_session()
        if image:
            state = self.intake(image, state)  # a no-op for the image the turn was started with
        if not state.get("pending") and question and question.strip():
            try:
                state["pending"] = check_question(question)
            except PromptError as err:
                raise _error(err) from None
        question = state.get("pending")
        if not question or not state.get("image_path"):
            raise gr.Error("Ask a question about an image first.", title="Nothing to answer")
        try:
            avl_settings = avl_options(avl, vision_evict_rate, compute_skip_rate, refresh_every, text_evict_rate,
                                       selection_scores)
        except gr.Error:
            state["pending"] = None
            raise
        chat = [*state["chat"], {"role": "user", "content": question}]
        try:
            options = self.options(mode, threshold, selection_layer, max_new_tokens, do_sample, temperature,
                                   top_p, seed, avl=avl_settings)
            partial, result = "", None
            for part in runtime.stream_answer(state["image_path"], question, {**options, "history": state["history"]}):
                if isinstance(part, str):
                    partial += part
                    yield [*chat, {"role": "assistant", "content": partial}], state, "*generating…*"
                else:
                    result = part
            if result is None:
                raise RuntimeError("the model returned no answer")
        except gr.Error:
            state["pending"] = None
            raise
        except (ImageError, PromptError, ValueError) as err:
            state["pending"] = None
            raise _error(err) from None
        except Exception as err:  # keep serving: report, log, and leave the session usable
            log.exception("generation failed")
            state["pending"] = None
            raise gr.Error(f"Generation failed ({_first_line(err)}). The app is still running; try again.",
                           title="Generation failed") from None
        state["history"] = [*state["history"], (question, result.text)]
        state["chat"] = [*chat, {"role": "assistant", "content": result.text or "(empty answer)"}]
        state["answer"] = self.record(result, question)
        state["pending"] = None
        yield state["chat"], state, self.stats_markdown(state["answer"])

    def record(self, result: Answer, question: str) -> dict:
        passes = len(result.trace.passes) if result.trace is not None else 0
        labels = [result.tokens[k] if k < len(result.tokens) else "</s>" for k in range(passes)]
        return {
            "question": question,
            "text": result.text,
            "mode": result.mode,
            "tokens": list(result.tokens),
            "labels": labels,  # one per traced pass: the token that pass produced
            "stats": result.stats,
            "settings": result.settings,
            "trace": result.trace,
            "untrained": result.stats.untrained_hr_projections,
            "text_config": self.vlm.model.config.text_config,  # for the per-layer cost; renders never touch the model
        }

    def stats_markdown(self, rec: dict | None) -> str:
        if not rec:
            return ""
        s = rec["stats"]
        lat = s.latency_s
        sel = rec["settings"].get("selection_layer")
        lines = [
            f"**{rec['mode']}** · {s.generated_tokens} tokens · prompt {s.prompt_tokens} tokens "
            f"({s.lr_tokens} LR) · HR tokens attended per layer after layer {sel}: "
            f"**{s.hr_attended_mean:.0f}** of {s.hr_tokens} ({s.hr_share:.0%})",
            f"{s.tflops:.4g} TFLOPs · {lat.total:.2f} s in all: vision {lat.vision:.2f} s + generation "
            f"{lat.generation:.2f} s (prefill {lat.prefill:.2f} s, {lat.decode_per_token * 1000:.0f} ms/token)",
        ]
        if s.avl is not None:
            a = s.avl
            full = a.kv_bytes_full_cache
            lines.append(f"A-VL: KV cache **{_kib(s.kv_bytes)}** of {_kib(full)} without eviction "
                         f"({s.kv_bytes / full if full else 0:.0%}) · image tokens attended per decoding step "
                         f"{a.visual_attention_ratio * s.lr_tokens:.1f} of {s.lr_tokens} on average "
                         f"({a.visual_attention_ratio:.0%})")
        else:
            lines.append(f"KV cache {_kib(s.kv_bytes)} (A-VL off: every token kept)")
        if s.prefix_tokens_reused:
            lines.append(f"reused from an earlier question about this image: its features and the keys/values of "
                         f"{s.prefix_tokens_reused} prompt tokens")
        if rec["untrained"] and rec["mode"] != "lowres":
            lines.append("⚠️ untrained HR projections: this checkpoint's HR keys/values are copies of k_proj/v_proj")
        return "  \n".join(lines)

    # ---- inspecting (never runs the model) -----------------------------------------------------------------
    def _pick(self, state: dict | None, token, layer) -> tuple[dict, int, int] | None:
        rec = (state or {}).get("answer")
        if not rec or rec["trace"] is None or not rec["trace"].passes:
            return None
        passes = rec["trace"].passes
        token = int(np.clip(int(token or 0), 0, len(passes) - 1))
        layer = int(np.clip(int(layer if layer is not None else 0), 0, len(passes[token]) - 1))
        return rec, token, layer

    def render_layer(self, state: dict | None, token: int, layer: int):
        """Figures (1) and (2) for one token and layer: LR attention, and the HR tokens that layer selected."""
        picked = self._pick(state, token, layer)
        if picked is None:
            return None, None, ""
        rec, token, layer = picked
        trace, view, boxes = rec["trace"], state["view"], state["targets"]
        lt = trace.passes[token][layer]
        label = _clean(rec["labels"][token])
        S = trace.selection_layer
        lr_fig = figures.attention_figure(
            view, lt.lr_attention, f"Token {token} “{label}”: LR attention at layer {layer} ({trace.lr_grid}×{trace.lr_grid})",
            boxes)
        G = trace.hr_grid
        if lt.selected is not None:
            note = None if lt.selected.any() else "no HR token selected at this layer"
            title = (f"HR tokens selected at layer {layer} (used by layer {layer + 1}): "
                     f"{lt.selected_count} of {G * G}")
        else:
            note = ("lowres mode: no HR tokens" if rec["mode"] == "lowres"
                    else f"layers before {S} do not select HR tokens")
            title = f"HR tokens selected at layer {layer} ({G}×{G} grid)"
        mask_fig = figures.mask_figure(view, lt.selected, title, boxes, note)
        return lr_fig, mask_fig, self.layer_markdown(rec, token, layer, state)

    def render_token(self, state: dict | None, token: int, layer: int):
        """Everything for one token: figures (1)-(4), the layer text and the token strip."""
        lr_fig, mask_fig, info = self.render_layer(state, token, layer)
        picked = self._pick(state, token, layer)
        if picked is None:
            return None, None, None, None, "", ""
        rec, token, layer = picked
        trace = rec["trace"]
        layers = trace.passes[token]
        masks = [(lt.layer, lt.selected) for lt in layers if lt.selected is not None]
        boxes = state["targets"]
        recalls = [selection_recall(m, state["view"].frame, boxes) for _, m in masks] if boxes else None
        grid_title = (f"Selection masks of every selecting layer, token {token} "
                      f"(layer · HR tokens selected{' · target recall' if boxes else ''})")
        grid_fig = figures.layers_grid_figure(state["thumb"], masks, boxes, recalls, grid_title)
        attended = [lt.hr_attended for lt in layers]
        mflops = layer_hr_mflops(rec["text_config"], rec["stats"].prompt_tokens + token, trace.selection_layer,
                                 attended)
        chart = figures.layers_chart_figure(
            attended, trace.hr_grid ** 2, mflops, rec["stats"].flops, trace.selection_layer, None,
            f"Token {token}: HR tokens attended and their cost, per layer")
        return lr_fig, mask_fig, grid_fig, chart, info, self.tokens_markdown(rec, token)

    def layer_markdown(self, rec: dict, token: int, layer: int, state: dict) -> str:
        trace = rec["trace"]
        lt = trace.passes[token][layer]
        G = trace.hr_grid
        parts = [f"Token {token} “{_clean(rec['labels'][token])}”, layer {layer}: attended "
                 f"**{lt.hr_attended}** HR tokens ({lt.hr_attention_share:.1%} of its attention on HR)"]
        if lt.selected is not None:
            parts.append(f"selected **{lt.selected_count}** of {G * G} for layer {layer + 1}")
        boxes = state.get("targets")
        if boxes:
            last = next((x for x in reversed(trace.passes[token]) if x.selected is not None), None)
            recall = selection_recall(last.selected if last else None, state["view"].frame, boxes)
            here = selection_recall(lt.selected, state["view"].frame, boxes)
            text = "n/a (no selecting layer)" if recall is None else f"**{recall:.0%}** at layer {last.layer}"
            parts.append(f"ground-truth target (green box): selection recall {text}"
                         + ("" if here is None else f", {here:.0%} at this layer"))
        return " · ".join(parts)

    def tokens_markdown(self, rec: dict, token: int) -> str:
        cells = []
        for k, label in enumerate(rec["labels"]):
            text = html.escape(_clean(label)) or "␣"
            cells.append(f"<mark>{text}</mark>" if k == token else text)
        more = len(rec["tokens"]) - len(rec["labels"])
        tail = f" … (+{more} tokens not traced)" if more > 0 else ""
        return "Answer tokens: " + " ".join(cells) + tail

    def token_count(self, state: dict | None) -> int:
        rec = (state or {}).get("answer")
        return len(rec["trace"].passes) if rec and rec["trace"] is not None else 0

    def render_avl(self, state: dict | None, token: int, layer: int):
        """The A-VL panel for one token and layer: the LR tokens' states over the image, KV memory per layer with
        and without A-VL with visual tokens attended per decoding step, and a line of text. Without A-VL in
        this answer: no figures, and a line saying so."""
        picked = self._pick(state, token, layer)
        if picked is None:
            return None, None, ""
        rec, token, layer = picked
        s = rec["stats"]
        if s.avl is None:
            return None, None, (f"A-VL was off for this answer: its KV cache keeps every token "
                                f"({_kib(s.kv_bytes)}). Switch A-VL on (left) and ask again to see which image "
                                f"tokens each layer keeps.")
        a, trace = s.avl, rec["trace"]
        lt = trace.passes[token][layer]
        label = _clean(rec["labels"][token])
        if token == 0:
            kind = "prefill: every image token attended (eviction follows it: see token 1)"
        elif lt.avl_refresh:
            kind = "refresh step: every cached image token attended, core re-ranked"
        else:
            kind = "ordinary step: core image tokens attended only"
        state_fig = None
        if lt.avl_state is not None:
            state_fig = figures.avl_state_figure(
                state["view"], lt.avl_state,
                f"Token {token} “{label}”, layer {layer}: A-VL state of the "
                f"{trace.lr_grid}×{trace.lr_grid} LR tokens",
                state["targets"], refresh=bool(lt.avl_refresh) and token > 0)
        chart = figures.avl_chart_figure(
            s.kv_bytes_per_layer, a.kv_bytes_full_cache_per_layer, a.visual_attended_per_step, s.lr_tokens,
            a.settings.refresh_every, current_step=token, current_layer=layer,
            title="A-VL: KV memory at the end of the answer, and image tokens attended while decoding")
        parts = [f"A-VL · token {token} “{label}”, layer {layer}: **{kind}**"]
        if lt.avl_state is not None:
            n = np.bincount(np.asarray(lt.avl_state).ravel(), minlength=3)
            parts.append(f"evicted {n[0]} · secondary {n[1]} · core {n[2]} of {s.lr_tokens} LR tokens")
        full = a.kv_bytes_full_cache
        parts.append(f"KV cache {_kib(s.kv_bytes)} of {_kib(full)} ({s.kv_bytes / full if full else 0:.0%})")
        return state_fig, chart, " · ".join(parts)

    # ---- compare ---------------------------------------------------------------------------------------------
    def compare(self, path: str | None, question: str, threshold: float | None = None,
                selection_layer: int | None = None, max_new_tokens: int = 64, with_avl: bool = False,
                vision_evict_rate: float = AVL_DEFAULTS.vision_evict_rate,
                compute_skip_rate: float = AVL_DEFAULTS.compute_skip_rate,
                refresh_every: int = AVL_DEFAULTS.refresh_every,
                text_evict_rate: float = AVL_DEFAULTS.text_evict_rate,
                selection_scores: str = AVL_DEFAULTS.selection_scores):
        """The same question in all three modes (greedy, no history); yields the table as each run finishes.

        With `with_avl`, each mode runs twice, A-VL off then on (six runs, never more), untraced."""
        state = self.intake(path, new_session(), notify=False)  # notices were shown when the image came in
        try:
            question = check_question(question)
        except PromptError as err:
            raise _error(err) from None
        avl = avl_options(with_avl, vision_evict_rate, compute_skip_rate, refresh_every, text_evict_rate,
                          selection_scores)
        variants = (None, avl) if avl else (None,)
        runs = [(mode, variant) for mode in ("lowres", "flex", "select_all") for variant in variants]
        rows: list[dict] = []
        results = runtime.compare(state["image_path"], question, [  # one GPU call for every run
            self.options(mode, threshold, selection_layer, max_new_tokens, trace=False, avl=run_avl)
            for mode, run_avl in runs])
        for mode, run_avl in runs:
            try:
                result = next(results)
            except gr.Error:
                raise
            except (ImageError, PromptError, ValueError) as err:
                raise _error(err) from None
            except Exception as err:
                log.exception("generation failed")
                raise gr.Error(f"Generation failed in {mode} mode ({_first_line(err)}); the app is still running.",
                               title="Generation failed") from None
            s = result.stats
            rows.append({"mode": mode, "avl": run_avl is not None, "answer": result.text,
                         "hr_attended_mean": s.hr_attended_mean, "hr_tokens": s.hr_tokens, "tflops": s.tflops,
                         "latency_s": s.latency_s.total, "kv_bytes": s.kv_bytes,
                         # without A-VL every decoding step attends to every LR image token
                         "visual_ratio": s.avl.visual_attention_ratio if s.avl is not None else 1.0})
            yield compare_table(rows), figures.compare_figure(rows)


def compare_table(rows: Sequence[dict]) -> list[list]:
    return [[r["mode"], "on" if r.get("avl") else "off", r["answer"], f"{r['hr_attended_mean']:.0f} / {r['hr_tokens']}",
             float(f"{r['tflops']:.4g}"), round(r["latency_s"], 3), round(r.get("kv_bytes", 0) / 1024, 1),
             round(r.get("visual_ratio", 1.0), 3)] for r in rows]


def layer_hr_mflops(text_config, kv_len: int, selection_layer: int, attended: Sequence[int]) -> list[float]:
    """Per layer: the MFLOPs spent on the HR tokens it attended (HR key/value projections, scores, weighted sum),
    from the project's cost model (the part of a layer's FlexAttention cost that grows with the HR tokens)."""
    return [
        (flex_layer_extra_flops(text_config, layer, kv_len, selection_layer, m)
         - flex_layer_extra_flops(text_config, layer, kv_len, selection_layer, 0)) / 1e6
        for layer, m in enumerate(attended)
    ]


_SPACE = re.compile(r"\s+")


def _clean(token: str) -> str:
    return _SPACE.sub(" ", token).strip()
