"""Time the app's event functions (no server, no browser): an example question with every figure, and slider
re-renders from the cached trace; then the figures alone at the 7B's scale (72x72 HR grid, 32 layers).

    python -m app.timing [--model DIR_OR_HUB_ID] [--examples DIR] [--max-new-tokens 32] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from flexattn import Answer
from flexattn.trace_file import GroundTruth

from . import runtime
from .events import Events, new_session
from .examples import load_examples
from .records import AnswerRecord


def _time(fn, repeat: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return statistics.median(runs), max(runs)


def example_timings(events: Events, image: str, question: str, max_new_tokens: int, repeat: int) -> None:
    def ask_and_draw(state):
        _, state = events.start_turn(image, question, state)
        for _, state, _ in events.answer_turn(state, max_new_tokens=max_new_tokens):
            pass
        events.render_token(state, 0, state["answer"].trace.selection_layer + 1)
        return state

    start = time.perf_counter()
    state = ask_and_draw(new_session())  # a new image: decoding, LR + HR encoding, generation, figures
    cold = time.perf_counter() - start
    rec = state["answer"]
    n_tokens, n_layers = len(rec.trace.passes), len(rec.trace.passes[0])
    print(f"example question, new image, {n_tokens} tokens, answer + all figures: {cold:.2f} s "
          f"(model latency {rec.stats.latency_s.total:.2f} s)")
    warm, worst = _time(lambda: ask_and_draw(new_session()), repeat)
    print(f"same, image features cached: median {warm:.2f} s, worst {worst:.2f} s")
    layer = iter(range(10**9))
    med, worst = _time(lambda: events.render_layer(state, 0, next(layer) % n_layers), repeat * 4)
    print(f"layer slider re-render (2 image figures): median {med * 1000:.0f} ms, worst {worst * 1000:.0f} ms")
    token = iter(range(10**9))
    med, worst = _time(lambda: events.render_token(state, next(token) % n_tokens, 2), repeat * 4)
    print(f"token slider re-render (all 4 figures): median {med * 1000:.0f} ms, worst {worst * 1000:.0f} ms")


def scale_timings(repeat: int, hr_grid: int = 72, lr_grid: int = 24, layers: int = 32, selection_layer: int = 8,
                  tokens: int = 8) -> None:
    """render_layer / render_token on a synthetic trace of the 7B's size (no model involved)."""
    from PIL import Image

    from flexattn.cost import Flops
    from flexattn.presets import llava_7b_config
    from flexattn.trace import LayerTrace, Trace

    from . import figures

    rng = np.random.default_rng(0)
    trace = Trace(lr_grid, hr_grid, selection_layer)
    for _ in range(tokens):
        passes = []
        for layer in range(layers):
            lt = LayerTrace(layer, rng.random((lr_grid, lr_grid), dtype=np.float32))
            if layer >= selection_layer:
                lt.selected = np.kron(rng.random((9, 9)) > 0.6, np.ones((8, 8), dtype=bool))
            if layer > selection_layer:
                lt.hr_attended = int(passes[-1].selected.sum())
                lt.hr_attention = rng.random((hr_grid, hr_grid), dtype=np.float32)
            passes.append(lt)
        trace.passes.append(passes)
    from flexattn.synthetic import make_sample

    image = make_sample(0, "attribute").image.resize((1600, 1200), Image.Resampling.BICUBIC)  # photo-like size
    stats = SimpleNamespace(prompt_tokens=640, flops=Flops(vision=10**12, projector=10**10, llm=2 * 10**12,
                                                           hr_attention=10**10),
                            untrained_hr_projections=False, avl=None, kv_bytes=0)  # what the views read
    answer = Answer(text="x", mode="flex", token_ids=[0] * tokens, tokens=["x"] * tokens, stats=stats, trace=trace)
    state = new_session()
    state["answer"] = AnswerRecord(
        answer=answer, question="q", view=figures.image_view(image),
        thumb=figures.image_view(image, figures.THUMB_SIDE), image=image, text_config=llava_7b_config().text_config,
        truth=GroundTruth([[100, 100, 300, 300]]))
    events = Events()
    med, worst = _time(lambda: events.render_layer(state, 3, 20), repeat * 4)
    print(f"7B scale (72x72 HR, 32 layers), layer slider: median {med * 1000:.0f} ms, worst {worst * 1000:.0f} ms")
    med, worst = _time(lambda: events.render_token(state, 3, 20), repeat * 4)
    print(f"7B scale, token slider (all figures): median {med * 1000:.0f} ms, worst {worst * 1000:.0f} ms")
    med, worst = _time(lambda: events.render_all(state, 20), repeat * 2)
    print(f"7B scale, a new answer's views (overview and playback included): median {med * 1000:.0f} ms, "
          f"worst {worst * 1000:.0f} ms")
    out = events.render_token(state, 3, 20)
    sizes = [len(fig.to_json()) // 1024 for fig in out[:4]]
    print(f"7B scale figure JSON sizes (KB): LR {sizes[0]}, mask {sizes[1]}, all layers {sizes[2]}, chart {sizes[3]}, "
          f"overview {len(events.render_overview(state).to_json()) // 1024}, "
          f"playback of {tokens} tokens {len(events.render_playback(state, 20).to_json()) // 1024}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--examples", default=None, help="examples directory (default: assets/examples)")
    parser.add_argument("--image", default=None, help="an image instead of the first example")
    parser.add_argument("--question", default="what letter is on the red circle ?")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    import gradio as gr

    gr.Info = lambda *a, **k: None  # notices would print once per run here
    runtime.load_model(runtime.choose_model(args.model))
    examples = load_examples(args.examples)
    image, question = args.image, args.question
    if image is None:
        if not examples:
            parser.error("no examples found: pass --image or --examples")
        image, question = examples[0].image, examples[0].question or question
    print(f"image {Path(image).name}, question {question!r}")
    events = Events(examples)
    example_timings(events, image, question, args.max_new_tokens, args.repeat)
    scale_timings(args.repeat)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
