"""The Gradio app: event functions called directly, the launched app driven by gradio_client, a load test
(slow) and a real browser (browser). CPU only; a tiny random checkpoint stands in for the model (its answers are
gibberish, which is fine for wiring), except that the load test uses the embedded model once it exists."""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import types
import zlib
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from app import events as events_module
from app import figures, runtime, ui
from app.events import Events, new_session
from app.examples import load_examples
from app.geometry import Frame, selection_recall
from flexattn import EMBEDDED_MODEL, FlexVLM
from flexattn.avl import AVLSettings
from flexattn.cost import Flops
from flexattn.synthetic import make_sample
from flexattn.trace_file import load_trace, save_trace
from tests.conftest import make_vlm, random_image, write_transformers_checkpoint

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
NUM_LAYERS, SELECTION_LAYER, LR_GRID, HR_GRID = 4, 1, 6, 18
QUESTION = "what letter is on the red circle ?"


# ---- fixtures ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    vlm = make_vlm(seed=0, num_layers=NUM_LAYERS, selection_layer=SELECTION_LAYER, lowres_size=84, threshold=100)
    return write_transformers_checkpoint(vlm, path)


@pytest.fixture(scope="session")
def app_vlm(tiny_checkpoint) -> FlexVLM:
    vlm = FlexVLM.load(tiny_checkpoint)
    runtime.set_model(vlm)
    return vlm


def _write_examples(root: Path) -> Path:
    """Synthetic examples in the assets/examples format: a square one and a wide (padded) one."""
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for seed, family in [(3, "attribute"), (4, "spatial")]:
        s = make_sample(seed, family)
        name = f"{family}_{seed}.png"
        s.image.save(root / name)
        entries.append({"image": name, "question": s.question, "answer": s.answer, "family": family,
                        "target_boxes": [list(b) for b in s.target_boxes]})
    s = make_sample(5, "attribute")
    wide = Image.new("RGB", (2 * s.image.width, s.image.height), (20, 90, 40))
    wide.paste(s.image, (s.image.width, 0))
    wide.save(root / "wide.png")
    entries.append({"image": "wide.png", "question": s.question, "answer": s.answer, "family": "attribute",
                    "target_boxes": [[b[0] + s.image.width, b[1], b[2] + s.image.width, b[3]] for b in s.target_boxes]})
    s = make_sample(6, "multi")  # one target per answer token
    s.image.save(root / "multi_6.png")
    entries.append({"image": "multi_6.png", "question": s.question, "answer": s.answer, "family": "multi",
                    "target_boxes": [list(b) for b in s.target_boxes],
                    "token_boxes": [[list(b) for b in boxes] for boxes in s.token_boxes]})
    (root / "examples.json").write_text(json.dumps(entries))
    return root


@pytest.fixture(scope="session")
def examples_dir(tmp_path_factory) -> Path:
    return _write_examples(tmp_path_factory.mktemp("examples"))


@pytest.fixture(scope="session")
def examples(examples_dir):
    return load_examples(examples_dir)


