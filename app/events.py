"""Event functions: plain Python in, plain values (and plotly figures) out, so they can be called directly.

Errors meant for the user are raised as `gr.Error` made by `rejected`, which logs them as one line (a traceback
is for unexpected errors only); notices are `gr.Info` / `gr.Warning` calls (both are harmless outside a running
app). The per-browser-session state is a plain dict (see `new_session`); figures are always redrawn from the
records kept in it (`app.views`), never by running the model again.
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import gradio as gr
from PIL import Image

from flexattn import Answer, ImageError, PromptError
from flexattn.avl import AVLSettings
from flexattn.image import open_image
from flexattn.prompt import check_question
from flexattn.trace_file import TraceFile, TraceFileError, load_trace, save_trace

from . import figures, runtime
from .examples import Example, GroundTruths, file_sha1
from .records import AnswerRecord, CompareRecord
from .views import Inspector, kib, unknown_line

log = logging.getLogger(__name__)

COMPARE_HEADERS = ["mode", "A-VL", "answer", "HR tokens attended (mean/layer)", "TFLOPs", "latency (s)",
                   "KV cache (KiB)", "visual attention ratio"]
AVL_DEFAULTS = AVLSettings()  # the authors' rates; the page's A-VL sliders start here
COMPARE_SIDE = 360  # px of the image in each per-mode picture (six copies with A-VL)
KEEP_TRACE_FILES = 32  # saved trace files kept on the server (older ones are deleted)
NO_MODEL = ("No model is loaded: this app was started to view a saved trace (python app.py --trace FILE). "
            "Open other traces below, or start the app without --trace to ask questions.")


def rejected(message: str, title: str = "Cannot do that") -> gr.Error:
    """The error for an input the app refuses: one line in the log, no traceback, and the message on the page."""
    log.info("rejected (%s): %s", title, message)
    return gr.Error(message, title=title, print_exception=False)


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
        raise rejected(f"A-VL: {err}") from None


def new_session() -> dict:
    """The per-session state: the current image, the conversation about it, and the records the views draw."""
    return {
        "image_key": None,  # SHA-1 of the uploaded file's bytes
        "image_path": None,  # inside Gradio's upload cache; never sent back to the page
        "view": None,  # figures.ImageView (<= 1000 px) of the image
        "thumb": None,  # figures.ImageView (<= 128 px) for the small multiples
        "notices": [],
        "history": [],  # [(question, answer)] passed to the model for follow-ups
        "chat": [],  # the same conversation as chat messages
        "pending": None,  # the question being answered
        "answer": None,  # records.AnswerRecord: the answer the Inspect views show (asked, or opened from a file)
        "compare": None,  # records.CompareRecord: the last Compare, traced
    }


def _error(err: Exception) -> gr.Error:
    return rejected(str(err))


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class Events(Inspector):
    def __init__(self, examples: Sequence[Example] = (), trace_passes: int | None = None,
                 traces_dir: str | Path | None = None):
        self.truths = GroundTruths(list(examples))
        self._trace_passes = trace_passes
        self._rejected: dict[str, float] = {}  # upload path -> when image_changed last rejected it
        self._traces_dir = Path(traces_dir) if traces_dir else None  # where "Save trace" writes (made on first use)

    @property
    def vlm(self):
        return self.require_model()

    @staticmethod
    def require_model():
        """The served model; without one (a trace viewer), every event that needs it says so."""
        if not runtime.has_model():
            raise rejected(NO_MODEL, title="No model loaded")
        return runtime.model()

    # ---- image intake --------------------------------------------------------------------------------------
    def size_notices(self, image: Image.Image) -> list[str]:
        """What the model's fixed views do to an image of this size (nothing to say without a model)."""
        if not runtime.has_model():
            return []
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
            raise rejected("Upload an image first (or pick an example).", title="No image")
        try:
            key = file_sha1(path)
        except OSError:
            raise rejected("The uploaded file could not be read; please upload it again.", title="No image") from None
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
            notices=opened.notices + self.size_notices(image),
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
        self.require_model()  # no model: say so before looking at the inputs
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
        self.require_model()  # no model: say so before anything else
        if image:
            state = self.intake(image, state)  # a no-op for the image the turn was started with
        if not state.get("pending") and question and question.strip():
            try:
                state["pending"] = check_question(question)
            except PromptError as err:
                raise _error(err) from None
        question = state.get("pending")
        if not question or not state.get("image_path"):
            raise rejected("Ask a question about an image first.", title="Nothing to answer")
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
        state["answer"] = self.record(result, question, state)
        state["history"] = [*state["history"], (question, result.text)]
        state["chat"] = [*chat, {"role": "assistant", "content": result.text or "(empty answer)"}]
        state["pending"] = None
        if result.unknown_words:
            gr.Warning(f"Unknown to this model: {', '.join(result.unknown_words)}.")
        yield state["chat"], state, self.stats_markdown(state["answer"])

    def record(self, result: Answer, question: str, state: dict) -> AnswerRecord:
        """What the Inspect views draw for an answer asked here (ground truth only for an example's question)."""
        return AnswerRecord(
            answer=result, question=question, view=state["view"], thumb=state["thumb"], image=state["image_path"],
            history=list(state["history"]), text_config=self.vlm.model.config.text_config,
            truth=self.truths.lookup(state["image_key"], question),
        )

    def stats_markdown(self, rec: AnswerRecord | None) -> str:
        if rec is None:
            return ""
        s = rec.stats
        lat = s.latency_s
        sel = rec.answer.settings.get("selection_layer")
        lines = [unknown_line(rec.answer.unknown_words)] if rec.answer.unknown_words else []
        lines += [
            f"**{rec.mode}** · {s.generated_tokens} token{'' if s.generated_tokens == 1 else 's'} · prompt "
            f"{s.prompt_tokens} tokens "
            f"({s.lr_tokens} LR) · HR tokens attended per layer after layer {sel}: "
            f"**{s.hr_attended_mean:.0f}** of {s.hr_tokens} ({s.hr_share:.0%}) · {s.tflops:.4g} TFLOPs",
            f"latency: total {lat.total:.2f} s = vision {lat.vision:.2f} s + generation {lat.generation:.2f} s "
            f"(generation: prefill {lat.prefill:.2f} s, then {lat.decode_per_token * 1000:.0f} ms per token)",
        ]
        if s.avl is not None:
            a = s.avl
            full = a.kv_bytes_full_cache
            lines.append(f"A-VL: KV cache **{kib(s.kv_bytes)}** of {kib(full)} without eviction "
                         f"({s.kv_bytes / full if full else 0:.0%}) · image tokens attended per decoding step "
                         f"{a.visual_attention_ratio * s.lr_tokens:.1f} of {s.lr_tokens} on average "
                         f"({a.visual_attention_ratio:.0%})")
        else:
            lines.append(f"KV cache {kib(s.kv_bytes)} (A-VL off: every token kept)")
        if s.prefix_tokens_reused:
            lines.append(f"reused from an earlier question about this image: its features and the keys/values of "
                         f"{s.prefix_tokens_reused} prompt tokens")
        if rec.untrained and rec.mode != "lowres":
            lines.append("⚠️ untrained HR projections: this checkpoint's HR keys/values are copies of k_proj/v_proj")
        return "  \n".join(lines)

    # ---- the Inspect views, all at once -----------------------------------------------------------------------
    def render_all(self, state: dict | None, layer: int):
        """Every Inspect output for the state's answer (empty ones without an answer): the token slider back at the
        first token, the layer slider fitted to the answer's layers, the views, and the A-VL panel shown only when
        the answer used A-VL."""
        n_tokens, n_layers = self.token_count(state), self.layer_count(state)
        layer = int(min(max(int(layer or 0), 0), max(n_layers - 1, 0)))
        token_slider = gr.Slider(minimum=0, maximum=max(n_tokens - 1, 1), value=0, interactive=n_tokens > 1)
        layer_slider = gr.Slider(maximum=max(n_layers - 1, 1), value=layer) if n_layers else gr.Slider()
        return (token_slider, layer_slider, self.source_markdown(state), self.render_overview(state),
                self.render_playback(state, layer), *self.render_token(state, 0, layer),
                *self.render_avl(state, 0, layer), gr.Column(visible=self.has_avl(state)))

    def new_conversation(self, state: dict | None) -> tuple[dict, list, str]:
        """Forget the conversation and the answer shown (the image stays)."""
        state = dict(state or new_session())
        state.update(history=[], chat=[], pending=None, answer=None)
        return state, [], ""

    # ---- trace files ---------------------------------------------------------------------------------------
    def save_trace(self, state: dict | None) -> gr.File:
        """Write the answer the Inspect views show to a trace file; the page shows it for download."""
        rec: AnswerRecord | None = (state or {}).get("answer")
        if rec is None or rec.trace is None:
            raise rejected("Ask a question (or open a trace) first: there is no traced answer to save.",
                           title="Nothing to save")
        image = rec.image if isinstance(rec.image, Image.Image) else open_image(rec.image).image
        directory = self._trace_directory()
        slug = re.sub(r"[^a-z0-9]+", "-", rec.question.lower()).strip("-")[:40] or "question"
        path = directory / f"flexattn-trace-{rec.mode}-{slug}-{time.strftime('%Y%m%d-%H%M%S')}.npz"
        try:
            save_trace(rec.answer, image, rec.question, path, history=rec.history, text_config=rec.text_config,
                       ground_truth=rec.truth, image_size=(rec.view.frame.width, rec.view.frame.height))
        except TraceFileError as err:
            raise _error(err) from None
        for old in sorted(directory.glob("*.npz"), key=lambda p: p.stat().st_mtime)[:-KEEP_TRACE_FILES]:
            old.unlink(missing_ok=True)
        return gr.File(value=str(path), visible=True)

    def _trace_directory(self) -> Path:
        if self._traces_dir is None:
            self._traces_dir = Path(tempfile.mkdtemp(prefix="flexattn-traces-"))
        self._traces_dir.mkdir(parents=True, exist_ok=True)
        return self._traces_dir

    def open_trace(self, path: str | None, state: dict | None) -> dict:
        """Show a trace file in the Inspect views (no model needed); the conversation is left as it is."""
        if not path:
            raise rejected("Choose a trace file (.npz) saved by this app or by `python -m flexattn answer "
                           "--save-trace`.", title="No trace file")
        try:
            opened = load_trace(path)
        except TraceFileError as err:
            raise rejected(str(err), title="Cannot open the trace") from None
        return self.show_trace(opened, Path(path).name, state)

    @staticmethod
    def show_trace(opened: TraceFile, name: str, state: dict | None = None) -> dict:
        """`state` with the opened trace as the answer the Inspect views show."""
        state = dict(state or new_session())
        state["answer"] = AnswerRecord.from_trace_file(opened, name)
        return state

    # ---- compare ---------------------------------------------------------------------------------------------
    def compare(self, path: str | None, question: str, threshold: float | None = None,
                selection_layer: int | None = None, max_new_tokens: int = 64, with_avl: bool = False,
                vision_evict_rate: float = AVL_DEFAULTS.vision_evict_rate,
                compute_skip_rate: float = AVL_DEFAULTS.compute_skip_rate,
                refresh_every: int = AVL_DEFAULTS.refresh_every,
                text_evict_rate: float = AVL_DEFAULTS.text_evict_rate,
                selection_scores: str = AVL_DEFAULTS.selection_scores, state: dict | None = None,
                token: int = 0, layer: int | None = None):
        """The same question in all three modes (greedy, no history), traced; yields, as each run finishes, the
        table, the cost chart, the per-mode pictures at (`token`, `layer`) and the session state keeping them.

        With `with_avl`, each mode runs twice, A-VL off then on (six runs, never more)."""
        vlm = self.require_model()
        image_state = self.intake(path, new_session(), notify=False)  # notices were shown when the image came in
        try:
            question = check_question(question)
        except PromptError as err:
            raise _error(err) from None
        avl = avl_options(with_avl, vision_evict_rate, compute_skip_rate, refresh_every, text_evict_rate,
                          selection_scores)
        variants = (None, avl) if avl else (None,)
        runs = [(mode, variant) for mode in ("lowres", "flex", "select_all") for variant in variants]
        trace_budget = max(1, (self._trace_passes or runtime.trace_passes(vlm)) // len(runs))
        n_layers = vlm.model.config.text_config.num_hidden_layers
        layer = vlm.settings.selection_layer + 1 if layer is None else layer
        state = dict(state or new_session())
        state["compare"] = record = CompareRecord(
            question, figures.image_view(open_image(image_state["image_path"]).image, COMPARE_SIDE, quality=80),
            self.truths.lookup(image_state["image_key"], question))
        rows: list[dict] = []
        results = runtime.compare(image_state["image_path"], question, [  # one GPU call for every run
            self.options(mode, threshold, selection_layer, max_new_tokens, trace=trace_budget, avl=run_avl)
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
            record.runs.append((mode + (" +A-VL" if run_avl is not None else ""), result))
            s = result.stats
            rows.append({"mode": mode, "avl": run_avl is not None, "answer": result.text,
                         "hr_attended_mean": s.hr_attended_mean, "hr_tokens": s.hr_tokens, "tflops": s.tflops,
                         "latency_s": s.latency_s.total, "kv_bytes": s.kv_bytes,
                         # without A-VL every decoding step attends to every LR image token
                         "visual_ratio": s.avl.visual_attention_ratio if s.avl is not None else 1.0})
            token_slider = gr.Slider(maximum=max(record.max_tokens - 1, 1), interactive=record.max_tokens > 1)
            layer_slider = gr.Slider(maximum=n_layers - 1)
            yield (compare_table(rows), figures.compare_figure(rows), self.render_compare(state, token, layer),
                   token_slider, layer_slider, state)


def compare_table(rows: Sequence[dict]) -> list[list]:
    return [[r["mode"], "on" if r.get("avl") else "off", r["answer"], f"{r['hr_attended_mean']:.0f} / {r['hr_tokens']}",
             float(f"{r['tflops']:.4g}"), round(r["latency_s"], 3), round(r.get("kv_bytes", 0) / 1024, 1),
             round(r.get("visual_ratio", 1.0), 3)] for r in rows]
