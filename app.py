"""Launch the flexattn app: `python app.py [--model NAME_OR_DIR] [--trace FILE] [--host 127.0.0.1] [--port 7860]`.

The model is chosen here, at launch (--model, else $FLEXATTN_MODEL, else the embedded model), never from the page.
`--trace FILE` (a trace saved by the app or by `python -m flexattn answer --save-trace`) opens with that trace's
views and loads no model unless --model is given too.
On Hugging Face Spaces, GRADIO_SERVER_NAME / GRADIO_SERVER_PORT set by the platform are the defaults.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

try:  # on Hugging Face ZeroGPU Spaces, `spaces` must be imported before torch initialises CUDA
    import spaces  # noqa: F401
except ImportError:
    pass


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="flexattn: see where FlexAttention looks, layer by layer")
    parser.add_argument("--model", default=None,
                        help="hub id or directory (default: $FLEXATTN_MODEL, else the embedded model)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--trace", default=None, metavar="FILE",
                        help="open with this saved trace's views; without --model, no model is loaded")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float16 on a GPU for the released 7B, see docs/gpu-and-spaces.md")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("app").setLevel(logging.INFO)  # one line per rejected input
    import torch

    from flexattn import ModelLoadError
    from flexattn.trace_file import TraceFileError, load_trace

    from app import runtime, ui

    try:
        opened = load_trace(args.trace) if args.trace else None
        if opened is None or args.model:
            runtime.load_model(runtime.choose_model(args.model), device=args.device,
                               dtype=getattr(torch, args.dtype) if args.dtype else None)
    except (ModelLoadError, TraceFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    demo = ui.build_demo(opened=opened, opened_name=Path(args.trace).name if args.trace else "")
    demo.launch(server_name=args.host, server_port=args.port, **ui.launch_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