@pytest.fixture
def events(app_vlm, examples) -> Events:
    return Events(examples)


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Good and bad inputs, as files (the app receives uploads as paths in Gradio's cache)."""
    d = tmp_path_factory.mktemp("images")
    out = {}

    def save(name, image, **kw):
        out[name.split(".")[0]] = d / name
        image.save(d / name, **kw)

    base = random_image(300, 200, seed=1)
    save("rgb.png", base)
    save("rgba.png", base.convert("RGBA"))
    save("grayscale.png", base.convert("L"))
    save("palette.png", base.convert("P"))
    save("cmyk.jpg", base.convert("CMYK"))
    sixteen = Image.fromarray((np.random.default_rng(0).integers(0, 65535, (120, 160))).astype(np.uint16))
    save("sixteen.png", sixteen)
    exif = Image.Exif()
    exif[274] = 6  # rotate 90 degrees clockwise to show upright
    save("exif.jpg", random_image(160, 90, seed=2), exif=exif)
    save("tiny.png", random_image(4, 4))
    frames = [random_image(120, 80, seed=k) for k in range(3)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    out["animated"] = d / "animated.gif"
    save("large.png", random_image(1400, 700, seed=3))  # larger than the model's HR size (252 px)
    (d / "text.png").write_text("this is not an image")
    out["text"] = d / "text.png"
    buf = io.BytesIO()
    base.save(buf, format="PNG")
    (d / "corrupt.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    out["corrupt"] = d / "corrupt.png"
    (d / "huge.png").write_bytes(_png_header_claiming(20000, 20000))  # 400 MP: refused before decoding
    out["huge"] = d / "huge.png"
    return out


def _png_header_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels (a decompression bomb, without the memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ask(events: Events, path, question=QUESTION, state=None, **options):
    """start_turn + answer_turn as the page chains them; returns (chat, state, stats markdown, chunks seen)."""
    chat, state = events.start_turn(str(path), question, state or new_session())
    seen = 0
    for chat, state, md in events.answer_turn(state, **{"max_new_tokens": 6, **options}):
        seen += 1
    return chat, state, md, seen


def example_path(examples, name: str) -> str:
    return next(e.image for e in examples if Path(e.image).name == name)


def example(examples, name: str):
    return next(e for e in examples if Path(e.image).name == name)


# ---- geometry ------------------------------------------------------------------------------------------------
def test_frame_maps_grid_cells_through_the_centred_padding():
    wide = Frame(200, 100)  # padded to 200 x 200, 50 px above and below
    assert wide.side == 200 and wide.offset == (0, 50)
    assert wide.cell(4) == 50 and wide.first_centre(4) == (25, -25)  # row 0 lies in the top padding
    tall = Frame(100, 300)
    assert tall.offset == (100, 0)


def test_selection_recall():
    frame = Frame(200, 200)
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = True
    assert selection_recall(mask, frame, [(0, 0, 100, 100)]) == pytest.approx(0.25)
    assert selection_recall(mask, frame, [(0, 0, 10, 10)]) == 1.0  # a box touching one cell counts that cell
    wide = Frame(200, 100)  # padded to 200 x 200, 50 px above: image row 0-49 is grid row 1
    mask[:] = False
    mask[1, 0] = True
    assert selection_recall(mask, wide, [(0, 0, 50, 50)]) == 1.0
    assert selection_recall(mask, wide, [(0, 0, 100, 50)]) == pytest.approx(0.5)
    assert selection_recall(mask, frame, []) is None
    assert selection_recall(None, frame, [(0, 0, 100, 100)]) is None


# ---- figures -------------------------------------------------------------------------------------------------
def test_figures_have_one_trace_per_view_and_the_grid_sizes():
    view = figures.image_view(random_image(1600, 900))
    assert max(view.width, view.height) <= figures.MAX_DISPLAY_SIDE and view.src.startswith("data:image/jpeg;base64,")
    g, G = 24, 72
    mask = np.zeros((G, G), dtype=bool)
    mask[10:20, 30:50] = True
    fig = figures.mask_figure(view, mask, "t", boxes=[(0, 0, 10, 10)])
    assert [t.type for t in fig.data] == ["image", "heatmap"]
    z = np.asarray(fig.data[1].z, dtype=float)
    assert z.shape == (G, G)
    assert np.isnan(z[~mask]).all() and (z[mask] == 1).all()
    assert len(fig.layout.shapes) == 2  # the image outline + one ground-truth box, not one shape per cell
    # the grid covers the padded square: cell size is side / G in display px, offset by the top padding
    assert fig.data[1].dx == pytest.approx(1600 / G * view.sx)
    assert fig.data[1].y0 == pytest.approx((1600 / G / 2 - 350) * view.sy)
    att = figures.attention_figure(view, np.random.rand(g, g).astype(np.float32), "t")
    assert [t.type for t in att.data] == ["image", "heatmap"] and np.asarray(att.data[1].z).shape == (g, g)
    masks = [(layer, mask) for layer in range(8, 32)]
    grid = figures.layers_grid_figure(figures.image_view(random_image(200, 100), 128), masks, recalls=[0.5] * 24)
    assert len(grid.data) == 2 * 24 and sum(t.type == "heatmap" for t in grid.data) == 24
    assert all(np.asarray(t.z).shape == (G, G) for t in grid.data if t.type == "heatmap")
    assert len(grid.to_json()) < 600_000  # 24 layers of 72x72 stay light
    chart = figures.layers_chart_figure([0] * 9 + [100] * 23, G * G, [0.0] * 32, Flops(vision=1, llm=2), 8)
    assert [t.type for t in chart.data] == ["bar", "scatter", "scatter", "bar"]


# ---- asking and inspecting -----------------------------------------------------------------------------------
def test_ask_streams_an_answer_and_draws_every_figure(events, examples):
    ex = example(examples, "attribute_3.png")
    chat, state, md, chunks = ask(events, ex.image, ex.question)
    assert chunks >= 2  # streamed: at least one partial and the final
    assert [m["role"] for m in chat] == ["user", "assistant"] and chat[1]["content"]
    assert "flex" in md and "TFLOPs" in md
    lat = state["answer"].stats.latency_s
    assert f"total {lat.total:.2f} s = vision {lat.vision:.2f} s + generation {lat.generation:.2f} s" in md
    rec = state["answer"]
    assert rec.trace.hr_grid == HR_GRID and len(rec.labels) == len(rec.trace.passes)
    lr, mask, grid, chart, info, tokens = events.render_token(state, 0, SELECTION_LAYER + 1)
    assert np.asarray(lr.data[1].z).shape == (LR_GRID, LR_GRID)
    z = np.asarray(mask.data[1].z, dtype=float)
    selected = rec.trace.passes[0][SELECTION_LAYER + 1].selected
    assert z.shape == (HR_GRID, HR_GRID) and np.isnan(z[~selected]).all() and (z[selected] == 1).all()
    assert sum(t.type == "heatmap" for t in grid.data) == NUM_LAYERS - SELECTION_LAYER  # layers 1..3 select
    assert list(chart.data[0].y) == rec.trace.hr_attended_per_layer(0)
    assert "selection recall" in info and "<mark>" in tokens
    assert len(mask.layout.shapes) == 2  # image outline + the ground-truth box


def test_layers_before_the_selection_layer_and_lowres_mode_say_so(events, images):
    chat, state, md, _ = ask(events, images["rgb"])
    _, mask, _ = events.render_layer(state, 0, 0)
    assert len(mask.data) == 1 and "do not select" in mask.layout.annotations[0].text
    chat, state, md, _ = ask(events, images["rgb"], mode="lowres")
    lr, mask, grid, chart, info, _ = events.render_token(state, 0, 2)
    assert "lowres" in mask.layout.annotations[0].text and len(grid.data) == 0
    assert set(chart.data[0].y) == {0}


def test_sliders_redraw_from_the_cached_trace_without_running_the_model(events, app_vlm, images, monkeypatch):
    _, state, _, _ = ask(events, images["rgb"])
    calls = {"n": 0}

    def counting(name):
        original = getattr(app_vlm, name)

        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in ("answer", "stream", "prepare", "_generate"):
        monkeypatch.setattr(app_vlm, name, counting(name))
    monkeypatch.setattr(app_vlm.model, "forward", counting_forward(app_vlm.model.forward, calls))
    n_tokens = events.token_count(state)
    for token in range(n_tokens):
        events.render_token(state, token, 2)
        for layer in range(NUM_LAYERS):
            lr, mask, info = events.render_layer(state, token, layer)
            assert lr is not None and mask is not None
    assert calls["n"] == 0


def counting_forward(original, calls):
    def forward(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)
    return forward


def test_token_picker_follows_the_answer_tokens(events, images):
    _, state, _, _ = ask(events, images["rgb"], max_new_tokens=5)
    n = events.token_count(state)
    assert n >= 5
    first = events.render_token(state, 0, 2)
    last = events.render_token(state, n - 1, 2)
    assert f"Token {n - 1}" in last[4] and "Token 0" in first[4]
    assert events.render_token(state, 999, 999)[4].startswith(f"Token {n - 1}")  # clamped, not an error


def test_follow_up_keeps_the_conversation_and_reuses_hr_features(events, app_vlm, images, monkeypatch):
    chat, state, _, _ = ask(events, images["rgb"])
    encodes = {"n": 0}
    original = app_vlm.model.encode_pixels

    def counting(*args, **kwargs):
        encodes["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(app_vlm.model, "encode_pixels", counting)
    seen_history = {}
    real_stream = runtime.stream_answer

    def spy(image, question, options):
        seen_history["history"] = options["history"]
        yield from real_stream(image, question, options)

    monkeypatch.setattr(runtime, "stream_answer", spy)
    chat2, state2, _, _ = ask(events, images["rgb"], "what colour is it ?", state)
    assert [m["role"] for m in chat2] == ["user", "assistant", "user", "assistant"]
    assert seen_history["history"] == [(QUESTION, chat[1]["content"])]
    assert encodes["n"] == 0  # same image: LR/HR features come from the cache
    assert state2["answer"].stats.prefix_tokens_reused > 0  # and the prompt's keys/values up to the new turn
    # a new image starts a new conversation
    chat3, state3, _, _ = ask(events, images["large"], "what is this ?", state2)
    assert [m["role"] for m in chat3] == ["user", "assistant"] and state3["history"][0][0] == "what is this ?"
    assert events.image_changed(str(images["rgb"]), state3)["history"] == []
    assert events.image_changed(None, state3)["image_key"] is None


@pytest.mark.parametrize("name,message", [
    ("text", "not an image"),
    ("corrupt", "corrupt"),
    ("huge", "too large"),
    ("tiny", "too small"),
])
def test_bad_images_give_clear_errors(events, images, name, message):
    with pytest.raises(gr.Error, match=message):
        events.image_changed(str(images[name]), new_session())
    state = new_session()
    assert events.image_changed(str(images[name]), state) is state  # the browser's repeat: not reported twice
    with pytest.raises(gr.Error, match=message):
        events.start_turn(str(images[name]), QUESTION, new_session())


def test_no_image_and_bad_questions_give_clear_errors(events, images):
    with pytest.raises(gr.Error, match="Upload an image"):
        events.start_turn(None, QUESTION, new_session())
    with pytest.raises(gr.Error, match="empty"):
        events.start_turn(str(images["rgb"]), "   ", new_session())
    with pytest.raises(gr.Error, match="too long"):
        events.start_turn(str(images["rgb"]), "why " * 1000, new_session())
    with pytest.raises(gr.Error, match="Ask a question"):
        list(events.answer_turn(new_session()))


def test_a_turn_survives_a_concurrent_image_change_event(events, images):
    """Upload then ask at once: if image_changed's fresh state lands after start_turn's, the turn still runs."""
    _, started = events.start_turn(str(images["rgb"]), QUESTION, new_session())
    overwritten = events.image_changed(str(images["rgb"]), new_session())
    assert overwritten["pending"] is None
    *_, (chat, state, _) = events.answer_turn(overwritten, max_new_tokens=2, image=str(images["rgb"]),
                                              question=QUESTION)
    assert [m["role"] for m in chat] == ["user", "assistant"] and chat[0]["content"] == QUESTION


def test_bad_options_give_clear_errors(events, images):
    _, state = events.start_turn(str(images["rgb"]), QUESTION, new_session())
    with pytest.raises(gr.Error, match="selection_layer"):
        list(events.answer_turn(state, selection_layer=NUM_LAYERS + 3))
    _, state = events.start_turn(str(images["rgb"]), QUESTION, state)
    with pytest.raises(gr.Error, match="unknown mode"):
        list(events.answer_turn(state, mode="fast"))


@pytest.mark.parametrize("name,notice", [
    ("rgba", "Transparent"),
    ("grayscale", None),
    ("palette", None),
    ("cmyk", "CMYK"),
    ("sixteen", "16-bit"),
    ("exif", "EXIF"),
    ("large", "larger than the model's HR size"),
    ("animated", "only the first one is used"),
])
def test_image_variants_are_answered_with_notices(events, images, name, notice, monkeypatch):
    infos = []
    monkeypatch.setattr(events_module.gr, "Info", lambda message, *a, **k: infos.append(message))
    chat, state, _, _ = ask(events, images[name], max_new_tokens=2)
    assert chat[-1]["role"] == "assistant"
    if notice:
        assert any(notice in m for m in infos), infos
    if name == "exif":  # shown upright: 160x90 stored, rotated to 90x160
        assert state["view"].frame == Frame(90, 160)
    assert events.render_token(state, 0, 2)[1] is not None


def test_generation_failure_is_reported_and_the_app_keeps_serving(events, images, monkeypatch):
    def broken(image, question, options):
        yield "par"
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(runtime, "stream_answer", broken)
    _, state = events.start_turn(str(images["rgb"]), QUESTION, new_session())
    with pytest.raises(gr.Error, match="Generation failed"):
        list(events.answer_turn(state, max_new_tokens=4))
    assert state["pending"] is None and state["history"] == []
    monkeypatch.undo()
    chat, state, _, _ = ask(events, images["rgb"], state=state)
    assert chat[-1]["role"] == "assistant"


def test_compare_runs_all_three_modes(events, images):
    tables = list(events.compare(str(images["rgb"]), QUESTION, None, None, 4))
    table, fig, *_ = tables[-1]
    assert len(tables) == 3  # one update per run, no A-VL runs unless asked for
    assert [row[0] for row in table] == ["lowres", "flex", "select_all"] and {row[1] for row in table} == {"off"}
    assert table[0][3].startswith("0 /") and table[2][3] == f"{HR_GRID ** 2} / {HR_GRID ** 2}"
    assert table[0][4] < table[2][4]  # select_all costs more than lowres
    assert all(row[6] > 0 and row[7] == 1.0 for row in table)  # KV KiB; without A-VL every image token is attended
    assert [t.type for t in fig.data] == ["bar", "bar", "bar"]
    with pytest.raises(gr.Error, match="empty"):
        list(events.compare(str(images["rgb"]), "", None, None, 4))


def test_untrained_hr_projections_are_flagged(events, images, monkeypatch):
    monkeypatch.setattr(events, "record", lambda result, q, state: dataclasses.replace(
        Events.record(events, result, q, state), answer=dataclasses.replace(
            result, stats=dataclasses.replace(result.stats, untrained_hr_projections=True))))
    _, _, md, _ = ask(events, images["rgb"])
    assert "untrained HR projections" in md


# ---- A-VL ----------------------------------------------------------------------------------------------------
AVL_ON = dict(avl=True, vision_evict_rate=0.5, compute_skip_rate=0.7, refresh_every=3, text_evict_rate=0.4,
              selection_scores="secondary")


def test_avl_figures_have_one_state_trace_and_the_grid_sizes():
    view = figures.image_view(random_image(1600, 900))  # wide: padded above and below
    g = 24
    states = np.zeros((g, g), dtype=np.int8)
    states[:, 8:16] = 1
    states[5:9, 10:12] = 2
    fig = figures.avl_state_figure(view, states, "t", boxes=[(0, 0, 10, 10)], refresh=True)
    assert [t.type for t in fig.data] == ["image", "heatmap"]
    heat = fig.data[1]
    assert np.array_equal(np.asarray(heat.z), states)
    att = figures.attention_figure(view, np.random.rand(g, g).astype(np.float32))
    assert (heat.x0, heat.dx, heat.y0, heat.dy) == pytest.approx((att.data[1].x0, att.data[1].dx, att.data[1].y0,
                                                                   att.data[1].dy))  # the same cells as the LR map
    # a discrete 3-colour scale: 0, 1 and 2 each fall in the middle of one band
    assert (heat.zmin, heat.zmax) == (-0.5, 2.5) and len({c for _, c in heat.colorscale}) == 3
    assert not heat.showscale and len(fig.layout.shapes) == 2
    legend = fig.layout.annotations[0].text
    assert "evicted 384" in legend and "secondary 184" in legend and "core 8" in legend and "refresh" in legend
    chart = figures.avl_chart_figure([100, 60, 50], [200, 200, 200], [6, 6, 18, 6], 36, 3, current_step=2,
                                     current_layer=1)
    assert [t.type for t in chart.data] == ["bar", "bar", "bar", "bar", "scatter"]
    full, held, ordinary, refresh, line = chart.data
    assert list(held.y) == pytest.approx([100 / 1024, 60 / 1024, 50 / 1024])
    assert "KiB" in chart.layout.annotations[0].text
    assert list(full.y) == pytest.approx([200 / 1024] * 3)
    assert list(ordinary.x) == [1, 2, 4] and list(refresh.x) == [3] and list(line.y) == [36, 36]


def test_avl_switch_changes_the_call(events, images, monkeypatch):
    seen = []
    real_stream = runtime.stream_answer

    def spy(image, question, options):
        seen.append(options["avl"])
        yield from real_stream(image, question, options)

    monkeypatch.setattr(runtime, "stream_answer", spy)
    _, off, md_off, _ = ask(events, images["rgb"])
    _, on, md_on, _ = ask(events, images["rgb"], **AVL_ON)
    assert seen == [None, AVLSettings(**{k: v for k, v in AVL_ON.items() if k != "avl"})]
    s_off, s_on = off["answer"].stats, on["answer"].stats
    assert s_off.avl is None and s_on.avl is not None
    assert s_on.kv_bytes < s_off.kv_bytes == s_on.avl.kv_bytes_full_cache
    assert "A-VL off" in md_off and "A-VL: KV cache" in md_on
    with pytest.raises(gr.Error, match="vision_evict_rate"):
        ask(events, images["rgb"], **{**AVL_ON, "vision_evict_rate": 1.5})


def test_avl_panel_redraws_from_the_cached_trace(events, app_vlm, images, monkeypatch):
    _, state, _, _ = ask(events, images["rgb"], max_new_tokens=5, **AVL_ON)
    rec = state["answer"]
    stats, trace = rec.stats, rec.trace
    monkeypatch.setattr(app_vlm.model, "forward", lambda *a, **k: pytest.fail("the model ran"))
    for token in range(events.token_count(state)):
        for layer in range(NUM_LAYERS):
            fig, chart, text = events.render_avl(state, token, layer)
            z = np.asarray(fig.data[1].z)
            assert z.shape == (LR_GRID, LR_GRID) and np.array_equal(z, trace.passes[token][layer].avl_state)
            if token == 0:  # prefill: every image token present; eviction happens after it
                assert (z == 2).all() and "prefill" in text
            else:
                counts = np.bincount(z.ravel(), minlength=3)
                assert counts[0] == LR_GRID ** 2 // 2 and counts[1] > 0 and counts[2] > 0
                refresh = token % 3 == 0
                assert trace.passes[token][layer].avl_refresh == refresh
                assert ("refresh step" in text) == refresh and ("refresh" in fig.layout.annotations[0].text) == refresh
    full, held = chart.data[0], chart.data[1]
    assert list(held.y) == pytest.approx([b / 1024 for b in stats.kv_bytes_per_layer])
    assert sum(full.y) == pytest.approx(stats.avl.kv_bytes_full_cache / 1024)
    assert all(h < f for h, f in zip(held.y, full.y))
    steps = stats.avl.visual_attended_per_step
    assert sorted([*chart.data[2].x, *chart.data[3].x]) == list(range(1, len(steps) + 1))
    assert list(chart.data[3].x) == [k for k in range(1, len(steps) + 1) if k % 3 == 0]


def test_avl_panel_without_avl_is_empty_and_never_fails(events, images):
    assert events.render_avl(new_session(), 0, 0) == (None, None, "")
    assert events.render_avl(None, 3, 3) == (None, None, "")
    _, state, _, _ = ask(events, images["rgb"], max_new_tokens=2)
    fig, chart, text = events.render_avl(state, 999, 999)
    assert fig is None and chart is None and "A-VL was off" in text
    _, state, _, _ = ask(events, images["rgb"], max_new_tokens=2, mode="lowres", **AVL_ON)  # A-VL on any mode
    fig, chart, text = events.render_avl(state, 1, 2)
    assert np.asarray(fig.data[1].z).shape == (LR_GRID, LR_GRID) and len(chart.data) == 5


def test_compare_with_avl_runs_each_mode_twice_and_no_more(events, images):
    tables = list(events.compare(str(images["rgb"]), QUESTION, None, None, 4, True))
    table, fig, pictures, *_ = tables[-1]
    assert len(tables) == 6 and len(table) == 6
    assert [(row[0], row[1]) for row in table] == [(m, a) for m in ("lowres", "flex", "select_all")
                                                   for a in ("off", "on")]
    for off, on in zip(table[::2], table[1::2]):
        assert on[6] < off[6]  # KV KiB
        assert off[7] == 1.0 and on[7] < 1.0  # visual attention ratio
    assert [t.type for t in fig.data] == ["bar"] * 3 and list(fig.data[2].x)[1] == "lowres +A-VL"
    assert sum(t.type == "image" for t in pictures.data) == 2 * 6  # a column per run, A-VL runs included


# ---- ground truth, the walk, compare pictures, trace files ----------------------------------------------------
def test_ground_truth_only_for_the_examples_own_question(events, examples, tmp_path):
    ex = example(examples, "attribute_3.png")
    copy = tmp_path / "copy.png"  # an uploaded copy of the example image: recognised by content
    shutil.copy(ex.image, copy)
    _, state, _, _ = ask(events, copy, QUESTION)  # another question about the same image
    assert QUESTION != ex.question and state["answer"].truth is None
    lr, mask, info = events.render_layer(state, 0, SELECTION_LAYER + 1)
    assert len(mask.layout.shapes) == 1 and "recall" not in info  # the image outline only: no box, no recall
    assert events.render_overview(state).data[-1].name == "selected"  # no recall panel
    _, state, _, _ = ask(events, copy, "  " + ex.question.upper() + "\x00 ")  # the same question, spelled loosely
    assert state["answer"].truth is not None
    lr, mask, info = events.render_layer(state, 0, SELECTION_LAYER + 1)
    assert len(mask.layout.shapes) == 2 and "selection recall" in info


def test_each_answer_token_gets_its_own_target(events, examples):
    ex = example(examples, "multi_6.png")
    _, state, _, _ = ask(events, ex.image, ex.question, max_new_tokens=len(ex.token_boxes) + 1)
    rec = state["answer"]
    view = rec.view
    for token, boxes in enumerate([*ex.token_boxes, []]):  # the token after the last target has none
        _, mask, info = events.render_layer(state, token, SELECTION_LAYER + 1)
        drawn = [(s.x0 / view.sx, s.y0 / view.sy, s.x1 / view.sx, s.y1 / view.sy) for s in mask.layout.shapes[1:]]
        assert drawn == pytest.approx([tuple(b) for b in boxes])
        assert ("selection recall" in info) == bool(boxes) and ("no ground-truth target" in info) != bool(boxes)
        mask_at = rec.trace.passes[token][SELECTION_LAYER + 1].selected
        if boxes:
            assert f"{selection_recall(mask_at, view.frame, boxes):.0%} at this layer" in info


def test_overview_and_playback_show_every_token_and_layer(events, examples):
    ex = example(examples, "multi_6.png")
    _, state, _, _ = ask(events, ex.image, ex.question, max_new_tokens=4)
    rec = state["answer"]
    passes = rec.trace.passes
    selected, recall = events.render_overview(state).data
    counts = np.asarray(selected.z, dtype=float)
    assert counts.shape == (len(passes), NUM_LAYERS) and len(selected.y) == len(passes)
    assert np.isnan(counts[:, :SELECTION_LAYER]).all()  # layers before the selection layer select nothing
    expected = [[lt.selected_count for lt in layers[SELECTION_LAYER:]] for layers in passes]
    assert counts[:, SELECTION_LAYER:].tolist() == expected
    recalls = np.asarray(recall.z, dtype=float)
    for k, layers in enumerate(passes):
        for lt in layers[SELECTION_LAYER:]:
            want = selection_recall(lt.selected, rec.view.frame, rec.boxes(k))
            assert (np.isnan(recalls[k, lt.layer]) if want is None else recalls[k, lt.layer] == pytest.approx(want))
    layer = SELECTION_LAYER + 1
    fig = events.render_playback(state, layer)
    heat = [t for t in fig.data if t.type == "heatmap"]
    steps = fig.layout.sliders[0].steps
    assert len(heat) == len(steps) == len(passes) and [t.visible for t in heat] == [True] + [False] * (len(heat) - 1)
    for k, step in enumerate(steps):
        assert step.method == "update" and step.args[0]["visible"] == [True] + [i == k for i in range(len(heat))]
        assert np.array_equal(np.asarray(heat[k].z, dtype=bool), passes[k][layer].selected)
        assert len(step.args[1]["shapes"]) == 1 + len(rec.boxes(k))  # the outline and this token's own target
    assert "no selection" in events.render_playback(state, 0).layout.sliders[0].steps[0].args[1]["title.text"]
    _, lowres, _, _ = ask(events, ex.image, ex.question, max_new_tokens=2, mode="lowres")
    assert "lowres" in events.render_overview(lowres).layout.annotations[-1].text


def test_compare_pictures_redraw_from_the_traced_runs(events, app_vlm, images, monkeypatch):
    *_, (table, cost, pictures, token_slider, layer_slider, state) = events.compare(
        str(images["rgb"]), QUESTION, None, None, 3, state=new_session())
    runs = state["compare"].runs
    assert [label for label, _ in runs] == ["lowres", "flex", "select_all"] and all(a.trace for _, a in runs)
    monkeypatch.setattr(app_vlm.model, "forward", lambda *a, **k: pytest.fail("the model ran"))
    for token, layer in [(0, SELECTION_LAYER + 1), (2, NUM_LAYERS - 1), (99, 0)]:
        fig = events.render_compare(state, token, layer)
        heat = [t for t in fig.data if t.type == "heatmap"]
        if token == 99:  # past every answer: pictures without maps, and no error
            assert heat == [] and sum(t.type == "image" for t in fig.data) == 6
            continue
        flex = runs[1][1].trace.passes[token][layer]
        lr_maps = [np.asarray(t.z) for t in heat if len(t.z) == LR_GRID]
        assert len(lr_maps) == 3 and np.allclose(lr_maps[1], flex.lr_attention)
        masks = [t for t in heat if len(t.z) == HR_GRID]
        assert len(masks) == (2 if layer >= SELECTION_LAYER else 0)  # lowres never selects
        if masks:
            assert np.array_equal(~np.isnan(np.asarray(masks[0].z, dtype=float)), flex.selected)
            assert np.asarray(masks[1].z, dtype=float).size == HR_GRID ** 2 and not np.isnan(
                np.asarray(masks[1].z, dtype=float)).any()  # select_all: every HR token


def test_a_saved_trace_opens_with_the_same_views(events, examples, tmp_path):
    ex = example(examples, "multi_6.png")
    _, state, _, _ = ask(events, ex.image, ex.question, max_new_tokens=3, **AVL_ON)
    path = events.save_trace(state).value["path"]
    reopened = Events([]).open_trace(path, new_session())  # another app: no examples, nothing asked
    before, after = events.render_all(state, 2), events.render_all(reopened, 2)
    for a, b in zip(before[3:11], after[3:11]):  # overview, playback, LR, mask, layers, chart, layer text, tokens
        if hasattr(a, "to_json"):
            assert a.to_json() == b.to_json()  # the image included: the file's PNG has the upload's pixels
        else:
            assert a == b
    assert after[-1].visible and np.array_equal(after[11].data[1].z, before[11].data[1].z)  # the A-VL panel
    assert "trace file" in after[2] and ex.question in after[2]
    with pytest.raises(gr.Error, match="not a flexattn trace"):
        events.open_trace(ex.image, new_session())
    with pytest.raises(gr.Error, match="no traced answer"):
        events.save_trace(new_session())


def test_without_a_model_the_app_shows_traces_and_says_it_cannot_answer(events, examples, images, tmp_path):
    ex = example(examples, "multi_6.png")
    _, state, _, _ = ask(events, ex.image, ex.question, max_new_tokens=2)
    path = events.save_trace(state).value["path"]
    model = runtime.model()
    runtime.set_model(None)
    try:
        demo = ui.build_demo(opened=load_trace(path), opened_name="run.npz")
        assert isinstance(demo, gr.Blocks)
        viewer = Events([])
        opened = viewer.open_trace(path, new_session())
        assert viewer.render_all(opened, 2)[5] is not None  # the LR map, from the file alone
        with pytest.raises(gr.Error, match="No model is loaded"):
            viewer.start_turn(str(images["rgb"]), QUESTION, opened)
        with pytest.raises(gr.Error, match="No model is loaded"):
            list(viewer.compare(str(images["rgb"]), QUESTION))
        assert viewer.image_changed(str(images["rgb"]), new_session())["view"] is not None
    finally:
        runtime.set_model(model)


# ---- papercuts -----------------------------------------------------------------------------------------------
def test_settings_out_of_range_are_refused_by_name():
    threshold = ui.setting_slider("Selection threshold", 0, 255, value=48)
    with pytest.raises(gr.Error, match="Selection threshold must be between 0 and 255, got 999"):
        threshold.preprocess(999)
    assert threshold.preprocess(100) == 100
    assert ui.index_slider(0, 1).preprocess(7.0) == 7  # answer token / layer pickers: the views clamp


def test_control_characters_never_reach_the_chat(events, images):
    chat, state = events.start_turn(str(images["rgb"]), "what\x00 is\x1b[2J this\x07 ?", new_session())
    assert chat[-1]["content"] == "what is[2J this ?" == state["pending"]


def test_the_avl_panel_shows_only_for_an_avl_answer(events, images):
    _, off, _, _ = ask(events, images["rgb"], max_new_tokens=2)
    _, on, _, _ = ask(events, images["rgb"], max_new_tokens=2, **AVL_ON)
    assert not events.render_all(off, 2)[-1].visible and events.render_all(on, 2)[-1].visible
    assert not events.render_all(new_session(), 2)[-1].visible


# ---- examples, runtime, launcher ------------------------------------------------------------------------------
def test_examples_file_and_its_absence(examples, examples_dir, tmp_path):
    assert [Path(e.image).name for e in examples] == ["attribute_3.png", "spatial_4.png", "wide.png", "multi_6.png"]
    assert all(e.question and e.target_boxes for e in examples)
    assert [e.token_boxes is None for e in examples] == [True, True, True, False]
    assert load_examples(tmp_path / "missing") == []
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(examples_dir / "wide.png", bare / "wide.png")
    assert [(Path(e.image).name, e.question) for e in load_examples(bare)] == [("wide.png", "")]
    (bare / "examples.json").write_text("{not json")
    assert load_examples(bare) == []
    (bare / "examples.json").write_text(json.dumps([{"image": "../../etc/passwd"}, {"image": "wide.png"}]))
    assert [Path(e.image).name for e in load_examples(bare)] == ["wide.png"]


def test_env_var_chooses_the_examples_dir(examples_dir, monkeypatch):
    monkeypatch.setenv("FLEXATTN_EXAMPLES_DIR", str(examples_dir))
    assert len(load_examples()) == 4


def test_model_choice_and_gpu_wrapper(monkeypatch):
    monkeypatch.delenv(runtime.ENV_MODEL, raising=False)
    assert runtime.choose_model(None) is None
    monkeypatch.setenv(runtime.ENV_MODEL, "some/model")
    assert runtime.choose_model(None) == "some/model" and runtime.choose_model("other") == "other"

    def fn():
        return 1

    monkeypatch.setitem(sys.modules, "spaces", None)  # not importable: a no-op
    assert runtime.gpu(fn) is fn
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration: (lambda f: ("wrapped", duration, f))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    assert runtime.gpu(fn, duration=30) == ("wrapped", 30, fn)


def test_launcher_fails_fast_with_the_loaders_one_line_error(tmp_path, capsys):
    import app as app_package  # noqa: F401 - the package, not app.py
    import importlib.util

    spec = importlib.util.spec_from_file_location("app_launcher", REPO / "app.py")
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    assert launcher.parse_args([]).host in ("127.0.0.1", os.environ.get("GRADIO_SERVER_NAME"))
    assert launcher.main(["--model", str(tmp_path / "no-such-model")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot load model") and "no-such-model" in err[-1]
    (tmp_path / "notes.npz").write_text("not a trace")
    assert launcher.main(["--trace", str(tmp_path / "notes.npz")]) == 1  # before any model or server
    assert capsys.readouterr().err.strip() == "error: notes.npz is not a flexattn trace file (not an .npz archive)"


def test_upload_component_hands_the_cached_path_to_flexattn_untouched(images):
    from gradio.data_classes import ImageData

    component = ui.upload_image()
    assert component.get_block_name() == "image" and component.type == "filepath" and component.image_mode is None
    assert component.preprocess(ImageData(path=str(images["text"]))) == str(images["text"])
    assert component.preprocess(None) is None


@pytest.mark.skipif(not (EMBEDDED_MODEL / "config.json").is_file(), reason="embedded model not trained yet")
def test_default_model_builds_the_app():
    previous = runtime.model() if runtime._MODEL is not None else None
    try:
        vlm = runtime.load_model(runtime.choose_model(None) if not os.environ.get(runtime.ENV_MODEL) else None)
        demo = ui.build_demo()
        assert isinstance(demo, gr.Blocks) and not vlm.untrained_hr
    finally:
        if previous is not None:
            runtime.set_model(previous)


# ---- the launched app ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def launched(app_vlm, examples):
    """One server for the module's gradio_client and browser tests."""
    demo = ui.build_demo(Events(examples), examples)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                            **ui.launch_options())
    try:
        yield demo, url
    finally:
        demo.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _client(url):
    from gradio_client import Client

    return Client(url, verbose=False, download_files=False)


def _text(message) -> str:
    content = message["content"]
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content


def client_ask(client, path, question=QUESTION, max_new_tokens=6):
    from gradio_client import handle_file

    client.predict(handle_file(str(path)), question, api_name="/start_turn")
    chat, stats = client.predict("flex", 100, SELECTION_LAYER, max_new_tokens, False, 1.0, 1.0, 0,
                                 api_name="/answer_turn")
    return chat, stats


def test_end_to_end_with_gradio_client(launched, examples, images):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    demo, url = launched
    assert url.startswith("http://127.0.0.1:")
    client = _client(url)
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/start_turn", "/answer_turn", "/inspect", "/render_layer", "/render_token", "/render_avl",
            "/compare"} <= set(endpoints)
    wide = example(examples, "wide.png")
    chat, stats = client_ask(client, wide.image, wide.question)
    assert [m["role"] for m in chat] == ["user", "assistant"] and _text(chat[1])
    assert "HR tokens attended" in stats
    (slider, layer, source, overview, playback, lr, mask, grid, chart, info, tokens, avl_fig, kv_fig,
     avl_text) = client.predict(SELECTION_LAYER + 1, api_name="/inspect")  # (+ the A-VL panel's visibility)
    assert avl_fig is None and kv_fig is None and "A-VL was off" in avl_text  # the default: A-VL off
    assert wide.question in source and "ground truth" in source
    traces = [json.loads(fig["plot"])["data"] for fig in (lr, mask, grid, chart, overview, playback)]
    assert [t["type"] for t in traces[0]] == ["image", "heatmap"]
    assert [t["type"] for t in traces[1]] == ["image", "heatmap"]
    assert sum(t["type"] == "heatmap" for t in traces[2]) == NUM_LAYERS - SELECTION_LAYER
    assert "selection recall" in info  # the wide example is recognised by content: its target box is known
    assert [t["type"] for t in traces[4]] == ["heatmap", "heatmap"]  # HR tokens selected, and recall
    assert [t["type"] for t in traces[5]] == ["image"] + ["heatmap"] * len(traces[4][0]["y"])  # one per token
    lr2, mask2, info2 = client.predict(1, 3, api_name="/render_layer")
    assert "Token 1" in info2 and "layer 3" in info2
    # a gr.Error arrives as an exception, and the app keeps serving
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(images["text"])), QUESTION, api_name="/start_turn")
    with pytest.raises(AppError, match="too large"):  # a decompression bomb, refused before decoding
        client.predict(handle_file(str(images["huge"])), QUESTION, api_name="/start_turn")
    with pytest.raises(AppError, match="empty"):
        client.predict(handle_file(str(images["rgb"])), "", api_name="/start_turn")
    chat, _ = client_ask(client, images["rgb"], "what is this ?")
    assert _text(chat[-2]) == "what is this ?" and _text(chat[-1])
    table, fig, pictures, _, _ = client.predict(handle_file(str(images["rgb"])), QUESTION, 100, SELECTION_LAYER, 3,
                                                api_name="/compare")
    assert [row[0] for row in table["data"]] == ["lowres", "flex", "select_all"]
    assert sum(t["type"] == "image" for t in json.loads(pictures["plot"])["data"]) == 6
    avl_fig, kv_fig, avl_text = client.predict(1, 2, api_name="/render_avl")  # the last answer had A-VL off
    assert avl_fig is None and kv_fig is None and "A-VL was off" in avl_text


def test_rejected_inputs_are_one_log_line_without_a_traceback(launched, images, caplog, capfd):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    _, url = launched
    client = _client(url)
    caplog.set_level("INFO", logger="app")
    capfd.readouterr()
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(images["text"])), QUESTION, api_name="/start_turn")
    client.predict(handle_file(str(images["rgb"])), QUESTION, api_name="/start_turn")
    with pytest.raises(AppError, match="Selection threshold must be between 0 and 255, got 999"):
        client.predict("flex", 999, SELECTION_LAYER, 4, False, 1.0, 1.0, 0, api_name="/answer_turn")
    with pytest.raises(AppError, match="Max new tokens must be between 1 and 512, got 0"):
        client.predict("flex", 100, SELECTION_LAYER, 0, False, 1.0, 1.0, 0, api_name="/answer_turn")
    with pytest.raises(AppError, match="Mode must be one of flex, lowres, select_all, got 'fast'"):
        client.predict("fast", 100, SELECTION_LAYER, 4, False, 1.0, 1.0, 0, api_name="/answer_turn")
    lines = [r for r in caplog.records if r.name.startswith("app") and r.getMessage().startswith("rejected")]
    assert len(lines) == 4 and all(r.exc_info is None for r in lines)
    assert "Traceback" not in capfd.readouterr().err


def test_the_page_cannot_read_files_outside_gradios_cache(launched, images):
    import httpx

    _, url = launched
    outside = images["rgb"]  # a real image, but not uploaded through Gradio
    response = httpx.post(f"{url}gradio_api/call/start_turn",
                          json={"data": [{"path": str(outside), "meta": {"_type": "gradio.FileData"}}, QUESTION]})
    event_id = response.json()["event_id"]
    result = httpx.get(f"{url}gradio_api/call/start_turn/{event_id}", timeout=30).text
    assert "event: error" in result
    for probe in (f"{url}gradio_api/file={outside}", f"{url}gradio_api/file=/etc/hostname", f"{url}file=/etc/hostname"):
        assert httpx.get(probe, timeout=10).status_code in (403, 404)


# ---- load test -----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sixteen_concurrent_sessions(tmp_path, examples):
    """16 gradio_client sessions at once, each about a different image: all answered, answers equal to the same
    questions asked one at a time, and the app still serves afterwards. Loopback only, bounded in time."""
    embedded = (EMBEDDED_MODEL / "config.json").is_file()
    vlm = FlexVLM.load(EMBEDDED_MODEL) if embedded else None
    if vlm is None:
        path = write_transformers_checkpoint(
            make_vlm(seed=0, num_layers=NUM_LAYERS, selection_layer=SELECTION_LAYER, lowres_size=84, threshold=100),
            tmp_path / "tiny")
        vlm = FlexVLM.load(path)
    previous = runtime._MODEL
    runtime.set_model(vlm)
    sessions, max_new = 16, 8
    jobs = []
    for i in range(sessions):
        s = make_sample(100 + i, ("attribute", "spatial", "multi")[i % 3])
        p = tmp_path / f"load_{i}.png"
        s.image.save(p)
        jobs.append((p, s.question))
    settings = vlm.settings
    sequential = [vlm.answer(str(p), q, mode="flex", max_new_tokens=max_new, threshold=100,
                             selection_layer=settings.selection_layer, trace=False).text for p, q in jobs]
    demo = ui.build_demo(Events(), [])
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                            **ui.launch_options())
    try:
        def one(job):
            from gradio_client import handle_file

            p, q = job
            client = _client(url)
            start = time.perf_counter()
            client.predict(handle_file(str(p)), q, api_name="/start_turn")
            chat, _ = client.predict("flex", 100, settings.selection_layer, max_new, False, 1.0, 1.0, 0,
                                     api_name="/answer_turn")
            return _text(chat[-1]), time.perf_counter() - start

        start = time.perf_counter()
        with cf.ThreadPoolExecutor(max_workers=sessions) as pool:
            futures = [pool.submit(one, job) for job in jobs]
            results = [f.result(timeout=300) for f in futures]
        wall = time.perf_counter() - start
        answers = [r[0] for r in results]
        worst = max(r[1] for r in results)
        print(f"\nload test ({'embedded' if embedded else 'tiny random'} model): {sessions} sessions in {wall:.1f} s, "
              f"{sessions / wall:.2f} answers/s, worst latency {worst:.1f} s")
        assert answers == [a or "(empty answer)" for a in sequential]
        assert wall < 300
        text, _ = one(jobs[0])  # still serving
        assert text == (sequential[0] or "(empty answer)")
    finally:
        demo.close()
        runtime.set_model(previous)


