"""Benchmark runner: what FlexAttention costs against plain LLaVA (`lowres`) and naive high-res (`naive_hd`).

    python -m flexattn bench --model 7b-shaped --zoom 3            # tables
    python -m flexattn bench --model 7b-shaped,embedded --zoom 2,3,4 --json

Models (flexattn.bench.models)
  * `7b-shaped`: LLaVA-1.5-7B widths, heads and vocabulary (LLaMA-7B + CLIP ViT-L/14-336) with random weights,
    LLM and tower depth divided by `--depth-divisor` (selection layer scaled with it) so it runs on a CPU. Times
    are measured at that depth; analytic FLOPs are reported for the full-depth 7B (the cost model needs no run;
    per-layer counts are spread over its layers by cost.full_depth_call_flops).
    Random weights attend broadly and would select nearly every HR token, so flex mode gets a planted selection: a
    compact square holding `--planted-share` of the HR tokens (printed with the tables).
  * `embedded` (assets/flexattn-tiny) or any checkpoint PATH / hub id: its own, learned selection; FLOPs for the
    model itself.

Modes, each without and with A-VL for decoding (`--avl off|on|both`, default both; the row's `avl` field)
  * `lowres`, `flex`, `select_all`: the pipeline's modes; flex encodes HR crops lazily (only those a selection
    touches), select_all encodes them all;
  * `naive_hd`: every HR token fed to the LLM as an ordinary input token: the prompt is text + the LR features
    + all G*G HR features (in that order, in the image's place) + text, with plain causal attention in every layer.
    Cost only: no weights are trained for it. With A-VL its cache treats every visual token (LR + HR) as visual.
  * A-VL rows: the call's cache is an `AVLCache` (default AVLSettings unless given), also handed to the FlexState
    (naive_hd: a "lowres" FlexState, so A-VL can hook in). Eviction follows the prefill's attention at each layer,
    so the KV bytes after prefill already show it; decoding steps attend to the kept text + core visual tokens
    (every `refresh_every`-th step: all kept visual). A-VL rows run right after the same mode's rows without A-VL
    and by default with 1 repeat and no warm-up of their own (A-VL changes decoding; the prefill is the same work
    plus A-VL's scoring). When A-VL rows run, every row decodes max(--decode-steps, 6, refresh_every + 1) greedy
    steps, so that decoding passes a refresh step and both variants decode the same number of steps.

What one mode's row (`ModeRow`) holds (one image, one question; per repeat the image caches are dropped, a cold
call):
  * `vision_s`: view making + vision tower + projector for the LR view and the HR crops the mode encodes;
  * `prefill_s`: the LLM forward over the prompt (lazy crop encoding inside it is counted as vision, not here);
  * `first_token_s`: both, image to first token; medians over `repeats` after `warmup` excluded calls;
  * `decode_ms_per_token`: median of greedy decoding steps after the last repeat's prefill (and their mean:
    A-VL's refresh steps cost more than its other steps);
  * `peak_memory_bytes`: on CUDA the rise of `torch.cuda.max_memory_allocated` over the call; on the CPU the rise
    of the process's resident-set high-water mark (Linux VmHWM, reset through /proc/self/clear_refs) over the
    call; weights already resident are not counted. None where neither is available;
  * `kv_cache_bytes`: bytes of the key/value tensors the cache holds after prefill (flex keeps no HR entries in the
    cache: its HR keys/values are recomputed from `hr_feature_bytes` of encoded HR features at each pass);
  * `kv_cache_bytes_end`: the same at the end of decoding; `kv_cache_bytes_full_cache_end`: what the cache would
    hold without eviction (A-VL rows; the same as `kv_cache_bytes_end` without A-VL); A-VL rows also give
    `kv_cache_bytes_per_layer_end` and `avl_settings` (None without A-VL);
  * `visual_attended_per_step`: visual cache entries (LR tokens; naive_hd: LR + HR) the decoding query attends
    to, per decoding step (mean over layers): all of them without A-VL, the core (refresh steps: all kept) with it;
  * `flops` (a cost.Flops: vision, projector, llm, hr_attention, avl_scoring, total): analytic, image to first
    token (vision + projector + LLM prefill + HR projections/attention; A-VL rows add `avl_scoring`, A-VL's own
    scoring of the last row where FlexAttention does not already compute it, 0 without A-VL), and
    `decode_flops_per_token`: the mean over the measured decoding steps, from the run's per-step HR counts and
    (A-VL) the keys each layer attended and scored (`cost.call_flops(..., avl_keys=...)`), by part in
    `decode_flops_per_token_parts` (vision and projector 0); `flops_at_measured_depth`: the total at the depth run.
Ratios of each mode to naive_hd and to lowres (`ModeRatios`) are taken within one (model, zoom, A-VL) `Group`; A-VL
against no A-VL per mode (`AVLRatios`: KV bytes after prefill and at the end, decode time, decode FLOPs, visual
tokens attended per step) are in `avl_comparison` (and `avl_ratios` for the main model and zoom). `FollowupRow`: a
cold question against a follow-up on the same image (cached features, reused prompt prefix); `LazyRow`: lazy
against eager HR encoding (crops encoded, identical outputs).

`run` returns a `BenchResult`; `BenchResult.to_json()` is the JSON `--json` prints: top-level `ratios[mode]`
(`flops_vs_naive_hd`, `flops_vs_lowres`, `prefill_time_vs_*`, `first_token_time_vs_*`), `avl_ratios[mode]`
(`kv_ratio`, `decode_time_ratio`, ...; null without both A-VL variants), `followup_speedup`, `runs` (the rows),
`groups`, `avl_comparison`, `followup`, `lazy_hr`, `models`, `main`, `targets` (name -> value, target, met).

On CUDA: bfloat16 and CUDA events; absolute times are reported as such. On the CPU the ratios are the result;
absolute times are CPU wall-clock seconds, printed and labelled as such.

The command line (flexattn.cli, which owns the options) runs, in this order:

    zooms = bench.parse_zooms(args.zoom)
    names = bench.parse_list(args.model)
    modes = flexattn.settings.parse_modes(args.modes, COST_MODES)
    center = bench.parse_center(args.planted_center)
    bench.check_run_options(repeats=args.repeats, warmup=args.warmup, decode_steps=args.decode_steps,
                            followup_tokens=args.followup_tokens, avl_repeats=args.avl_repeats,
                            avl_warmup=args.avl_warmup)
    variants = bench.AVL_CHOICES[args.avl]                      # "off" | "on" | "both"
    avl = AVLSettings(...) if args.avl != "off" else None      # from the A-VL options
    models = bench.build_models(names, depth_divisor=args.depth_divisor, planted_share=args.planted_share,
                                planted_center=center, device=args.device, dtype=dtype,
                                lazy_samples=args.lazy_samples)  # checks its options before building
    result = bench.run(models, zooms, repeats=args.repeats, warmup=args.warmup, decode_steps=args.decode_steps,
                       followup_tokens=args.followup_tokens, modes=modes, naive_max_zoom=args.naive_max_zoom,
                       avl_variants=variants, avl_settings=avl, avl_repeats=args.avl_repeats,
                       avl_warmup=args.avl_warmup)
    if args.html: bench.write_chart(result, args.html)
    print(json.dumps(result.to_json()) if args.json else bench.format_report(result))

Bad values raise ValueError (ModelLoadError for a model that cannot be loaded).
"""

