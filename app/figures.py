"""Plotly figures from an answer's trace. Inputs are plain numpy grids and numbers; nothing here runs a model.

Every image figure works in display pixels of a downscaled copy of the image (<= 1000 px, embedded once as a
base64 JPEG). Token grids cover the padded square (see `geometry.Frame`), so their cells are placed with the
padding offset and may extend past the image into the margins, drawn in the padding colour. A mask is ONE
heatmap trace (NaN where unselected), never one shape per cell, so a 72x72 grid over 32 layers stays light.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from PIL import Image

from flexattn.cost import Flops

from .geometry import Frame

MAX_DISPLAY_SIDE = 1000
THUMB_SIDE = 128
PAD_COLOUR = "rgb(122, 116, 104)"  # the CLIP processor's mean colour, which the model pads with
MASK_COLOUR = "rgba(0, 200, 255, 0.45)"
BOX_COLOUR = "#39ff14"
ATTENTION_SCALE = [
    [0.0, "rgba(255, 255, 0, 0)"],
    [0.15, "rgba(255, 220, 0, 0.25)"],
    [0.5, "rgba(255, 130, 0, 0.55)"],
    [1.0, "rgba(230, 0, 0, 0.8)"],
]
IMAGE_HEIGHT = 430
# A-VL token states (flexattn.trace.LayerTrace.avl_state): 0 evicted, 1 secondary (cached, skipped), 2 core (attended)
AVL_STATES = ("evicted", "secondary", "core")
AVL_FILL = ("rgba(15, 15, 15, 0.72)", "rgba(0, 150, 255, 0.4)", "rgba(255, 95, 0, 0.55)")  # over the image
AVL_SWATCH = ("#2b2b2b", "#0096ff", "#ff5f00")  # opaque, for the legend and the charts
AVL_SCALE = [  # discrete: z in {0, 1, 2} with zmin -0.5 and zmax 2.5 falls in the middle of one band each
    [0.0, AVL_FILL[0]], [1 / 3, AVL_FILL[0]],
    [1 / 3, AVL_FILL[1]], [2 / 3, AVL_FILL[1]],
    [2 / 3, AVL_FILL[2]], [1.0, AVL_FILL[2]],
]
FULL_CACHE_COLOUR = "#9e9e9e"
REFRESH_COLOUR = "#2ca02c"


@dataclass(frozen=True)
class ImageView:
    """A downscaled, embeddable copy of an image and the original it stands for."""

    src: str  # data:image/jpeg;base64,...
    width: int  # display px
    height: int
    frame: Frame  # the original image's size

    @property
    def sx(self) -> float:
        return self.width / self.frame.width

    @property
    def sy(self) -> float:
        return self.height / self.frame.height


def image_view(image: Image.Image, max_side: int = MAX_DISPLAY_SIDE, quality: int = 85,
               size: tuple[int, int] | None = None) -> ImageView:
    """Downscale (never upscale) to at most `max_side` px and encode as a base64 JPEG data URI. `size`: the
    original's (width, height) when `image` is already a smaller copy (a trace file's), else image.size."""
    w, h = image.size
    scale = min(1.0, max_side / max(w, h))
    small = image.convert("RGB")
    if scale < 1.0:
        small = small.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="JPEG", quality=quality)
    src = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
    return ImageView(src, small.width, small.height, Frame(*(size or (w, h))))


# ---- building blocks ---------------------------------------------------------------------------------------
def image_trace(view: ImageView) -> go.Image:
    # x0/y0 = 0.5: display pixel i covers [i, i + 1], so the image spans [0, width] x [0, height].
    return go.Image(source=view.src, x0=0.5, y0=0.5, dx=1, dy=1, hoverinfo="skip", name="image")


def grid_placement(view: ImageView, n: int) -> dict:
    """x0/dx/y0/dy that put an n x n grid's cells on the padded square, in display px."""
    fx, fy = view.frame.first_centre(n)
    c = view.frame.cell(n)
    return dict(x0=fx * view.sx, dx=c * view.sx, y0=fy * view.sy, dy=c * view.sy)