# ---- real browser --------------------------------------------------------------------------------------------
def _browser_missing() -> str | None:
    from app.screenshot import CHROMIUM

    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install playwright==1.65.2)"
    return None


def _browser_driver():
    """app.screenshot (capture and the page helpers), or skip (locally) / fail (under CI) when no browser can run."""
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run under CI: {missing}")
        pytest.skip(missing)
    from app import screenshot

    return screenshot


def _browser_capture():
    return _browser_driver().capture


@pytest.mark.browser
def test_in_a_real_browser(launched, examples):
    capture = _browser_capture()
    _, url = launched
    out = ARTIFACTS / "app.png"
    result = capture(url, example_path(examples, "wide.png"), QUESTION, out, max_new_tokens=6)
    plots = result["plots"]
    assert plots["fa-lr"]["types"] == ["image", "heatmap"] and plots["fa-lr"]["cells"] == [LR_GRID]
    assert plots["fa-mask"]["types"] == ["image", "heatmap"] and plots["fa-mask"]["cells"] == [HR_GRID]
    assert plots["fa-grid"]["cells"] == [HR_GRID] * (NUM_LAYERS - SELECTION_LAYER)
    assert "bar" in plots["fa-chart"]["types"]
    assert QUESTION in result["chat"]
    assert out.is_file() and out.stat().st_size > 10_000