from .measure import (AVL_CHOICES, AVL_VARIANTS, MAIN_ZOOM, Clock, ColdCall, PeakMemory, check_run_options,
                      cold_call, measure_followup, measure_lazy, measure_mode, run)
from .models import (FOLLOW_UP, QUESTION, BenchModel, PlantedInfo, benchmark_sample, build_models, crops_range,
                     crops_touched, parse_center, parse_list, parse_zooms, planted_info, planted_region,
                     seven_b_shaped)
from .report import format_report, write_chart
from .results import (TARGETS, AVLComparison, AVLRatios, BenchResult, FollowupRow, Group, LazyRow, LazySample,
                      MainGroup, ModeRatios, ModelInfo, ModeRow, Target, avl_ratios, check_targets, ratios)

__all__ = [
    "AVL_CHOICES", "AVL_VARIANTS", "FOLLOW_UP", "MAIN_ZOOM", "QUESTION", "TARGETS",
    "AVLComparison", "AVLRatios", "BenchModel", "BenchResult", "Clock", "ColdCall", "FollowupRow", "Group",
    "LazyRow", "LazySample", "MainGroup", "ModeRatios", "ModeRow", "ModelInfo", "PeakMemory", "PlantedInfo",
    "Target",
    "avl_ratios", "benchmark_sample", "build_models", "check_run_options", "check_targets", "cold_call",
    "crops_range", "crops_touched", "format_report", "measure_followup", "measure_lazy", "measure_mode",
    "parse_center", "parse_list", "parse_zooms", "planted_info", "planted_region", "ratios", "run",
    "seven_b_shaped", "write_chart",
]