def square_ranges(view: ImageView) -> tuple[list[float], list[float]]:
    side = view.frame.side
    ox, oy = view.frame.offset
    x = [-ox * view.sx, (side - ox) * view.sx]
    y = [(side - oy) * view.sy, -oy * view.sy]  # reversed: image rows go down
    return x, y


def image_axes(view: ImageView) -> tuple[dict, dict]:
    xr, yr = square_ranges(view)
    xaxis = dict(range=xr, visible=False, constrain="domain", fixedrange=False)
    yaxis = dict(range=yr, visible=False, scaleanchor="x", scaleratio=1, constrain="domain")
    return xaxis, yaxis


def box_shapes(view: ImageView, boxes: Sequence[Sequence[float]], xref="x", yref="y", width=2) -> list[dict]:
    return [
        dict(type="rect", xref=xref, yref=yref, x0=x0 * view.sx, y0=y0 * view.sy, x1=x1 * view.sx,
             y1=y1 * view.sy, line=dict(color=BOX_COLOUR, width=width), fillcolor="rgba(0,0,0,0)")
        for x0, y0, x1, y1 in boxes
    ]


def frame_shape(view: ImageView, xref="x", yref="y") -> dict:
    """Outline of the real image inside the padded square."""
    return dict(type="rect", xref=xref, yref=yref, x0=0, y0=0, x1=view.width, y1=view.height,
                line=dict(color="rgba(255,255,255,0.6)", width=1, dash="dot"), fillcolor="rgba(0,0,0,0)")


def mask_values(mask: np.ndarray) -> np.ndarray:
    """float32 grid: 1 where selected, NaN elsewhere (NaN cells are not drawn)."""
    return np.where(np.asarray(mask, dtype=bool), np.float32(1.0), np.float32(np.nan)).astype(np.float32)


def add_note(fig: go.Figure, text: str) -> None:
    fig.add_annotation(text=text, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
                       font=dict(size=14, color="white"), bgcolor="rgba(0,0,0,0.55)")


# ---- (1) LR attention over the image -----------------------------------------------------------------------
def attention_figure(view: ImageView, lr_attention: np.ndarray, title: str = "",
                     boxes: Sequence[Sequence[float]] = ()) -> go.Figure:
    """The image with one token's LR attention (g x g, summed over heads) at one layer as a heatmap."""
    z = np.asarray(lr_attention, dtype=np.float32)
    g = z.shape[0]
    finite = z[np.isfinite(z)]
    zmin, zmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if zmax <= zmin:
        zmax = zmin + 1e-6
    heat = go.Heatmap(  # min-max scaled colours, as the selection min-max normalises before thresholding
        z=z, **grid_placement(view, g), zmin=zmin, zmax=zmax, zsmooth=False,
        colorscale=ATTENTION_SCALE, showscale=True, name="LR attention",
        colorbar=dict(thickness=10, len=0.8, title=dict(text="attn", side="right")),
        hovertemplate="LR cell (%{customdata})<br>attention %{z:.4f}<extra></extra>",
        customdata=cell_labels(g),
    )
    xaxis, yaxis = image_axes(view)
    fig = go.Figure(data=[image_trace(view), heat])
    fig.update_layout(
        title=dict(text=title, font=dict(size=13)), xaxis=xaxis, yaxis=yaxis, height=IMAGE_HEIGHT,
        margin=dict(l=4, r=4, t=36, b=4), plot_bgcolor=PAD_COLOUR, paper_bgcolor="rgba(0,0,0,0)",
        shapes=[frame_shape(view), *box_shapes(view, boxes)], dragmode="pan",
    )
    return fig


_LABELS: dict[int, np.ndarray] = {}


def cell_labels(n: int) -> np.ndarray:
    """(n, n) strings 'row, col' for hover text (cached per grid size)."""
    if n not in _LABELS:
        r, c = np.indices((n, n))
        _LABELS[n] = np.char.add(np.char.add(r.astype(str), ", "), c.astype(str))
    return _LABELS[n]


