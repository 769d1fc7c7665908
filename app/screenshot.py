"""Drive the app in headless Debian Chromium (Playwright, never a downloaded browser) and save a screenshot.

    python -m app.screenshot --out test-artifacts/app.png [--model DIR_OR_HUB_ID] [--image PATH --question Q] [--avl]

Without --image it asks the first example's question about its image; --avl switches A-VL on first and also waits
for the A-VL panel. The browser tests use `capture` too.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
READ_PLOTS = """Array.from(document.querySelectorAll('.js-plotly-plot')).map(el => ({
    id: (el.closest('[id^="fa-"]') || {}).id,
    types: (el.data || []).map(t => t.type),
    cells: (el._fullData || []).filter(t => t.type === 'heatmap').map(t => t.z ? t.z.length : 0),
}))"""


def capture(url: str, image: str, question: str, out: Path | None, timeout_s: float = 180,
            width: int = 1400, avl: bool = False) -> dict:
    """Upload `image`, ask `question`, wait for the answer and the four inspect figures; screenshot to `out`.
    With `avl`, tick the A-VL switch before asking and wait for the two A-VL figures as well.

    Returns {"plots": {element id: {"types": [...], "cells": [heatmap rows ...]}}, "chat": text of the chat}.
    """
    from playwright.sync_api import sync_playwright

    ms = int(timeout_s * 1000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.goto(url, timeout=ms)
            page.wait_for_selector("#fa-image input[type=file]", state="attached", timeout=ms)
            page.set_input_files("#fa-image input[type=file]", str(image))
            page.wait_for_selector("#fa-image img", timeout=ms)
            page.fill("#fa-question textarea", question)
            if avl:
                page.check("#fa-avl-on input[type=checkbox]")
            page.click("#fa-ask")
            ids = ["fa-lr", "fa-mask", "fa-grid", "fa-chart", *(["fa-avl", "fa-kv"] if avl else [])]
            page.wait_for_function(
                f"{ids!r}.every(id => document.querySelector('#' + id + ' .js-plotly-plot'))", timeout=ms)
            if avl:  # show the first decoding step: token 0 is the prefill, before anything is evicted
                page.fill("#fa-token input[type=number]", "1")
                page.press("#fa-token input[type=number]", "Enter")
                page.wait_for_function(
                    "(document.querySelector('#fa-avl-text') || {}).innerText?.includes('token 1 ')", timeout=ms)
            page.wait_for_timeout(500)  # let plotly finish drawing before the screenshot
            plots = {r["id"]: r for r in page.evaluate(READ_PLOTS)}
            chat = page.inner_text("#fa-chat")
            if out is not None:
                Path(out).parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out), full_page=True)
            return {"plots": plots, "chat": chat}
        finally:
            browser.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="test-artifacts/app.png")
    parser.add_argument("--model", default=None)
    parser.add_argument("--examples", default=None)
    parser.add_argument("--image", default=None)
    parser.add_argument("--question", default=None)
    parser.add_argument("--avl", action="store_true", help="switch A-VL on before asking")
    args = parser.parse_args(argv)

    from . import runtime, ui
    from .examples import load_examples

    runtime.load_model(runtime.choose_model(args.model))
    examples = load_examples(args.examples)
    image, question = args.image, args.question
    if image is None:
        if not examples:
            parser.error("no examples found: pass --image and --question")
        image, question = examples[0].image, question or examples[0].question
    demo = ui.build_demo(examples=examples)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                            **ui.launch_options())
    try:
        result = capture(url, image, question or "What is in this image?", Path(args.out), avl=args.avl)
    finally:
        demo.close()
    print(f"saved {args.out}; figures: " + ", ".join(f"{k}: {v['types']}" for k, v in result["plots"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
