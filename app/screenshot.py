"""Drive the app in headless Debian Chromium (Playwright, never a downloaded browser) and save screenshots.

    python -m app.screenshot --out test-artifacts/app.png [--model DIR_OR_HUB_ID] [--image PATH --question Q] [--avl]
    python -m app.screenshot --docs docs/img      # the views docs/debugging.md shows, one small PNG each

Without --image it asks the first example's question about its image; --avl switches A-VL on first and also waits
for the A-VL panel. The browser tests use `capture` and the page helpers below too.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
READ_PLOTS = """Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => ({
    id: (el.closest('[id^="fa-"]') || {}).id,
    types: (el.data || []).map(t => t.type),
    cells: (el._fullData || []).filter(t => t.type === 'heatmap').map(t => t.z ? t.z.length : 0),
    steps: ((el.layout || {}).sliders || []).map(s => s.steps.length),
    height: el.getBoundingClientRect().height,
}))"""
# Which answer token the playback figure shows: its slider's position and the one mask trace that is visible.
PLAYBACK_STATE = """(() => {
    const gd = document.querySelector('#fa-playback .js-plotly-plot');
    if (!gd || !gd.layout.sliders || !gd.layout.sliders.length) return null;
    const visible = gd.data.map((t, i) => [t, i]).filter(([t, i]) => i > 0 && t.visible !== false)
        .map(([t, i]) => i - 1);
    return {active: gd.layout.sliders[0].active, visible: visible, steps: gd.layout.sliders[0].steps.length};
})()"""
INSPECT_IDS = ["fa-lr", "fa-mask", "fa-grid", "fa-chart", "fa-overview", "fa-playback"]
MAX_DOC_IMAGE_BYTES = 300_000


@contextlib.contextmanager
def browser() -> Iterator:
    """Headless Debian Chromium under Playwright."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(chromium, url: str, width: int = 1400, timeout_s: float = 180):
    """A fresh page (its own browser context: no shared session) on the app, ready for input."""
    page = chromium.new_context(viewport={"width": width, "height": 1000}).new_page()
    page.set_default_timeout(int(timeout_s * 1000))
    page.errors = []  # uncaught script errors (a figure plotly cannot draw raises one)
    page.on("pageerror", lambda err: page.errors.append(str(err)))
    page.goto(url)
    page.wait_for_selector("#fa-image input[type=file]", state="attached")
    return page


def set_max_new_tokens(page, n: int) -> None:
    """Open the settings and set "Max new tokens" (a short answer keeps a browser test short)."""
    if not page.is_visible("#fa-max-new"):
        page.click("#fa-settings button")
    page.fill("#fa-max-new input[type=number]", str(n))
    page.press("#fa-max-new input[type=number]", "Enter")


def ask(page, image: str | Path | None, question: str, avl: bool = False, enter: bool = False,
        max_new_tokens: int | None = None) -> None:
    """Upload `image` (None: keep the current one), type `question` and ask, by the button or with Enter."""
    if image is not None:
        page.set_input_files("#fa-image input[type=file]", str(image))
        page.wait_for_selector("#fa-image img")
    if max_new_tokens is not None:
        set_max_new_tokens(page, max_new_tokens)
    page.fill("#fa-question textarea", question)
    if avl:
        page.check("#fa-avl-on input[type=checkbox]")
    if enter:
        page.press("#fa-question textarea", "Enter")
    else:
        page.click("#fa-ask")


def wait_for_plots(page, ids, text_in: tuple[str, str] | None = None) -> dict:
    """Wait until every element id in `ids` holds a drawn plotly figure (and `text_in` = (selector, text) shows);
    returns what each figure drew (READ_PLOTS, by element id)."""
    page.wait_for_function(f"{list(ids)!r}.every(id => document.querySelector('#' + id + ' .js-plotly-plot'))")
    if text_in is not None:
        page.wait_for_function("([sel, text]) => (document.querySelector(sel) || {}).innerText?.includes(text)",
                               arg=list(text_in))
    page.wait_for_timeout(500)  # let plotly finish drawing
    return {r["id"]: r for r in page.evaluate(READ_PLOTS)}


def play(page, step_timeout_s: float = 5) -> list[int]:
    """Click the playback's play button and record, until it stops, which answer token each moment shows."""
    page.click("#fa-play")
    shown, idle = [], 0.0
    while idle < step_timeout_s:
        now = page.evaluate(PLAYBACK_STATE)
        if now is not None and now["visible"] == [now["active"]] and (not shown or shown[-1] != now["active"]):
            shown.append(now["active"])
            idle = 0.0
            if shown[-1] == now["steps"] - 1:
                break
        page.wait_for_timeout(100)
        idle += 0.1
    return shown


def save_trace(page, out: Path) -> Path:
    """Click "Save trace" and download the file the page offers to `out`."""
    page.click("#fa-save-trace")
    link = page.wait_for_selector("#fa-trace-file a[href]")
    response = page.request.get(link.get_attribute("href"))
    out.write_bytes(response.body())
    return out


def open_trace(page, path: Path) -> None:
    """Open a trace file with the "Open trace" button (its file input sits just before it)."""
    page.set_input_files("input[type=file]:has(+ #fa-open-trace)", str(path))