@pytest.mark.browser
def test_avl_panel_in_a_real_browser(launched, examples):
    capture = _browser_capture()
    _, url = launched
    out = ARTIFACTS / "avl.png"
    result = capture(url, example_path(examples, "wide.png"), QUESTION, out, avl=True, max_new_tokens=6)
    plots = result["plots"]
    assert plots["fa-avl"]["types"] == ["image", "heatmap"] and plots["fa-avl"]["cells"] == [LR_GRID]
    assert plots["fa-kv"]["types"] == ["bar", "bar", "bar", "bar", "scatter"]
    assert plots["fa-lr"]["cells"] == [LR_GRID] and plots["fa-mask"]["cells"] == [HR_GRID]
    assert out.is_file() and out.stat().st_size > 10_000


@pytest.mark.browser
def test_enter_asks_and_the_page_names_unknown_words_and_plays_the_walk(launched, examples):
    """Enter in the question box asks; the unknown word is named beside the answer; the overview has a row per
    answer token; the play button steps the playback through every token, in order, in the browser alone."""
    driver = _browser_driver()
    _, url = launched
    with driver.browser() as chromium:
        page = driver.open_page(chromium, url)
        driver.ask(page, example_path(examples, "multi_6.png"), "what colour is the cat ?", enter=True,
                   max_new_tokens=5)
        plots = driver.wait_for_plots(page, driver.INSPECT_IDS, ("#fa-stats", "unknown to this model: cat"))
        assert "unknown to this model: cat" in page.inner_text("#fa-source")
        assert plots["fa-overview"]["types"] == ["heatmap"]  # not the example's question: no recall panel
        n = plots["fa-overview"]["cells"][0]
        assert n == 5 and plots["fa-playback"]["steps"] == [n]
        assert plots["fa-playback"]["types"] == ["image"] + ["heatmap"] * n
        assert not page.is_visible("#fa-avl-group")  # A-VL was off: no empty A-VL panel
        assert driver.play(page) == list(range(n))
        assert page.errors == []
        page.screenshot(path=str(ARTIFACTS / "walk.png"), full_page=True)


