"""Figures of a whole answer at once: the tokens x layers overview, the playback of the selection across answer
tokens, and the modes side by side. Inputs are plain numpy grids and strings; nothing here runs a model.

`gr.Plot` draws with `Plotly.react` and drops animation frames, so the playback is ONE figure with a mask trace
per answer token and a plotly slider whose steps `update` which trace is visible (and the title and target box):
dragging it works entirely in the browser. Its play button is `PLAY_JS`, which walks those same steps with
`Plotly.update` on a timer (Gradio's page exposes `window.Plotly`); the server is never asked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .figures import (ATTENTION_SCALE, IMAGE_HEIGHT, MASK_COLOUR, PAD_COLOUR, ImageView, add_note, box_shapes,
                      frame_shape, grid_placement, image_axes, image_trace, mask_values, square_ranges)

PLAY_STEP_MS = 700
MASK_SCALE = [[0.0, "rgba(0,0,0,0)"], [0.5, "rgba(0,0,0,0)"], [0.5, MASK_COLOUR], [1.0, MASK_COLOUR]]  # uint8 masks

# Play / pause the playback figure in the page: step through its slider's steps, one answer token each.
PLAY_JS = f"""() => {{
    const plot = () => document.querySelector('#fa-playback .js-plotly-plot');
    if (window.faPlayback) {{ clearInterval(window.faPlayback); window.faPlayback = null; return; }}
    const gd = plot();
    if (!gd || !window.Plotly || !gd.layout || !gd.layout.sliders || !gd.layout.sliders.length) return;
    const show = (gd, k) => {{
        const step = gd.layout.sliders[0].steps[k];
        window.Plotly.update(gd, step.args[0], Object.assign({{}}, step.args[1], {{'sliders[0].active': k}}));
    }};
    let k = 0;
    show(gd, k);
    window.faPlayback = setInterval(() => {{
        const gd = plot();  // the page may have drawn a new figure meanwhile
        k += 1;
        if (!gd || !gd.layout.sliders || k >= gd.layout.sliders[0].steps.length) {{
            clearInterval(window.faPlayback); window.faPlayback = null; return;
        }}
        show(gd, k);
    }}, {PLAY_STEP_MS});
}}"""


def token_label(k: int, label: str) -> str:
    return f"{k} “{label}”"


# ---- tokens x layers -----------------------------------------------------------------------------------------
def overview_figure(labels: Sequence[str], selected: np.ndarray, hr_tokens: int, recalls: np.ndarray | None = None,
                    selection_layer: int | None = None, title: str = "", note: str | None = None) -> go.Figure:
    """Heatmaps with a row per answer token and a column per layer: HR tokens each layer selected (NaN where a
    layer selects none: before the selection layer, or in lowres mode) and, with ground truth, the share of the
    token's target those selections cover."""
    selected = np.asarray(selected, dtype=np.float32)
    n_tokens, n_layers = selected.shape
    rows = [token_label(k, label) for k, label in enumerate(labels)]
    layers = list(range(n_layers))
    panels = 2 if recalls is not None else 1
    fig = make_subplots(rows=1, cols=panels, shared_yaxes=True, horizontal_spacing=0.16,
                        subplot_titles=("HR tokens selected", "target recall")[:panels])
    share = selected / hr_tokens if hr_tokens else selected
    fig.add_trace(go.Heatmap(
        z=selected, x=layers, y=rows, customdata=share, colorscale="Blues", zmin=0, xgap=1, ygap=1,
        colorbar=dict(title="HR tokens", len=0.9, x=0.43 if panels == 2 else 1.0, xanchor="left", thickness=12),
        hovertemplate=f"token %{{y}}, layer %{{x}}: %{{z:.0f}} of {hr_tokens} HR tokens selected "
                      f"(%{{customdata:.0%}})<extra></extra>", name="selected",
    ), row=1, col=1)
    if recalls is not None:
        small = n_tokens * n_layers <= 400
        fig.add_trace(go.Heatmap(
            z=np.asarray(recalls, dtype=np.float32), x=layers, y=rows, colorscale="Greens", zmin=0, zmax=1,
            xgap=1, ygap=1, colorbar=dict(title="recall", tickformat=".0%", len=0.9, thickness=12),
            texttemplate="%{z:.0%}" if small else None, textfont=dict(size=9),
            hovertemplate="token %{y}, layer %{x}: %{z:.0%} of its target selected<extra></extra>", name="recall",
        ), row=1, col=2)
    fig.update_yaxes(autorange="reversed", type="category", tickfont=dict(size=11))
    fig.update_xaxes(title_text="layer", dtick=max(1, math.ceil(n_layers / 16)))
    if selection_layer is not None:
        for col in range(1, panels + 1):
            fig.add_vline(x=selection_layer - 0.5, line=dict(color="#2ca02c", dash="dot"), row=1, col=col)
    # Gradio gives a titled plot a 100 px top margin: a short answer still needs room below it for its rows.
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=min(700, max(330, 150 + 24 * n_tokens)),
                      margin=dict(l=10, r=10, t=60, b=40))
    if note:
        add_note(fig, note)
    return fig


