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

def cmd_bench(args) -> int:
    import torch

    from . import bench

    zooms = bench.parse_zooms(args.zoom)
    names = bench.parse_list(args.model)
    modes = bench.parse_modes(args.modes)
    center = bench.parse_list(args.planted_center, float)
    if len(center) != 2 or not all(0 <= c <= 1 for c in center):
        raise ValueError(f"--planted-center takes two fractions y,x in 0..1, got {args.planted_center!r}")
    if not 0 <= args.planted_share <= 1:
        raise ValueError(f"--planted-share is a fraction of the HR tokens, got {args.planted_share}")
    if args.depth_divisor not in (1, 2, 4, 8):
        raise ValueError("--depth-divisor must divide both depths (32 LLM and 24 tower layers): 1, 2, 4 or 8")
    if args.repeats < 1 or args.warmup < 0 or args.decode_steps < 0 or not 1 <= args.followup_tokens <= 512:
        raise ValueError("--repeats >= 1, --warmup >= 0, --decode-steps >= 0 and --followup-tokens in 1..512")
    if args.avl_repeats < 1 or args.avl_warmup < 0:
        raise ValueError("--avl-repeats >= 1 and --avl-warmup >= 0")
    variants = {"off": (False,), "on": (True,), "both": (False, True)}[args.avl]
    avl = None
    if args.avl != "off":
        from .avl import AVLSettings

        avl = AVLSettings(vision_evict_rate=args.vision_evict_rate, compute_skip_rate=args.compute_skip_rate,
                          text_evict_rate=args.text_evict_rate, refresh_every=args.refresh_every,
                          selection_scores=args.avl_selection)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    models = bench.build_models(names, depth_divisor=args.depth_divisor, planted_share=args.planted_share,
                                planted_center=center, device=args.device, dtype=dtype,
                                lazy_samples=args.lazy_samples)
    result = bench.run(models, zooms, repeats=args.repeats, warmup=args.warmup, decode_steps=args.decode_steps,
                       followup_tokens=args.followup_tokens, modes=modes, naive_max_zoom=args.naive_max_zoom,
                       avl_variants=variants, avl_settings=avl, avl_repeats=args.avl_repeats,
                       avl_warmup=args.avl_warmup)
    if args.html:
        path = bench.write_chart(result, args.html)
        print(f"chart: {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(result))
    else:
        print(bench.format_report(result))
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

    bench = sub.add_parser("bench", help="cost of lowres / flex / select_all / naive_hd as resolution grows")
    bench.add_argument("--model", default="7b-shaped",
                       help="comma list of: 7b-shaped (random weights, LLaVA-1.5-7B shape), embedded, a checkpoint "
                            "PATH or hub id; the first is the main model (default: 7b-shaped)")
    bench.add_argument("--zoom", default="3", help="HR zoom(s) over the LR size, comma list, e.g. 2,3,4 (default: 3)")
    bench.add_argument("--modes", default="lowres,flex,select_all,naive_hd")
    bench.add_argument("--depth-divisor", type=int, default=8,
                       help="7b-shaped: LLM and tower depth divided by this (1, 2, 4, 8; default 8)")
    bench.add_argument("--planted-share", type=float, default=0.10,
                       help="7b-shaped: share of HR tokens flex selects, as a compact square (0: no planting)")
    bench.add_argument("--planted-center", default="0.5,0.5", help="7b-shaped: centre y,x of that square (fractions)")
    bench.add_argument("--repeats", type=int, default=3, help="timed calls per mode (median reported)")
    bench.add_argument("--warmup", type=int, default=1, help="untimed calls per mode before the repeats")
    bench.add_argument("--decode-steps", type=int, default=4, help="greedy decoding steps timed after prefill")
    bench.add_argument("--followup-tokens", type=int, default=4, help="max_new_tokens of the follow-up case")
    bench.add_argument("--naive-max-zoom", type=int, default=None,
                       help="time naive_hd only up to this zoom (its FLOPs are reported at every zoom)")
    bench.add_argument("--avl", default="both", choices=["off", "on", "both"],
                       help="run every mode without A-VL, with it, or both (default both; with A-VL rows, decoding "
                            "runs at least 6 steps, past a refresh step)")
    bench.add_argument("--avl-repeats", type=int, default=1,
                       help="timed calls per A-VL row (default 1: A-VL changes decoding, timed after the last call)")
    bench.add_argument("--avl-warmup", type=int, default=0,
                       help="untimed calls per A-VL row (default 0: it runs right after the same mode without A-VL)")
    bench.add_argument("--avl-selection", default="secondary", choices=["secondary", "attended"],
                       help="A-VL: score FlexAttention's selection over all cached visual tokens or the attended core")
    for name, default in (("vision-evict-rate", 0.5), ("compute-skip-rate", 0.7), ("text-evict-rate", 0.4)):
        bench.add_argument(f"--{name}", type=float, default=default, help="A-VL rate")
    bench.add_argument("--refresh-every", type=int, default=3, help="A-VL refresh period (steps)")
    bench.add_argument("--lazy-samples", type=int, default=4, help="benchmark images for the lazy-HR check "
                                                                   "(trained models)")
    bench.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    bench.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                       help="default: bfloat16 on CUDA; on the CPU bfloat16 for 7b-shaped where the CPU has native "
                            "bf16 matmuls, else float32")
    bench.add_argument("--html", default="bench.html", help="chart file (default bench.html; '' for none)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    bench.set_defaults(run=cmd_bench)

    from . import evaluate  # its own parser, beside its runner

    evaluate.add_parser(sub, _add_model_args)
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