# ---- (2) selected HR regions over the full-resolution image ------------------------------------------------
def mask_figure(view: ImageView, mask: np.ndarray | None, title: str = "", boxes: Sequence[Sequence[float]] = (),
                note: str | None = None) -> go.Figure:
    """The image with the HR tokens a layer selected as ONE heatmap trace (NaN where unselected)."""
    data: list = [image_trace(view)]
    if mask is not None:
        G = mask.shape[0]
        data.append(go.Heatmap(
            z=mask_values(mask), **grid_placement(view, G), zmin=0.0, zmax=1.0, zsmooth=False,
            colorscale=[[0.0, MASK_COLOUR], [1.0, MASK_COLOUR]], showscale=False, hoverinfo="skip",
            name="selected HR tokens",
        ))
    xaxis, yaxis = image_axes(view)
    fig = go.Figure(data=data)
    fig.update_layout(
        title=dict(text=title, font=dict(size=13)), xaxis=xaxis, yaxis=yaxis, height=IMAGE_HEIGHT,
        margin=dict(l=4, r=4, t=36, b=4), plot_bgcolor=PAD_COLOUR, paper_bgcolor="rgba(0,0,0,0)",
        shapes=[frame_shape(view), *box_shapes(view, boxes)], dragmode="pan", showlegend=False,
    )
    if note:
        add_note(fig, note)
    return fig


# ---- (3) small multiples: every selecting layer's mask -----------------------------------------------------
def layers_grid_figure(thumb: ImageView, masks: Sequence[tuple[int, np.ndarray]], boxes: Sequence = (),
                       recalls: Sequence[float | None] | None = None, title: str = "",
                       max_cols: int = 8) -> go.Figure:
    """One subplot per layer that computed a selection: a thumbnail with the layer's mask (one trace each).

    The mask trace is uint8 (1 selected, 0 not) with a colourscale whose low end is transparent: the same
    picture as NaN masks at a quarter of the bytes (24 panels of 72x72 are ~125 KB).
    """
    n = len(masks)
    if n == 0:
        fig = go.Figure()
        fig.update_layout(height=160, xaxis=dict(visible=False), yaxis=dict(visible=False),
                          margin=dict(l=4, r=4, t=36, b=4), title=dict(text=title, font=dict(size=13)))
        add_note(fig, "no layer selected HR tokens in this mode")
        return fig
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    titles = []
    for i, (layer, mask) in enumerate(masks):
        label = f"L{layer} · {int(np.asarray(mask).sum())}"
        if recalls is not None and recalls[i] is not None:
            label += f" · {recalls[i]:.0%}"
        titles.append(label)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.012,
                        vertical_spacing=0.06 if rows > 1 else 0.0)
    xr, yr = square_ranges(thumb)
    shapes = []
    for i, (layer, mask) in enumerate(masks):
        r, c = divmod(i, cols)
        fig.add_trace(image_trace(thumb), row=r + 1, col=c + 1)
        G = mask.shape[0]
        fig.add_trace(go.Heatmap(
            z=np.asarray(mask, dtype=np.uint8), **grid_placement(thumb, G), zmin=0, zmax=1, zsmooth=False,
            colorscale=[[0.0, "rgba(0,0,0,0)"], [0.5, "rgba(0,0,0,0)"], [0.5, MASK_COLOUR], [1.0, MASK_COLOUR]],
            showscale=False, hoverinfo="skip", name=f"layer {layer}",
        ), row=r + 1, col=c + 1)
        suffix = "" if i == 0 else str(i + 1)
        shapes += box_shapes(thumb, boxes, xref=f"x{suffix}", yref=f"y{suffix}", width=1)
    fig.update_xaxes(range=xr, visible=False, constrain="domain")
    for i in range(n):
        suffix = "" if i == 0 else str(i + 1)
        fig.update_layout({f"yaxis{suffix}": dict(range=yr, visible=False, scaleanchor=f"x{suffix}",
                                                   constrain="domain")})
    for ann in fig.layout.annotations:
        ann.font = dict(size=10)
    fig.update_layout(
        title=dict(text=title, font=dict(size=13)), height=60 + rows * (220 if rows == 1 else 160), showlegend=False,
        margin=dict(l=4, r=4, t=52, b=4), plot_bgcolor=PAD_COLOUR, paper_bgcolor="rgba(0,0,0,0)",
        shapes=shapes,
    )
    return fig