def capture(url: str, image: str, question: str, out: Path | None, timeout_s: float = 180,
            width: int = 1400, avl: bool = False, max_new_tokens: int | None = None) -> dict:
    """Upload `image`, ask `question`, wait for the answer and the inspect figures; screenshot to `out`.
    With `avl`, tick the A-VL switch before asking and wait for the two A-VL figures as well.

    Returns {"plots": {element id: {"types": [...], "cells": [heatmap rows ...]}}, "chat": text of the chat}.
    """
    with browser() as chromium:
        page = open_page(chromium, url, width, timeout_s)
        ask(page, image, question, avl=avl, max_new_tokens=max_new_tokens)
        plots = wait_for_plots(page, [*INSPECT_IDS, *(["fa-avl", "fa-kv"] if avl else [])])
        if avl:  # show the first decoding step: token 0 is the prefill, before anything is evicted
            page.fill("#fa-token input[type=number]", "1")
            page.press("#fa-token input[type=number]", "Enter")
            plots = wait_for_plots(page, ["fa-avl"], ("#fa-avl-text", "token 1 "))
        chat = page.inner_text("#fa-chat")
        if out is not None:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
        return {"plots": plots, "chat": chat}


# ---- the walk-through's screenshots ----------------------------------------------------------------------------
def _small_png(path: Path) -> None:
    """Plots are few colours: a 256-colour palette keeps a screenshot well under MAX_DOC_IMAGE_BYTES."""
    from PIL import Image

    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def _shot(locator, path: Path) -> Path:
    locator.screenshot(path=str(path))
    _small_png(path)
    return path


def docs_screenshots(url: str, image: str, question: str, out_dir: Path, trace_url_for=None) -> list[Path]:
    """Ask an example's question and take the views the walk-through shows; then a question with a word the model
    does not know, Compare, and (with `trace_url_for(file)` giving the URL of an app serving that trace with no
    model) the trace viewer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = []
    with browser() as chromium:
        page = open_page(chromium, url, width=1280)
        ask(page, image, question, enter=True)
        wait_for_plots(page, INSPECT_IDS)
        shots.append(_shot(page.locator("#fa-top"), out_dir / "header.png"))
        shots.append(_shot(page.locator("#fa-walk"), out_dir / "walk.png"))
        shots.append(_shot(page.locator("#fa-maps"), out_dir / "maps.png"))
        shots.append(_shot(page.locator("#fa-grid"), out_dir / "layers.png"))
        with tempfile.TemporaryDirectory() as tmp:
            trace = save_trace(page, Path(tmp) / "example.npz")
            ask(page, None, "what colour is the cat in this picture ?")
            page.wait_for_function("(document.querySelector('#fa-stats') || {}).innerText?.includes('unknown')")
            shots.append(_shot(page.locator("#fa-stats"), out_dir / "unknown-words.png"))
            page.get_by_role("tab", name="Compare").click()
            page.fill("#fa-question textarea", question)
            page.click("#fa-compare-btn")
            page.wait_for_function("(document.querySelector('#fa-compare-pictures .js-plotly-plot') || {}).data"
                                   "?.filter(t => t.type === 'image').length === 6")
            page.wait_for_timeout(800)
            shots.append(_shot(page.locator("#fa-compare-pictures"), out_dir / "compare.png"))
            if trace_url_for is not None:
                viewer = open_page(chromium, trace_url_for(trace), width=1280)
                wait_for_plots(viewer, INSPECT_IDS)
                shots.append(_shot(viewer.locator("#fa-top"), out_dir / "trace-viewer.png"))
    return shots


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(demo) -> str:
    from . import ui

    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                            **ui.launch_options())
    return url


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="test-artifacts/app.png")
    parser.add_argument("--docs", default=None, metavar="DIR", help="take docs/debugging.md's screenshots into DIR")
    parser.add_argument("--model", default=None)
    parser.add_argument("--examples", default=None)
    parser.add_argument("--image", default=None)
    parser.add_argument("--question", default=None)
    parser.add_argument("--avl", action="store_true", help="switch A-VL on before asking")
    args = parser.parse_args(argv)

    from flexattn.trace_file import load_trace

    from . import runtime, ui
    from .examples import load_examples

    runtime.load_model(runtime.choose_model(args.model))
    examples = load_examples(args.examples)
    image, question = args.image, args.question
    if image is None:
        if not examples:
            parser.error("no examples found: pass --image and --question")
        image, question = examples[0].image, question or examples[0].question
    question = question or "What is in this image?"
    demo = ui.build_demo(examples=examples)
    url = _launch(demo)
    viewers = []
    try:
        if args.docs:
            def trace_url_for(path: Path) -> str:  # the same page with no model, as `python app.py --trace`
                model = runtime.model()
                runtime.set_model(None)
                try:
                    viewers.append(ui.build_demo(opened=load_trace(path), opened_name=path.name))
                finally:
                    runtime.set_model(model)
                return _launch(viewers[-1])

            shots = docs_screenshots(url, image, question, Path(args.docs), trace_url_for)
            print("saved " + ", ".join(f"{p} ({p.stat().st_size // 1024} KB)" for p in shots))
            too_big = [p for p in shots if p.stat().st_size > MAX_DOC_IMAGE_BYTES]
            return 1 if too_big else 0
        result = capture(url, image, question, Path(args.out), avl=args.avl)
    finally:
        for viewer in viewers:
            viewer.close()
        demo.close()
    print(f"saved {args.out}; figures: " + ", ".join(f"{k}: {v['types']}" for k, v in result["plots"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