@pytest.mark.browser
def test_an_animated_gif_gets_a_notice_in_a_real_browser(launched, images):
    driver = _browser_driver()
    _, url = launched
    with driver.browser() as chromium:
        page = driver.open_page(chromium, url)
        page.set_input_files("#fa-image input[type=file]", str(images["animated"]))
        page.wait_for_function("document.body.innerText.includes('frames (an animation): only the first one is used')")


@pytest.mark.browser
def test_compare_draws_where_each_mode_looked_in_a_real_browser(launched, examples):
    driver = _browser_driver()
    _, url = launched
    ex = example(examples, "multi_6.png")
    with driver.browser() as chromium:
        page = driver.open_page(chromium, url)
        page.set_input_files("#fa-image input[type=file]", ex.image)
        driver.set_max_new_tokens(page, 3)
        page.fill("#fa-question textarea", ex.question)
        page.get_by_role("tab", name="Compare").click()
        page.click("#fa-compare-btn")
        page.wait_for_function("(document.querySelector('#fa-compare-pictures .js-plotly-plot') || {}).data"
                               "?.filter(t => t.type === 'image').length === 6")
        plots = driver.wait_for_plots(page, ["fa-compare-pictures"])
        assert plots["fa-compare-pictures"]["height"] > 300 and page.errors == []
        # per mode: the LR map (all three) and the selected HR tokens (flex and select_all; lowres has none)
        assert plots["fa-compare-pictures"]["cells"] == [LR_GRID, LR_GRID, HR_GRID, LR_GRID, HR_GRID]
        assert "lowres" in page.inner_text("#fa-compare-pictures") and "select_all" in page.inner_text(
            "#fa-compare-pictures")