# ---- (4) per-layer HR tokens attended and cost -------------------------------------------------------------
def layers_chart_figure(attended: Sequence[int], hr_tokens: int, layer_mflops: Sequence[float],
                        flops: Flops | None = None, selection_layer: int | None = None,
                        current_layer: int | None = None, title: str = "") -> go.Figure:
    """Left: HR tokens each layer attended (bars) against all HR tokens, and each layer's HR-attention MFLOPs.
    Right: the answer's FLOPs by part."""
    layers = list(range(len(attended)))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.72, 0.28], horizontal_spacing=0.14,
                        specs=[[{"secondary_y": True}, {}]],
                        subplot_titles=("HR tokens attended per layer", "FLOPs of this answer"))
    colours = ["#1f77b4"] * len(layers)
    if current_layer is not None and 0 <= current_layer < len(colours):
        colours[current_layer] = "#ff7f0e"
    fig.add_trace(go.Bar(x=layers, y=list(attended), name="HR tokens attended", marker_color=colours,
                         hovertemplate="layer %{x}: %{y} HR tokens<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Scatter(x=layers, y=[hr_tokens] * len(layers), mode="lines", name=f"all {hr_tokens} HR tokens",
                             line=dict(color="#888", dash="dash"), hoverinfo="skip"), row=1, col=1)
    fig.add_trace(go.Scatter(x=layers, y=list(layer_mflops), mode="lines+markers", name="HR attention MFLOPs",
                             line=dict(color="#d62728"), hovertemplate="layer %{x}: %{y:.3g} MFLOPs<extra></extra>"),
                  row=1, col=1, secondary_y=True)
    if selection_layer is not None:
        fig.add_vline(x=selection_layer, line=dict(color="#2ca02c", dash="dot"), row=1, col=1)
    if flops is not None:
        parts = ["vision", "projector", "llm", "hr_attention"] + (["avl_scoring"] if flops.avl_scoring else [])
        fig.add_trace(go.Bar(x=parts, y=[getattr(flops, k) / 1e9 for k in parts], name="GFLOPs",
                             marker_color="#9467bd",
                             hovertemplate="%{x}: %{y:.4g} GFLOPs<extra></extra>", showlegend=False), row=1, col=2)
        fig.update_yaxes(title_text="GFLOPs", row=1, col=2)
    fig.update_xaxes(title_text="layer", dtick=max(1, len(layers) // 16), row=1, col=1)
    fig.update_yaxes(title_text="HR tokens", rangemode="tozero", row=1, col=1, secondary_y=False)
    fig.update_yaxes(title_text="MFLOPs", rangemode="tozero", row=1, col=1, secondary_y=True, showgrid=False)
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=330, margin=dict(l=50, r=20, t=60, b=40),
                      legend=dict(orientation="h", y=-0.25, x=0), bargap=0.15)
    return fig


# ---- (5) A-VL: each LR image token's state over the image -------------------------------------------------
def avl_state_figure(view: ImageView, states: np.ndarray, title: str = "", boxes: Sequence[Sequence[float]] = (),
                     refresh: bool = False, note: str | None = None) -> go.Figure:
    """The image with ONE heatmap trace of the LR tokens' A-VL states (g x g int8: 0 evicted, 1 secondary, 2 core),
    placed through the centred padding like the LR attention map, and a legend-like line of counts under it."""
    z = np.asarray(states, dtype=np.int8)
    g = z.shape[0]
    counts = np.bincount(z.ravel().clip(0, 2), minlength=3)
    names = np.array(AVL_STATES, dtype=object)[z.clip(0, 2)]
    heat = go.Heatmap(
        z=z, **grid_placement(view, g), zmin=-0.5, zmax=2.5, zsmooth=False, colorscale=AVL_SCALE, showscale=False,
        name="A-VL state", text=names.tolist(), customdata=cell_labels(g),
        hovertemplate="LR cell (%{customdata})<br>%{text}<extra></extra>",
    )
    legend = " · ".join(f'<span style="color:{AVL_SWATCH[k]}">■</span> {AVL_STATES[k]} {counts[k]}'
                        for k in range(3))
    if refresh:
        legend += f" · <b>refresh</b>: all {counts[1] + counts[2]} cached attended"
    xaxis, yaxis = image_axes(view)
    fig = go.Figure(data=[image_trace(view), heat])
    fig.update_layout(
        title=dict(text=title, font=dict(size=13)), xaxis=xaxis, yaxis=yaxis, height=IMAGE_HEIGHT,
        margin=dict(l=4, r=4, t=36, b=30), plot_bgcolor=PAD_COLOUR, paper_bgcolor="rgba(0,0,0,0)",
        shapes=[frame_shape(view), *box_shapes(view, boxes)], dragmode="pan", showlegend=False,
    )
    fig.add_annotation(text=legend, xref="paper", yref="paper", x=0.5, y=0, yanchor="top", yshift=-4,
                       showarrow=False, font=dict(size=12))
    if note:
        add_note(fig, note)
    return fig


def byte_unit(largest: float) -> tuple[str, float]:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
        if largest >= size:
            return unit, size
    return "KiB", 1024


# ---- (6) A-VL: KV memory per layer, visual tokens attended per decoding step --------------------------------
def avl_chart_figure(held_per_layer: Sequence[int], full_per_layer: Sequence[float],
                     visual_per_step: Sequence[float], lr_tokens: int, refresh_every: int,
                     current_step: int | None = None, current_layer: int | None = None,
                     title: str = "") -> go.Figure:
    """Left: KV-cache bytes per layer at the end of generation, without A-VL (every token seen) and with it (held).
    Right: visual tokens attended per decoding step (mean over layers), refresh steps apart, against all LR tokens.
    Decoding step k (1-based) is the pass that produced answer token k; step k is a refresh step when
    k % refresh_every == 0, the rule the cache itself follows."""
    layers = list(range(len(held_per_layer)))
    unit, size = byte_unit(max([*full_per_layer, *held_per_layer, 1]))
    fig = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.12,
                        subplot_titles=(f"KV cache per layer ({unit})", "Visual tokens attended per step"))
    fig.add_trace(go.Bar(x=layers, y=[b / size for b in full_per_layer], name="without A-VL (every token kept)",
                         marker_color=FULL_CACHE_COLOUR,
                         hovertemplate=f"layer %{{x}}: %{{y:.4g}} {unit} without A-VL<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=layers, y=[b / size for b in held_per_layer], name="with A-VL (held)",
                         marker_color=AVL_SWATCH[1],
                         hovertemplate=f"layer %{{x}}: %{{y:.4g}} {unit} held with A-VL<extra></extra>"), row=1, col=1)
    steps = list(range(1, len(visual_per_step) + 1))
    refresh = [k % max(refresh_every, 1) == 0 for k in steps]
    for is_refresh, name, colour in ((False, "ordinary step (core only)", AVL_SWATCH[2]),
                                     (True, "refresh step (every cached token)", REFRESH_COLOUR)):
        xs = [k for k, r in zip(steps, refresh) if r == is_refresh]
        ys = [v for v, r in zip(visual_per_step, refresh) if r == is_refresh]
        fig.add_trace(go.Bar(x=xs, y=ys, name=name, marker_color=colour, offsetgroup="steps",  # one slot per step
                             hovertemplate="step %{x}: %{y:.1f} visual tokens<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Scatter(x=[0.5, max(len(steps), 1) + 0.5], y=[lr_tokens, lr_tokens], mode="lines",
                             name=f"all {lr_tokens} LR image tokens (no A-VL)", line=dict(color="#888", dash="dash"),
                             hoverinfo="skip"), row=1, col=2)
    if current_layer is not None and 0 <= current_layer < len(layers):
        fig.add_vline(x=current_layer, line=dict(color="#ff7f0e", dash="dot"), row=1, col=1)
    if current_step is not None and 1 <= current_step <= len(steps):
        fig.add_vline(x=current_step, line=dict(color="#ff7f0e", dash="dot"), row=1, col=2)
    fig.update_xaxes(title_text="layer", dtick=max(1, math.ceil(len(layers) / 12)), row=1, col=1)
    fig.update_xaxes(title_text="decoding step (= answer token)", dtick=max(1, math.ceil(len(steps) / 10)),
                     row=1, col=2)
    fig.update_yaxes(title_text=unit, rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="visual tokens", rangemode="tozero", row=1, col=2)
    fig.update_layout(title=dict(text=title, font=dict(size=13)), height=IMAGE_HEIGHT, barmode="group",
                      margin=dict(l=50, r=20, t=60, b=40), legend=dict(orientation="h", y=-0.22, x=0), bargap=0.15)
    return fig


