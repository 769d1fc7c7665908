"""The Inspect and Compare views, drawn from the records in a session's state (`app.records`); never runs a model.

Every function takes the session state and the token / layer the page shows, clamps them to the answer, and
returns figures and markdown; without an answer to show it returns empty values, never an error.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence

import numpy as np

from flexattn.cost import flex_layer_extra_flops

from . import figures, walk
from .geometry import selection_recall
from .records import AnswerRecord, CompareRecord


def kib(n: float) -> str:
    return f"{n / 1024:,.1f} KiB"


_SPACE = re.compile(r"\s+")


def clean(token: str) -> str:
    """A token as shown: one line, HTML-escaped (plotly's titles and labels and the page's markdown read HTML,
    where "</s>" would vanish)."""
    return html.escape(_SPACE.sub(" ", token).strip(), quote=False)


def layer_hr_mflops(text_config, kv_len: int, selection_layer: int, attended: Sequence[int]) -> list[float]:
    """Per layer: the MFLOPs spent on the HR tokens it attended (HR key/value projections, scores, weighted sum),
    from the project's cost model (the part of a layer's FlexAttention cost that grows with the HR tokens)."""
    return [
        (flex_layer_extra_flops(text_config, layer, kv_len, selection_layer, m)
         - flex_layer_extra_flops(text_config, layer, kv_len, selection_layer, 0)) / 1e6
        for layer, m in enumerate(attended)
    ]


def unknown_line(words: Sequence[str]) -> str:
    """The notice beside an answer whose question had words the model's tokenizer does not know."""
    if not words:
        return ""
    shown = ", ".join(html.escape(w) for w in words)
    them = "it" if len(words) == 1 else "them"
    return f"⚠️ **unknown to this model: {shown}**: its tokenizer has no word for {them}, so its answer cannot be " \
           f"about {them}"


def no_selection_note(rec: AnswerRecord) -> str:
    """Why a layer has no selection to draw."""
    if rec.mode == "lowres":
        return "lowres mode: no HR tokens"
    return f"layers before {rec.trace.selection_layer} do not select HR tokens"