@pytest.mark.browser
def test_save_trace_then_open_it_in_a_fresh_page(launched, examples, tmp_path):
    driver = _browser_driver()
    _, url = launched
    ex = example(examples, "multi_6.png")
    with driver.browser() as chromium:
        page = driver.open_page(chromium, url)
        driver.ask(page, ex.image, ex.question, max_new_tokens=1)  # one answer token: the smallest overview
        asked = driver.wait_for_plots(page, driver.INSPECT_IDS)
        assert all(asked[view]["height"] > 200 for view in driver.INSPECT_IDS) and page.errors == []
        trace = driver.save_trace(page, tmp_path / "saved.npz")
        assert load_trace(trace).question == ex.question
        fresh = driver.open_page(chromium, url)  # a new session: nothing asked there
        driver.open_trace(fresh, trace)
        opened = driver.wait_for_plots(fresh, driver.INSPECT_IDS, ("#fa-source", "trace file"))
        for view in driver.INSPECT_IDS:
            assert opened[view]["types"] == asked[view]["types"] and opened[view]["cells"] == asked[view]["cells"]
        assert opened["fa-overview"]["types"] == ["heatmap", "heatmap"]  # the example's question: recall travels too
        assert fresh.errors == []
        assert ex.question in fresh.inner_text("#fa-source")