# ---- playback over the image ---------------------------------------------------------------------------------
@dataclass
class PlaybackStep:
    label: str  # the slider's label: the token
    caption: str  # the title while this step shows
    mask: np.ndarray | None  # (G, G) bool, or None: nothing selected at this layer
    boxes: Sequence[Sequence[float]] = ()  # this token's ground truth


def playback_figure(view: ImageView, steps: Sequence[PlaybackStep], note: str | None = None) -> go.Figure:
    """The image and one mask trace per answer token, the first visible; a slider (and `PLAY_JS`) shows them in
    turn. Masks are uint8 (1 selected, 0 not) under a colourscale whose low end is transparent."""
    data: list = [image_trace(view)]
    frame = frame_shape(view)
    for k, step in enumerate(steps):
        if step.mask is not None:
            G = step.mask.shape[0]
            z = np.asarray(step.mask, dtype=np.uint8)
        else:
            G, z = 1, np.zeros((1, 1), dtype=np.uint8)  # nothing selected: an empty layer keeps the trace count
        data.append(go.Heatmap(z=z, **grid_placement(view, G), zmin=0, zmax=1, zsmooth=False, colorscale=MASK_SCALE,
                               showscale=False, hoverinfo="skip", visible=k == 0, name=f"token {k}"))
    slider_steps = [
        dict(method="update", label=step.label,
             args=[{"visible": [True] + [i == k for i in range(len(steps))]},
                   {"title.text": step.caption, "shapes": [frame, *box_shapes(view, step.boxes)]}])
        for k, step in enumerate(steps)
    ]
    xaxis, yaxis = image_axes(view)
    fig = go.Figure(data=data)
    fig.update_layout(
        title=dict(text=steps[0].caption if steps else "", font=dict(size=13)), xaxis=xaxis, yaxis=yaxis,
        height=IMAGE_HEIGHT + 60, margin=dict(l=4, r=4, t=36, b=4), plot_bgcolor=PAD_COLOUR,
        paper_bgcolor="rgba(0,0,0,0)", dragmode="pan", showlegend=False,
        shapes=[frame, *box_shapes(view, steps[0].boxes if steps else ())],
        sliders=[dict(active=0, steps=slider_steps, currentvalue=dict(prefix="answer token "), pad=dict(t=8, b=4),
                      len=1.0, x=0, y=0, yanchor="top", font=dict(size=11))] if len(steps) > 1 else [],
    )
    if note:
        add_note(fig, note)
    return fig


# ---- modes side by side --------------------------------------------------------------------------------------
@dataclass
class ModeColumn:
    title: str  # mode, answer, cost
    lr_attention: np.ndarray | None  # (g, g) at the chosen token and layer, or None (no such token)
    mask: np.ndarray | None  # (G, G) selected at that layer, or None
    mask_title: str


def modes_figure(view: ImageView, columns: Sequence[ModeColumn], boxes: Sequence[Sequence[float]] = (),
                 title: str = "") -> go.Figure:
    """A column per run: the token's LR attention over the image (top) and the HR tokens selected at the layer
    (bottom), at the same token and layer in every column."""
    n = len(columns)
    titles = [c.title for c in columns] + [c.mask_title for c in columns]
    fig = make_subplots(rows=2, cols=n, subplot_titles=titles, horizontal_spacing=0.015, vertical_spacing=0.1)
    xr, yr = square_ranges(view)
    shapes = []
    for i, column in enumerate(columns):
        for row in (1, 2):
            fig.add_trace(image_trace(view), row=row, col=i + 1)
            index = (row - 1) * n + i
            suffix = "" if index == 0 else str(index + 1)
            shapes += [frame_shape(view, f"x{suffix}", f"y{suffix}"),
                       *box_shapes(view, boxes, xref=f"x{suffix}", yref=f"y{suffix}", width=1)]
        if column.lr_attention is not None:
            z = np.asarray(column.lr_attention, dtype=np.float32)
            lo, hi = float(np.nanmin(z)), float(np.nanmax(z))
            fig.add_trace(go.Heatmap(z=z, **grid_placement(view, z.shape[0]), zmin=lo, zmax=max(hi, lo + 1e-6),
                                     zsmooth=False, colorscale=ATTENTION_SCALE, showscale=False,
                                     hovertemplate="LR attention %{z:.3g}<extra></extra>"), row=1, col=i + 1)
        if column.mask is not None:
            fig.add_trace(go.Heatmap(z=mask_values(column.mask), **grid_placement(view, column.mask.shape[0]),
                                     zmin=0, zmax=1, zsmooth=False, colorscale=[[0, MASK_COLOUR], [1, MASK_COLOUR]],
                                     showscale=False, hoverinfo="skip"), row=2, col=i + 1)
    fig.update_xaxes(range=xr, visible=False, constrain="domain")
    for index in range(2 * n):
        suffix = "" if index == 0 else str(index + 1)
        fig.update_layout({f"yaxis{suffix}": dict(range=yr, visible=False, scaleanchor=f"x{suffix}",
                                                   constrain="domain")})
    for annotation in fig.layout.annotations:
        annotation.font = dict(size=11)
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=150 + 2 * min(300, 800 // max(n, 1)),
                      margin=dict(l=4, r=4, t=90, b=4), plot_bgcolor=PAD_COLOUR, paper_bgcolor="rgba(0,0,0,0)",
                      shapes=shapes, showlegend=False)
    return fig