class Inspector:
    # ---- picking -------------------------------------------------------------------------------------------
    @staticmethod
    def _record(state: dict | None) -> AnswerRecord | None:
        rec = (state or {}).get("answer")
        if rec is None or rec.trace is None or not rec.trace.passes:
            return None
        return rec

    def _pick(self, state: dict | None, token, layer) -> tuple[AnswerRecord, int, int] | None:
        rec = self._record(state)
        if rec is None:
            return None
        passes = rec.trace.passes
        token = int(np.clip(int(token or 0), 0, len(passes) - 1))
        layer = int(np.clip(int(layer if layer is not None else 0), 0, len(passes[token]) - 1))
        return rec, token, layer

    def token_count(self, state: dict | None) -> int:
        rec = self._record(state)
        return len(rec.trace.passes) if rec is not None else 0

    def layer_count(self, state: dict | None) -> int:
        rec = self._record(state)
        return len(rec.trace.passes[0]) if rec is not None else 0

    # ---- one token, one layer ------------------------------------------------------------------------------
    def render_layer(self, state: dict | None, token: int, layer: int):
        """Figures (1) and (2) for one token and layer: LR attention, and the HR tokens that layer selected."""
        picked = self._pick(state, token, layer)
        if picked is None:
            return None, None, ""
        rec, token, layer = picked
        trace, view, boxes = rec.trace, rec.view, rec.boxes(token)
        lt = trace.passes[token][layer]
        label = clean(rec.labels[token])
        lr_fig = figures.attention_figure(
            view, lt.lr_attention,
            f"Token {token} “{label}”: LR attention at layer {layer} ({trace.lr_grid}×{trace.lr_grid})", boxes)
        G = trace.hr_grid
        if lt.selected is not None:
            note = None if lt.selected.any() else "no HR token selected at this layer"
            title = (f"HR tokens selected at layer {layer} (used by layer {layer + 1}): "
                     f"{lt.selected_count} of {G * G}")
        else:
            note = no_selection_note(rec)
            title = f"HR tokens selected at layer {layer} ({G}×{G} grid)"
        mask_fig = figures.mask_figure(view, lt.selected, title, boxes, note)
        return lr_fig, mask_fig, self.layer_markdown(rec, token, layer)

    def render_token(self, state: dict | None, token: int, layer: int):
        """Everything for one token: figures (1)-(4), the layer text and the token strip."""
        picked = self._pick(state, token, layer)
        if picked is None:
            return None, None, None, None, "", ""
        lr_fig, mask_fig, info = self.render_layer(state, token, layer)
        rec, token, layer = picked
        trace = rec.trace
        layers = trace.passes[token]
        masks = [(lt.layer, lt.selected) for lt in layers if lt.selected is not None]
        boxes = rec.boxes(token)
        recalls = [selection_recall(m, rec.view.frame, boxes) for _, m in masks] if boxes else None
        grid_title = (f"Selection masks of every selecting layer, token {token} "
                      f"(layer · HR tokens selected{' · target recall' if boxes else ''})")
        grid_fig = figures.layers_grid_figure(rec.thumb, masks, boxes, recalls, grid_title)
        attended = [lt.hr_attended for lt in layers]
        mflops = ([0.0] * len(attended) if rec.text_config is None else
                  layer_hr_mflops(rec.text_config, rec.stats.prompt_tokens + token, trace.selection_layer, attended))
        chart = figures.layers_chart_figure(
            attended, trace.hr_grid ** 2, mflops, rec.stats.flops, trace.selection_layer, None,
            f"Token {token}: HR tokens attended and their cost, per layer")
        return lr_fig, mask_fig, grid_fig, chart, info, self.tokens_markdown(rec, token)

    def layer_markdown(self, rec: AnswerRecord, token: int, layer: int) -> str:
        trace = rec.trace
        lt = trace.passes[token][layer]
        G = trace.hr_grid
        parts = [f"Token {token} “{clean(rec.labels[token])}”, layer {layer}: attended "
                 f"**{lt.hr_attended}** HR tokens ({lt.hr_attention_share:.1%} of its attention on HR)"]
        if lt.selected is not None:
            parts.append(f"selected **{lt.selected_count}** of {G * G} for layer {layer + 1}")
        boxes = rec.boxes(token)
        if boxes:
            last = next((x for x in reversed(trace.passes[token]) if x.selected is not None), None)
            recall = selection_recall(last.selected if last else None, rec.view.frame, boxes)
            here = selection_recall(lt.selected, rec.view.frame, boxes)
            text = "n/a (no selecting layer)" if recall is None else f"**{recall:.0%}** at layer {last.layer}"
            parts.append(f"this token's ground-truth target (green box): selection recall {text}"
                         + ("" if here is None else f", {here:.0%} at this layer"))
        elif rec.truth is not None:
            parts.append("no ground-truth target for this token")
        return " · ".join(parts)

    def tokens_markdown(self, rec: AnswerRecord, token: int) -> str:
        cells = []
        for k, label in enumerate(rec.labels):
            text = clean(label) or "␣"
            cells.append(f"<mark>{text}</mark>" if k == token else text)
        more = len(rec.answer.tokens) - len(rec.labels)
        tail = f" … (+{more} tokens not traced)" if more > 0 else ""
        return "Answer tokens: " + " ".join(cells) + tail

    def source_markdown(self, state: dict | None) -> str:
        """What the views below show: the question and answer, and where they came from."""
        rec = (state or {}).get("answer")
        if rec is None:
            return ""
        a = rec.answer
        origin = f"trace file `{html.escape(rec.source)}`" if rec.source else "asked here"
        lines = [f"**Showing** “{html.escape(rec.question)}” → “{html.escape(a.text) or '(empty answer)'}” · "
                 f"{a.mode} · model `{html.escape(a.model or 'unknown')}` · {origin}"]
        if rec.truth is not None:
            lines.append("ground truth: this is an example's own question, so its target boxes and recall are shown")
        if a.unknown_words:
            lines.append(unknown_line(a.unknown_words))
        if rec.trace is None:
            lines.append("this answer was not traced")
        return "  \n".join(lines)

    # ---- the whole walk ------------------------------------------------------------------------------------
    def render_overview(self, state: dict | None):
        """Tokens x layers: HR tokens selected, and target recall where the answer has ground truth."""
        rec = self._record(state)
        if rec is None:
            return None
        trace = rec.trace
        n_layers = len(trace.passes[0])
        selected = np.full((len(trace.passes), n_layers), np.nan, dtype=np.float32)
        recalls = np.full_like(selected, np.nan) if rec.truth is not None else None
        for k, layers in enumerate(trace.passes):
            boxes = rec.boxes(k)
            for lt in layers:
                if lt.selected is None:
                    continue
                selected[k, lt.layer] = lt.selected_count
                if recalls is not None and boxes:
                    recall = selection_recall(lt.selected, rec.view.frame, boxes)
                    recalls[k, lt.layer] = np.nan if recall is None else recall
        note = no_selection_note(rec) if np.isnan(selected).all() else None
        title = (f"The walk at a glance: every answer token (rows) at every layer (columns), "
                 f"{trace.hr_grid}×{trace.hr_grid} HR grid")
        return walk.overview_figure([clean(x) for x in rec.labels], selected, trace.hr_grid ** 2, recalls,
                                    trace.selection_layer, title, note)

    def render_playback(self, state: dict | None, layer: int):
        """The selection at `layer` over the image, answer token by answer token (slider and play button)."""
        picked = self._pick(state, 0, layer)
        if picked is None:
            return None
        rec, _, layer = picked
        G = rec.trace.hr_grid
        steps = []
        for k, layers in enumerate(rec.trace.passes):
            lt = layers[min(layer, len(layers) - 1)]
            boxes = rec.boxes(k)
            caption = f"Token {k} “{clean(rec.labels[k])}”: "
            if lt.selected is None:
                caption += f"no selection at layer {layer}"
            else:
                caption += f"{lt.selected_count} of {G * G} HR tokens selected at layer {layer}"
                recall = selection_recall(lt.selected, rec.view.frame, boxes) if boxes else None
                caption += "" if recall is None else f" · target recall {recall:.0%}"
            steps.append(walk.PlaybackStep(walk.token_label(k, clean(rec.labels[k])), caption, lt.selected, boxes))
        note = None if any(s.mask is not None for s in steps) else no_selection_note(rec)
        return walk.playback_figure(rec.view, steps, note)

    # ---- A-VL ----------------------------------------------------------------------------------------------
    def render_avl(self, state: dict | None, token: int, layer: int):
        """The A-VL panel for one token and layer: the LR tokens' states over the image, KV memory per layer with
        and without A-VL with visual tokens attended per decoding step, and a line of text. Without A-VL in
        this answer: no figures, and a line saying so (the page hides the panel then)."""
        picked = self._pick(state, token, layer)
        if picked is None:
            return None, None, ""
        rec, token, layer = picked
        s = rec.stats
        if s.avl is None:
            return None, None, (f"A-VL was off for this answer: its KV cache keeps every token "
                                f"({kib(s.kv_bytes)}). Switch A-VL on (left) and ask again to see which image "
                                f"tokens each layer keeps.")
        a, trace = s.avl, rec.trace
        lt = trace.passes[token][layer]
        label = clean(rec.labels[token])
        if token == 0:
            kind = "prefill: every image token attended (eviction follows it: see token 1)"
        elif lt.avl_refresh:
            kind = "refresh step: every cached image token attended, core re-ranked"
        else:
            kind = "ordinary step: core image tokens attended only"
        state_fig = None
        if lt.avl_state is not None:
            state_fig = figures.avl_state_figure(
                rec.view, lt.avl_state,
                f"Token {token} “{label}”, layer {layer}: A-VL state of the "
                f"{trace.lr_grid}×{trace.lr_grid} LR tokens",
                rec.boxes(token), refresh=bool(lt.avl_refresh) and token > 0)
        chart = figures.avl_chart_figure(
            s.kv_bytes_per_layer, a.kv_bytes_full_cache_per_layer, a.visual_attended_per_step, s.lr_tokens,
            a.settings.refresh_every, current_step=token, current_layer=layer,
            title="A-VL: KV memory at the end of the answer, and image tokens attended while decoding")
        parts = [f"A-VL · token {token} “{label}”, layer {layer}: **{kind}**"]
        if lt.avl_state is not None:
            n = np.bincount(np.asarray(lt.avl_state).ravel(), minlength=3)
            parts.append(f"evicted {n[0]} · secondary {n[1]} · core {n[2]} of {s.lr_tokens} LR tokens")
        full = a.kv_bytes_full_cache
        parts.append(f"KV cache {kib(s.kv_bytes)} of {kib(full)} ({s.kv_bytes / full if full else 0:.0%})")
        return state_fig, chart, " · ".join(parts)

    def has_avl(self, state: dict | None) -> bool:
        rec = self._record(state)
        return rec is not None and rec.stats.avl is not None

    # ---- compare -------------------------------------------------------------------------------------------
    def render_compare(self, state: dict | None, token: int, layer: int):
        """Every compared run side by side at the same answer token and layer (each clamped to its own answer)."""
        record: CompareRecord | None = (state or {}).get("compare")
        if record is None or not record.runs:
            return None
        token, layer = max(0, int(token or 0)), max(0, int(layer or 0))
        columns = []
        for label, answer in record.runs:
            s = answer.stats
            title = (f"<b>{label}</b>: “{html.escape(answer.text[:40]) or '(empty)'}”<br>"
                     f"{s.tflops:.3g} TFLOPs · {s.hr_attended_mean:.0f} HR tokens/layer · {s.latency_s.total:.2f} s")
            passes = answer.trace.passes if answer.trace is not None else []
            if token >= len(passes):
                columns.append(walk.ModeColumn(title, None, None, f"no token {token} in this answer"))
                continue
            lt = passes[token][min(layer, len(passes[token]) - 1)]
            if lt.selected is not None:
                mask_title = f"layer {lt.layer}: {lt.selected_count} HR tokens selected"
            elif answer.mode == "lowres":
                mask_title = "lowres: no HR tokens"
            else:
                mask_title = f"layer {lt.layer}: no selection before layer {answer.trace.selection_layer}"
            columns.append(walk.ModeColumn(title, lt.lr_attention, lt.selected, mask_title))
        title = f"Answer token {token}, layer {layer}: LR attention (top), HR tokens selected (bottom)"
        return walk.modes_figure(record.view, columns, record.boxes(token), title)
