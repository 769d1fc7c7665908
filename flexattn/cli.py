"""Command line: `python -m flexattn answer|eval|bench ...` (see `--help` of each)."""

from __future__ import annotations

import argparse
import json
import sys

from .settings import MODES


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id or directory (default: the embedded model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])


def _load(args):
    import torch

    from .pipeline import FlexVLM

    dtype = getattr(torch, args.dtype) if args.dtype else None
    return FlexVLM.load(args.model, device=args.device, dtype=dtype)


def cmd_answer(args) -> int:
    from .image import load_image
    from .prompt import check_question

    image = load_image(args.image)  # fail fast on bad input, before a long model load
    check_question(args.question)
    vlm = _load(args)
    if vlm.untrained_hr:
        print("note: this model's HR projections are untrained copies of k_proj/v_proj (training-free plug-in)",
              file=sys.stderr)
    options = dict(
        mode=args.mode, max_new_tokens=args.max_new_tokens, threshold=args.threshold,
        selection_layer=args.selection_layer, do_sample=args.temperature > 0,
        temperature=args.temperature or 1.0, seed=args.seed,
    )
    if args.json:
        result = vlm.answer(image, args.question, **options)
        print(json.dumps(result.to_json(masks=args.masks)))
        return 0
    result = None
    for part in vlm.stream(image, args.question, **options):
        if isinstance(part, str):
            print(part, end="", flush=True)
        else:
            result = part
    s = result.stats
    print(f"\n[{result.mode}] {s['generated_tokens']} tokens, HR tokens attended per layer (first token): "
          f"{s['hr_attended_per_layer']}, {s['tflops']:.4f} TFLOPs, {s['latency_s']['total']:.2f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    answer = sub.add_parser("answer", help="answer one question about one image")
    _add_model_args(answer)
    answer.add_argument("--image", required=True)
    answer.add_argument("--question", required=True)
    answer.add_argument("--mode", default="flex", choices=MODES)
    answer.add_argument("--max-new-tokens", type=int, default=64)
    answer.add_argument("--threshold", type=float, default=None, help="selection threshold, 0-255")
    answer.add_argument("--selection-layer", type=int, default=None)
    answer.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    answer.add_argument("--seed", type=int, default=None)
    answer.add_argument("--json", action="store_true", help="print one JSON object")
    answer.add_argument("--masks", action="store_true",
                        help="with --json: every selected HR mask, per generated token and layer (row-major indices)")
    answer.set_defaults(run=cmd_answer)
    return parser


def main(argv=None) -> int:
    from .image import ImageError
    from .loading import ModelLoadError
    from .prompt import PromptError

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ImageError, ModelLoadError, PromptError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
