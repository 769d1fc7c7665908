"""Command line: `python -m flexattn answer|eval|bench ...` (see `--help` of each).

This module owns argument parsing; the library functions it calls take plain values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import evaluate, evaluate_benchmarks
from .avl import AVLSettings
from .benchmarks import BENCH_NAMES, DEFAULT_SPLITS, load_benchmark
from .distributed import Processes
from .image import ImageError, load_image
from .loading import ModelLoadError
from .pipeline import FlexVLM
from .prompt import PromptError, check_question
from .settings import COST_MODES, MODES, parse_modes
from .synthetic import BENCHES
from .trace_file import TraceFileError, save_trace


DTYPES = ("float32", "float16", "bfloat16")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="hub id or directory (default: the embedded model)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])


def add_avl_args(parser: argparse.ArgumentParser) -> None:
    defaults = AVLSettings()
    parser.add_argument("--avl-selection", default=defaults.selection_scores, choices=["secondary", "attended"],
                        help="A-VL: score FlexAttention's selection over all cached visual tokens or the attended core")
    for name in ("vision_evict_rate", "compute_skip_rate", "text_evict_rate"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name),
                            help="A-VL rate")
    parser.add_argument("--refresh-every", type=int, default=defaults.refresh_every, help="A-VL refresh period (steps)")


def avl_settings(args) -> AVLSettings:
    return AVLSettings(vision_evict_rate=args.vision_evict_rate, compute_skip_rate=args.compute_skip_rate,
                       text_evict_rate=args.text_evict_rate, refresh_every=args.refresh_every,
                       selection_scores=args.avl_selection)


def load_model(args, device: str | None = None) -> FlexVLM:
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return FlexVLM.load(args.model, device=device or args.device, dtype=dtype)


def cmd_answer(args) -> int:
    image = load_image(args.image)  # fail fast on bad input, before a long model load
    question = check_question(args.question)
    if args.save_trace and not Path(args.save_trace).parent.is_dir():
        raise TraceFileError(f"cannot write the trace file {args.save_trace}: no such directory")
    vlm = load_model(args)
    if vlm.untrained_hr:
        print("note: this model's HR projections are untrained copies of k_proj/v_proj (training-free plug-in)",
              file=sys.stderr)
    options = dict(mode=args.mode, max_new_tokens=args.max_new_tokens, threshold=args.threshold,
                   selection_layer=args.selection_layer, do_sample=args.temperature > 0,
                   temperature=args.temperature or 1.0, seed=args.seed)
    if args.json:
        result = vlm.answer(image, question, **options)
        print(json.dumps(result.to_json(masks=args.masks)))
    else:
        result = None
        for part in vlm.stream(image, question, **options):
            if isinstance(part, str):
                print(part, end="", flush=True)
            else:
                result = part
        s = result.stats
        print(f"\n[{result.mode}] {s.generated_tokens} tokens, HR tokens attended per layer (first token): "
              f"{s.hr_attended_per_layer}, {s.tflops:.4f} TFLOPs, {s.latency_s.total:.2f} s "
              f"(vision {s.latency_s.vision:.2f} s + generation {s.latency_s.generation:.2f} s)")
        if result.unknown_words:
            print(f"unknown to this model: {', '.join(result.unknown_words)}")
    if args.save_trace:
        path = save_trace(result, image, question, args.save_trace, text_config=vlm.model.config.text_config)
        print(f"trace saved to {path}", file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    modes = parse_modes(args.modes)
    real = args.bench in BENCH_NAMES
    if real and not args.data_dir:
        raise ValueError(f"--bench {args.bench} needs --data-dir DIR (or a hub dataset id)")
    if args.report_items < 0:
        raise ValueError(f"--report-items must be 0 or more, got {args.report_items}")
    # Under torchrun / accelerate launch: one process per device, each with its share of the items.
    processes = Processes.launched(cpu=args.device == "cpu" or not torch.cuda.is_available())
    try:
        items = load_benchmark(args.bench, args.data_dir, args.split, args.limit) if real else None  # before the model
        device = str(processes.device) if processes.count > 1 and args.device is None else args.device
        vlm = load_model(args, device)
        if args.threshold is not None or args.pool_size is not None:  # every mode and bench reads the model's settings
            vlm.model.config.flex_attention = vlm.settings.with_overrides(threshold=args.threshold,
                                                                          pool_size=args.pool_size).to_dict()
        common = dict(max_new_tokens=args.max_new_tokens, processes=processes, out=args.out)
        if real:
            ran = evaluate_benchmarks.run_benchmark(vlm, args.bench, items, modes, **common)
        else:
            ran = evaluate.run_synthetic(vlm, args.bench, args.n, args.seed, modes, shifted=not args.no_shifted,
                                         avl=avl_settings(args) if args.avl else None, **common)
        if ran is None:  # not the main process: it printed nothing and leaves the summary to the main one
            return 0
        result, rows = ran
        if args.report:
            from . import eval_report  # plotly: only for this option

            worst = []
            if "flex" in modes and args.report_items:
                if real:
                    worst = evaluate_benchmarks.worst_items(vlm, args.bench, items, rows, k=args.report_items,
                                                            max_new_tokens=args.max_new_tokens)
                else:
                    worst = evaluate.synthetic_worst(vlm, args.bench, args.seed, rows, k=args.report_items,
                                                     max_new_tokens=args.max_new_tokens)
            print(f"report: {eval_report.write_report(args.report, result, worst)}", file=sys.stderr)
        print(json.dumps(result) if args.json else evaluate.format_table(result))
        return 0
    except KeyboardInterrupt:
        if args.out and processes.is_main:
            print(f"interrupted: {args.out} keeps the items done; the same command resumes from there", file=sys.stderr)
        return 130
    finally:
        processes.close()


def cmd_bench(args) -> int:
    from . import bench  # heavy (plotly, model builders): only for this command

    zooms, names = bench.parse_zooms(args.zoom), bench.parse_list(args.model)
    modes = parse_modes(args.modes, COST_MODES)
    center = bench.parse_center(args.planted_center)
    bench.check_run_options(repeats=args.repeats, warmup=args.warmup, decode_steps=args.decode_steps,
                            followup_tokens=args.followup_tokens, avl_repeats=args.avl_repeats,
                            avl_warmup=args.avl_warmup)
    avl = avl_settings(args) if args.avl != "off" else None
    dtype = getattr(torch, args.dtype) if args.dtype else None
    models = bench.build_models(names, depth_divisor=args.depth_divisor, planted_share=args.planted_share,
                                planted_center=center, device=args.device, dtype=dtype,
                                lazy_samples=args.lazy_samples)
    result = bench.run(models, zooms, repeats=args.repeats, warmup=args.warmup, decode_steps=args.decode_steps,
                       followup_tokens=args.followup_tokens, modes=modes, naive_max_zoom=args.naive_max_zoom,
                       avl_variants=bench.AVL_CHOICES[args.avl],
                       avl_settings=avl,
                       avl_repeats=args.avl_repeats, avl_warmup=args.avl_warmup)
    if args.html:
        print(f"chart: {bench.write_chart(result, args.html)}", file=sys.stderr)
    print(json.dumps(result.to_json()) if args.json else bench.format_report(result))
    return 0


def cmd_memory(args) -> int:
    from . import loading, memory  # noqa: PLC0415 - only for this command
    from .presets import llava_7b_config  # noqa: PLC0415
    from .settings import FlexSettings  # noqa: PLC0415

    config = llava_7b_config() if args.model == "7b" else loading.model_config(args.model)
    settings = FlexSettings.from_dict(config.flex_attention)
    names = [name.strip() for name in args.dtypes.split(",") if name.strip()]
    bad = [name for name in names if name not in DTYPES]
    if bad or not names:
        raise ValueError(f"--dtypes takes a comma list of {', '.join(DTYPES)}, got {args.dtypes!r}")
    dtypes = [getattr(torch, name) for name in names]
    needs = {dtype: memory.needs(config, settings, dtype) for dtype in dtypes}
    rows = memory.card_table(needs, memory.CARDS)
    if args.json:
        print(json.dumps({"needs": {str(d).replace("torch.", ""): {"parameters": n.parameters, "weights": n.weights,
                                                                  "image": n.image, "answer": n.answer,
                                                                  "device": n.device, "host_cpu": n.host_cpu,
                                                                  "host_direct": n.host_direct}
                                    for d, n in needs.items()}, "cards": rows}))
    else:
        print(memory.format_report(needs, rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m flexattn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    answer = sub.add_parser("answer", help="answer one question about one image")
    add_model_args(answer)
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
    answer.add_argument("--save-trace", default=None, metavar="FILE",
                        help="also write the answer's whole trace, image and question to FILE (.npz; the app opens "
                             "it with no model: python app.py --trace FILE)")
    answer.set_defaults(run=cmd_answer)

    ev = sub.add_parser("eval", help="accuracy, HR share, selection recall and TFLOPs per mode (and family)",
                        description="Launch with torchrun --nproc_per_node N (or accelerate launch) to spread the "
                                    "items over N processes; the main one prints what a single process would.")
    add_model_args(ev)
    ev.add_argument("--bench", default="synthetic", choices=[*BENCHES, *BENCH_NAMES])
    # -n too: torchrun's own parser rejects --n as an ambiguous prefix of its options (or pass "--" after the module)
    ev.add_argument("-n", "--n", type=int, default=500, help="samples (synthetic benches)")
    ev.add_argument("--seed", type=int, default=10_000_000, help="first held-out seed (training used < 10M)")
    ev.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of: {','.join(MODES)}")
    ev.add_argument("--data-dir", "--vstar-dir", dest="data_dir", default=None,
                    help="vstar, textvqa, magnifierbench: the benchmark's directory in its published layout, a "
                         "dataset directory, or a hub dataset id (docs/benchmarks.md)")
    ev.add_argument("--split", default=None,
                    help="dataset split for hub datasets (default: "
                         + ", ".join(f"{b} {s}" for b, s in DEFAULT_SPLITS.items()) + ")")
    ev.add_argument("--limit", type=int, default=None, help="only the first N questions of a benchmark")
    ev.add_argument("--max-new-tokens", type=int, default=16)
    ev.add_argument("--no-shifted", action="store_true", help="skip the shifted-mask control")
    ev.add_argument("--avl", action="store_true", help="also run every mode with A-VL and compare")
    add_avl_args(ev)
    ev.add_argument("--threshold", type=float, default=None,
                    help="selection threshold, 0-255 (default: the model's); to trace recall against HR share")
    ev.add_argument("--pool-size", type=int, default=None, help="selection pooling grid (default: the model's)")
    ev.add_argument("--out", default=None,
                    help="per-item results, one JSON line each; a rerun with the same file resumes where it stopped")
    ev.add_argument("--report", default=None, help="write an HTML page: summary and the worst items' attention maps")
    ev.add_argument("--report-items", type=int, default=4,
                    help="with --report: how many lowest-recall and how many wrong items to draw (default 4 each)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(run=cmd_eval)

    be = sub.add_parser("bench", help="cost of lowres / flex / select_all / naive_hd as resolution grows")
    be.add_argument("--model", default="7b-shaped",
                    help="comma list of: 7b-shaped (random weights, LLaVA-1.5-7B shape), embedded, a checkpoint PATH "
                         "or hub id; the first is the main model (default: 7b-shaped)")
    be.add_argument("--zoom", default="3", help="HR zoom(s) over the LR size, comma list, e.g. 2,3,4 (default: 3)")
    be.add_argument("--modes", default=",".join(COST_MODES))
    be.add_argument("--depth-divisor", type=int, default=8,
                    help="7b-shaped: LLM and tower depth divided by this (1, 2, 4, 8; default 8)")
    be.add_argument("--planted-share", type=float, default=0.10,
                    help="7b-shaped: share of HR tokens flex selects, as a compact square (0: no planting)")
    be.add_argument("--planted-center", default="0.5,0.5", help="7b-shaped: centre y,x of that square (fractions)")
    be.add_argument("--repeats", type=int, default=3, help="timed calls per mode (median reported)")
    be.add_argument("--warmup", type=int, default=1, help="untimed calls per mode before the repeats")
    be.add_argument("--decode-steps", type=int, default=4, help="greedy decoding steps timed after prefill")
    be.add_argument("--followup-tokens", type=int, default=4, help="max_new_tokens of the follow-up case")
    be.add_argument("--naive-max-zoom", type=int, default=None,
                    help="time naive_hd only up to this zoom (its FLOPs are reported at every zoom)")
    be.add_argument("--avl", default="both", choices=["off", "on", "both"],
                    help="run every mode without A-VL, with it, or both (default both; with A-VL rows, decoding runs "
                         "at least 6 steps, past a refresh step)")
    be.add_argument("--avl-repeats", type=int, default=1,
                    help="timed calls per A-VL row (default 1: A-VL changes decoding, timed after the last call)")
    be.add_argument("--avl-warmup", type=int, default=0,
                    help="untimed calls per A-VL row (default 0: it runs right after the same mode without A-VL)")
    add_avl_args(be)
    be.add_argument("--lazy-samples", type=int, default=4, help="benchmark images for the lazy-HR check (trained "
                                                                "models)")
    be.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    be.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                    help="default: for 7b-shaped bfloat16 where the GPU or CPU has it natively, else float16 on "
                         "CUDA and float32 on the CPU; checkpoints: the loader's choice")
    be.add_argument("--html", default="bench.html", help="chart file (default bench.html; '' for none)")
    be.add_argument("--json", action="store_true", help="print one JSON object")
    be.set_defaults(run=cmd_bench)

    mem = sub.add_parser("memory", help="GPU memory and host RAM a model needs, and what fits on common GPUs")
    mem.add_argument("--model", default="7b", help="7b (the released 7B's shape, default), a directory or hub id "
                                                   "(its configuration only is read)")
    mem.add_argument("--dtypes", default="float16,float32", help="comma list of float16, bfloat16, float32")
    mem.add_argument("--json", action="store_true", help="print one JSON object")
    mem.set_defaults(run=cmd_memory)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ImageError, ModelLoadError, PromptError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