@pytest.mark.browser
def test_app_py_serves_a_trace_with_no_model(app_vlm, examples, tmp_path):
    """`python app.py --trace FILE`: the views of the trace, no model loaded, and Ask says so."""
    driver = _browser_driver()
    ex = example(examples, "multi_6.png")
    answer = app_vlm.answer(ex.image, ex.question, max_new_tokens=3)
    trace = save_trace(answer, Image.open(ex.image), ex.question, tmp_path / "run.npz",
                       text_config=app_vlm.model.config.text_config)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != runtime.ENV_MODEL}
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "app.py", "--trace", str(trace), "--port", str(port)], cwd=REPO,
                                  env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_serving(url, server, log)
        with driver.browser() as chromium:
            page = driver.open_page(chromium, url)
            plots = driver.wait_for_plots(page, driver.INSPECT_IDS, ("#fa-source", "run.npz"))
            assert plots["fa-lr"]["cells"] == [LR_GRID] and plots["fa-mask"]["cells"] == [HR_GRID]
            assert plots["fa-playback"]["steps"] == [len(answer.trace.passes)]
            assert "No model loaded" in page.inner_text("#fa-header")
            driver.ask(page, ex.image, "what is this ?")
            page.wait_for_function("document.body.innerText.includes('No model is loaded')")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "loading model" not in log.read_text()  # the launcher never loaded one


def _wait_until_serving(url: str, server, log: Path, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"app.py exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"app.py did not serve within {timeout_s} s: {log.read_text()[-2000:]}")