# ---- Compare tab -------------------------------------------------------------------------------------------
def compare_figure(rows: Sequence[dict]) -> go.Figure:
    """TFLOPs, latency and KV-cache bytes of each run, side by side (A-VL runs in their own colour)."""
    labels = [r["mode"] + (" +A-VL" if r.get("avl") else "") for r in rows]

    def colour(base: str) -> list[str]:
        return [AVL_SWATCH[1] if r.get("avl") else base for r in rows]

    unit, size = byte_unit(max([r.get("kv_bytes", 0) for r in rows] + [1]))
    fig = make_subplots(rows=1, cols=3, subplot_titles=("TFLOPs", "latency (s)", f"KV cache ({unit})"),
                        horizontal_spacing=0.08)
    fig.add_trace(go.Bar(x=labels, y=[r["tflops"] for r in rows], marker_color=colour("#9467bd"), showlegend=False,
                         hovertemplate="%{x}: %{y:.4g} TFLOPs<extra></extra>"), row=1, col=1)
    fig.add_trace(go.Bar(x=labels, y=[r["latency_s"] for r in rows], marker_color=colour("#1f77b4"), showlegend=False,
                         hovertemplate="%{x}: %{y:.3f} s<extra></extra>"), row=1, col=2)
    fig.add_trace(go.Bar(x=labels, y=[r.get("kv_bytes", 0) / size for r in rows],
                         marker_color=colour(FULL_CACHE_COLOUR), showlegend=False, hovertemplate=f"%{{x}}: %{{y:.4g}} {unit}<extra></extra>"), row=1, col=3)
    fig.update_layout(height=300, margin=dict(l=40, r=20, t=40, b=30))
    return fig


def warm_up() -> None:
    """Build each kind of figure once, so the first visitor does not pay plotly's one-off set-up (~0.5 s)."""
    view = image_view(Image.new("RGB", (32, 16), (128, 128, 128)))
    grid = np.zeros((4, 4), dtype=np.float32)
    mask = np.eye(4, dtype=bool)
    attention_figure(view, grid, boxes=[(0, 0, 8, 8)]).to_json()
    mask_figure(view, mask, boxes=[(0, 0, 8, 8)]).to_json()
    layers_grid_figure(view, [(1, mask), (2, mask)], [(0, 0, 8, 8)], [0.5, None]).to_json()
    layers_chart_figure([0, 1, 2], 16, [0.0, 1.0, 2.0], Flops(vision=1, llm=2), 1).to_json()
    compare_figure([{"mode": "flex", "tflops": 1.0, "latency_s": 1.0, "kv_bytes": 2048, "avl": True}]).to_json()
    avl_state_figure(view, np.eye(4, dtype=np.int8) * 2, refresh=True).to_json()
    avl_chart_figure([1, 2], [2, 2], [1.0, 3.0, 1.0], 4, 2, 1, 0).to_json()
