"""A BenchResult as text tables (`format_report`) and as a self-contained plotly chart (`write_chart`)."""

from __future__ import annotations

import statistics
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..cost import Flops
from ..settings import COST_MODES
from .results import BenchResult, Group, ModelInfo, ModeRow


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _scale(value: float) -> tuple[float, str]:
    return next((x for x in ((1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs")) if value >= x[0]), (1.0, "FLOPs"))


def _mib(value) -> str:
    return _fmt(None if value is None else value / 2**20, ".1f")


def _in(flops: Flops | None, part: str, scale: float):
    return None if flops is None else getattr(flops, part) / scale


def _prefill_table(result: BenchResult, m: ModelInfo, group: Group, rows: list[ModeRow], unit: str) -> list[str]:
    side = m.lowres_size * group.zoom
    own_repeats = (result.avl_repeats, result.avl_warmup) != (result.repeats, result.warmup)
    lines = ["", f"zoom {group.zoom} (HR {side} px, {rows[0].hr_tokens} HR tokens), A-VL {'on' if group.avl else 'off'}"
                 + (f" ({result.avl_repeats} repeat(s), {result.avl_warmup} warm-up: A-VL rows run right after "
                    "the same mode without A-VL)" if group.avl and own_repeats else "")]
    scale, unit_f = _scale(max(r.flops.total if r.flops is not None else 0 for r in rows))
    lines.append(f"FLOPs in {unit_f}" + (" (full-depth model)" if m.scaled_cost else "")
                 + ("; A-VL: its own scoring of the last row" if group.avl else ""))
    header = (f"{'mode':<11}{'LLM tok':>8}{'crops':>6}{'HR att':>7} | {'vision':>7}{'proj':>7}{'LLM':>8}"
              f"{'HR':>7}{'A-VL':>7}{'total':>8}{'/naive':>7}{'/lowres':>8} | {'prefill ' + unit:>12}{'/naive':>7}"
              f"{'/lowres':>8}{'1st tok':>8}{'/naive':>7} | {'dec ms/t':>9}{'peak MiB':>9}{'KV MiB':>8}")
    lines += [header, "-" * len(header)]
    for r in rows:
        f, q = r.flops, group.ratios[r.mode]
        avl_scoring = _in(f, "avl_scoring", scale) if group.avl else None  # rows without A-VL: none to show
        lines.append(
            f"{r.mode:<11}{r.llm_tokens:>8}{r.hr_crops_encoded:>6}{r.hr_attended_mean:>7.0f} | "
            f"{_fmt(_in(f, 'vision', scale), '.2f'):>7}{_fmt(_in(f, 'projector', scale), '.3f'):>7}"
            f"{_fmt(_in(f, 'llm', scale), '.2f'):>8}{_fmt(_in(f, 'hr_attention', scale), '.3f'):>7}"
            f"{_fmt(avl_scoring, '.3f'):>7}{_fmt(_in(f, 'total', scale), '.2f'):>8}"
            f"{_fmt(q.flops_vs_naive_hd, '.3f'):>7}{_fmt(q.flops_vs_lowres, '.2f'):>8} | "
            f"{_fmt(r.prefill_s, '.3f'):>12}{_fmt(q.prefill_time_vs_naive_hd, '.3f'):>7}"
            f"{_fmt(q.prefill_time_vs_lowres, '.2f'):>8}{_fmt(r.first_token_s, '.2f'):>8}"
            f"{_fmt(q.first_token_time_vs_naive_hd, '.3f'):>7} | "
            f"{_fmt(r.decode_ms_per_token, '.1f'):>9}"
            f"{_fmt(None if r.peak_memory_bytes is None else r.peak_memory_bytes / 2**20, '.0f'):>9}"
            f"{_mib(r.kv_cache_bytes):>8}"
            + ("" if r.measured else "   (not measured: --naive-max-zoom)")
        )
    return lines


def _decode_table(result: BenchResult, m: ModelInfo, zoom: int) -> list[str]:
    """Decoding per mode, without and with A-VL, and A-VL's figures over the same mode's without it."""
    rows = result.rows(m.name, zoom)
    comparison = result.comparison(m.name, zoom)
    # scaled to the smallest: per-token figures differ by orders of magnitude (select_all recomputes HR keys)
    scale, unit_f = _scale(min((r.decode_flops_per_token for r in rows if r.decode_flops_per_token), default=0))
    depth = " (full-depth model)" if m.scaled_cost else ""
    lines = ["", f"decoding, zoom {zoom}: {result.decode_steps} greedy steps after the last repeat's prefill; KV "
                 f"MiB at measured depth; FLOPs per token in {unit_f}{depth}; visual = cache entries attended per "
                 "step (LR; naive_hd LR + HR), mean over layers; /off = A-VL on over off, same mode"]
    header = (f"{'mode':<11}{'A-VL':>5} | {'KV MiB':>7}{'KV end':>8}{'/off':>7}{'/off pre':>9} | {'ms/t med':>9}"
              f"{'/off':>7}{'ms/t mean':>10}{'/off':>7} | {'dec ' + unit_f[:-1] + '/t':>11}{'A-VL':>7}{'/off':>7} | "
              f"{'visual':>8}{'/off':>7}  per step")
    lines += [header, "-" * len(header)]
    for mode in COST_MODES:
        for r in (x for x in rows if x.mode == mode):
            q = comparison.ratios.get(mode) if r.avl and comparison is not None else None

            def ratio(name: str):
                return None if q is None else getattr(q, name)

            per_step = " ".join(f"{v:.0f}" for v in r.visual_attended_per_step)
            dec = None if r.decode_flops_per_token is None else r.decode_flops_per_token / scale
            parts = r.decode_flops_per_token_parts
            avl_scoring = parts.avl_scoring / scale if parts is not None and r.avl else None
            lines.append(
                f"{mode:<11}{'on' if r.avl else 'off':>5} | {_mib(r.kv_cache_bytes):>7}"
                f"{_mib(r.kv_cache_bytes_end):>8}{_fmt(ratio('kv_ratio'), '.3f', ''):>7}"
                f"{_fmt(ratio('kv_ratio_after_prefill'), '.3f', ''):>9} | "
                f"{_fmt(r.decode_ms_per_token, '.1f'):>9}{_fmt(ratio('decode_time_ratio'), '.3f', ''):>7}"
                f"{_fmt(r.decode_ms_per_token_mean, '.1f'):>10}"
                f"{_fmt(ratio('decode_time_ratio_mean'), '.3f', ''):>7} | "
                f"{_fmt(dec, '.1f'):>11}{_fmt(avl_scoring, '.2f', ''):>7}"
                f"{_fmt(ratio('decode_flops_ratio'), '.3f', ''):>7} | "
                f"{_fmt(r.visual_attended_mean, '.0f'):>8}{_fmt(ratio('visual_attended_ratio'), '.3f', ''):>7}"
                f"  {per_step}" + ("" if r.measured else "   (not measured: --naive-max-zoom)")
            )
    return lines


def _model_lines(result: BenchResult, m: ModelInfo, unit: str) -> list[str]:
    lines = ["", f"== {m.name} ({m.dtype}): {m.description} =="]
    for zoom, info in m.planted.items():
        low, high = info.crops_touched_any_placement
        lines.append(f"   zoom {zoom}: planted selection {info.side}x{info.side} = {info.tokens} of {info.hr_tokens} "
                     f"HR tokens ({info.share:.1%}; --planted-share {info.share_requested:g}), centre "
                     f"{tuple(info.center)}, touches {info.crops_touched} of {int(zoom) ** 2} crops (any placement: "
                     f"{low}-{high})")
    for zoom in sorted({g.zoom for g in result.groups if g.model == m.name}):
        for group in (g for g in result.groups if (g.model, g.zoom) == (m.name, zoom)):
            lines += _prefill_table(result, m, group, result.rows(m.name, zoom, group.avl), unit)
        lines += _decode_table(result, m, zoom)
        for fu in (x for x in result.followup if (x.model, x.zoom) == (m.name, zoom)):
            lines.append(
                f"follow-up question ({fu.mode}; end to end, to the first answer token): cold first "
                f"{fu.first_s:.3f} s, follow-up {fu.followup_s:.3f} s (features cached, {fu.prefix_tokens_reused} "
                f"of {fu.followup_prompt_tokens} prompt tokens reused) -> {fu.followup_speedup:.1f}x faster; whole "
                f"{fu.max_new_tokens}-token answers: {fu.first_full_s:.3f} s vs {fu.followup_full_s:.3f} s -> "
                f"{fu.followup_speedup_full_answer:.1f}x")
        for lz in (x for x in result.lazy_hr if (x.model, x.zoom) == (m.name, zoom)):
            vis_l = statistics.mean(s.vision_s_lazy for s in lz.per_sample)
            vis_e = statistics.mean(s.vision_s_eager for s in lz.per_sample)
            lines.append(
                f"lazy HR encoding (flex, {lz.samples} image(s)): {lz.crops_encoded_lazy_mean:g} of {lz.crops_total} "
                f"crops encoded on average (eager: {lz.crops_encoded_eager_mean:g}); outputs identical to eager: "
                f"{'yes' if lz.identical_outputs else 'NO'}; vision {vis_l:.3f} s vs {vis_e:.3f} s eager")
    return lines


def format_report(result: BenchResult) -> str:
    """The run as text: settings, per model the planted selections, per zoom a prefill table per A-VL variant and a
    decoding table, the follow-up and lazy-HR lines; then the targets and A-VL's ratios for the main group."""
    lines = [f"device: {result.device}; timing: {result.timing}",
             f"peak memory: {result.memory}; repeats {result.repeats} (median), warm-up {result.warmup} "
             f"excluded; decode: median of {result.decode_steps} greedy steps"
             + (f" (raised from --decode-steps {result.decode_steps_requested} so that A-VL decoding passes a "
                "refresh step; the same for rows without A-VL)"
                if result.decode_steps != result.decode_steps_requested else ""),
             "FLOPs: analytic, image to first token (vision + projector + LLM prefill + HR projections/attention)"]
    if result.avl is not None:
        a = result.avl
        lines.append(
            f"A-VL: vision_evict_rate {a.vision_evict_rate:g}, compute_skip_rate {a.compute_skip_rate:g}, "
            f"refresh_every {a.refresh_every}, text_evict_rate {a.text_evict_rate:g}, selection scored over "
            f"the {a.selection_scores} visual tokens; A-VL rows: {result.avl_repeats} repeat(s), "
            f"{result.avl_warmup} warm-up of their own (each runs right after the same mode without A-VL)")
    unit = "s" if "CUDA" in result.timing else "s CPU"
    for m in result.models:
        lines += _model_lines(result, m, unit)
    main = result.main
    note = "" if result.targets_apply else "; the targets are set for 7b-shaped: here for reference only"
    lines += ["", f"targets ({main.model}, zoom {main.zoom}, A-VL {'on' if main.avl else 'off'}{note}):"]
    for name, t in result.targets.items():
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t.met]
        shown = _fmt(t.value, ".3f") if isinstance(t.value, float) else str(t.value)
        lines.append(f"  {name:<32} {shown:>8}  (target {t.target}): {verdict}")
    if result.avl_ratios:
        lines += ["", f"A-VL over no A-VL ({main.model}, zoom {main.zoom}):"]
        for mode, q in result.avl_ratios.items():
            lines.append(
                f"  {mode:<11} KV bytes {_fmt(q.kv_ratio, '.3f')} "
                f"(after prefill {_fmt(q.kv_ratio_after_prefill, '.3f')}), decode time "
                f"{_fmt(q.decode_time_ratio, '.3f')} (median; mean {_fmt(q.decode_time_ratio_mean, '.3f')})"
                f", decode FLOPs {_fmt(q.decode_flops_ratio, '.3f')}, visual tokens attended "
                f"{_fmt(q.visual_attended_ratio, '.3f')}")
    lines.append(f"elapsed: {result.elapsed_s:.0f} s")
    return "\n".join(lines)


def write_chart(result: BenchResult, path: str | Path) -> Path:
    """Plotly chart: analytic FLOPs and measured prefill time against HR resolution, one line per model and mode
    (dashed: with A-VL), and decoding FLOPs per token; one self-contained HTML file."""
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        "analytic TFLOPs, image to first token", "measured prefill time (s)" +
        ("" if "CUDA" in result.timing else ", CPU wall-clock"), "analytic decoding GFLOPs per token"))
    several = len(result.models) > 1
    for m in result.models:
        for avl in result.avl_variants:
            for mode in COST_MODES:
                rows = sorted((r for r in result.runs if (r.model, r.mode, r.avl) == (m.name, mode, avl)),
                              key=lambda r: r.zoom)
                if not rows:
                    continue
                name = (f"{m.name} " if several else "") + mode + (" +A-VL" if avl else "")
                x = [m.lowres_size * r.zoom for r in rows]
                style = dict(mode="lines+markers", name=name, legendgroup=name, text=[f"zoom {r.zoom}" for r in rows],
                             line={"dash": "dash" if avl else None})
                flops = [float("nan") if r.flops is None else r.flops.total / 1e12 for r in rows]
                prefill = [r.prefill_s for r in rows]
                decode = [float("nan") if r.decode_flops_per_token is None else r.decode_flops_per_token / 1e9
                          for r in rows]
                fig.add_trace(go.Scatter(x=x, y=flops, **style), row=1, col=1)
                fig.add_trace(go.Scatter(x=x, y=prefill, showlegend=False, **style), row=1, col=2)
                fig.add_trace(go.Scatter(x=x, y=decode, showlegend=False, **style), row=1, col=3)
    for col in (1, 2, 3):
        fig.update_xaxes(title_text="HR side (px)", row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
    fig.update_layout(title=f"FlexAttention cost against resolution ({result.device}; main: {result.main.model})",
                      template="plotly_white")
    path = Path(path)
    fig.write_html(str(path), include_plotlyjs=True)  # self-contained: opens without network
    return path
