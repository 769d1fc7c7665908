"""An evaluation as one self-contained HTML page: the summary table, a chart per mode, and the worst items with
the LR attention and the HR selection of their answer's first token drawn over the image (plotly, inlined once)."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .evaluate import WorstItem
from .image import pad_to_square, square_offset

DISPLAY_PX = 480  # side of the padded square as drawn
METRICS = (("accuracy", "accuracy"), ("hr_share", "HR share"), ("selection_recall", "selection recall"))
EXTRAS = (("shifted_mask_accuracy", "accuracy with masks rolled by G/3"),
          ("freeform_match", "free-form: correct option's text in the answer (the paper asks GPT-4)"),
          ("kv_ratio", "A-VL KV bytes / full cache"), ("token_agreement", "A-VL token agreement"))


def write_report(path: str | Path, result: dict, worst: list[WorstItem], mode: str = "flex") -> Path:
    """Write the page for `result` (an eval summary) and its `worst` items in `mode`; returns the path."""
    path = Path(path)
    figures = [summary_chart(result)] + [item_figure(item) for item in worst]
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%") for i, fig in
             enumerate(figures)]
    flex = result.get("flex_settings", {})
    title = f"{result['bench']} - {result['model']}"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{result['n']} items; selection threshold {flex.get('threshold')}, pool {flex.get('pool_size')}, "
        f"selection layer {flex.get('selection_layer')}.</p>",
        summary_table(result),
        parts[0],
    ]
    if worst:
        body.append(f"<h2>Worst items in {html.escape(mode)}: lowest selection recall, then wrong answers</h2>"
                    "<p>Left: the LR attention (summed over heads) of the layer that chose the HR tokens the last "
                    "layer attended for the answer's first token; right: those HR tokens. Boxes: the targets that "
                    "token's selection recall is measured against.</p>")
        for item, part in zip(worst, parts[1:]):
            body.append(f"<section>{_caption(item)}{part}</section>")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
        "section{border-top:1px solid #ddd;margin-top:1.5em;padding-top:.5em}.wrong{color:#b00}.right{color:#070}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def summary_table(result: dict) -> str:
    head = "".join(f"<th>{h}</th>" for h in ("mode", "group", "n", *(label for _, label in METRICS), "TFLOPs"))
    rows = []
    for mode, block in result["modes"].items():
        groups = [("all", block), *block.get("families", {}).items(), *block.get("subsets", {}).items()]
        for group, b in groups:
            cells = [mode, group, b.get("n"), *(b.get(key) for key, _ in METRICS)]
            tflops = b.get("tflops")
            rows.append("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells)
                        + f"<td>{'-' if tflops is None else f'{tflops:.3g}'}</td></tr>")
    extras = [f"<tr><td>{html.escape(mode)}</td><td>{label}</td><td>{_fmt(block[key])}</td></tr>"
              for mode, block in result["modes"].items() for key, label in EXTRAS if block.get(key) is not None]
    table = f"<table><tr>{head}</tr>{''.join(rows)}</table>"
    if extras:
        table += f"<p></p><table><tr><th>mode</th><th>measure</th><th>value</th></tr>{''.join(extras)}</table>"
    return table


def summary_chart(result: dict) -> go.Figure:
    modes = list(result["modes"])
    fig = go.Figure([go.Bar(name=label, x=modes, y=[result["modes"][m].get(key) for m in modes])
                     for key, label in METRICS])
    fig.update_layout(barmode="group", height=320, yaxis=dict(range=[0, 1]), margin=dict(t=30, b=30),
                      title="per mode")
    return fig


def _image_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def item_figure(item: WorstItem) -> go.Figure:
    """The padded square the model sees, twice: with the LR attention map, and with the HR selection; target boxes
    on both. Grid cells line up with the image's (cell c: centre at c/2 + k*c)."""
    side = max(item.image.size)
    scale = DISPLAY_PX / side
    square = pad_to_square(item.image.convert("RGB"), (127, 127, 127)).resize((DISPLAY_PX, DISPLAY_PX))
    uri = _image_uri(square)
    fig = make_subplots(rows=1, cols=2, subplot_titles=("LR attention", "HR selection"), horizontal_spacing=0.04)
    layers = [(1, item.lr_attention, False), (2, item.mask, True)]
    for col, grid, is_mask in layers:
        fig.add_trace(go.Image(source=uri), row=1, col=col)
        if grid is None:
            continue
        cell = DISPLAY_PX / grid.shape[0]
        if is_mask:  # one trace: NaN where unselected, so only selected cells are tinted
            z = np.where(np.asarray(grid, bool), 1.0, np.nan)
            trace = go.Heatmap(z=z, colorscale=[[0, "#00c8ff"], [1, "#00c8ff"]], showscale=False, opacity=0.45,
                               hoverinfo="skip")
        else:  # the low end transparent, or zero cells would tint the whole image
            z = np.asarray(grid, float)
            trace = go.Heatmap(z=z, colorscale=[[0, "rgba(255,0,0,0)"], [1, "rgba(255,0,0,0.75)"]],
                               showscale=False, hovertemplate="attention %{z:.3f}<extra></extra>")
        trace.update(x0=cell / 2, dx=cell, y0=cell / 2, dy=cell, zsmooth=False)
        fig.add_trace(trace, row=1, col=col)
    ox, oy = square_offset(item.image.size)
    for col in (1, 2):
        for x0, y0, x1, y1 in item.boxes:
            fig.add_shape(type="rect", x0=(x0 + ox) * scale, y0=(y0 + oy) * scale, x1=(x1 + ox) * scale,
                          y1=(y1 + oy) * scale, line=dict(color="#ffe100", width=2), row=1, col=col)
    fig.update_xaxes(visible=False, range=[0, DISPLAY_PX])
    for col, x in ((1, "x"), (2, "x2")):
        fig.update_yaxes(visible=False, range=[DISPLAY_PX, 0], scaleanchor=x, row=1, col=col)
    fig.update_layout(height=DISPLAY_PX * 0.62, margin=dict(l=0, r=0, t=30, b=0))
    return fig


def _caption(item: WorstItem) -> str:
    r = item.result
    verdict = "right" if r.get("correct", 0) >= 1 else "wrong"
    metrics = ", ".join(f"{label} {_fmt(r.get(key))}" for key, label in
                        (("correct", "score"), ("recall", "selection recall"), ("hr_share", "HR share")))
    return (f"<h3>{html.escape(item.key)}</h3><p>{html.escape(item.question)}</p>"
            f"<p class='{verdict}'>answer: {html.escape(item.given)} &nbsp; (truth: {html.escape(item.truth)})</p>"
            f"<p>{metrics}</p>")
