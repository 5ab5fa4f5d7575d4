"""The profile report as one self-contained HTML page: tables plus inline SVG charts drawn here (no scripts, no CDN).

Charts: the memory breakdown (planned vs measured, stacked bars) and time per op type for the train step and for
inference (horizontal bars). Every section says whether its numbers are MEASURED here or a PROJECTION.
"""

from __future__ import annotations

from html import escape
from typing import Any

__all__ = ["render_html"]

PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f",
           "#bab0ac", "#86bcb6", "#d37295"]
_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1120px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #ddd;padding:4px 8px}
th{background:#f3f3f3;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
.tag{display:inline-block;font-size:11px;font-weight:bold;padding:2px 6px;border-radius:3px;margin-right:6px}
.measured{background:#d9f2d9;color:#1b5e20} .projection{background:#fde2c8;color:#8a4b00}
.planned{background:#dde7f7;color:#1a3d7c} .note{font-size:12px;color:#555} svg text{font-family:inherit}
"""


def _mb(value: float | None) -> str:
    return "—" if value is None else f"{value / 2**20:,.2f} MB"


def _ms(value: float | None) -> str:
    return "—" if value is None else (f"{value:,.3f} ms" if value < 10 else f"{value:,.1f} ms")


def _tag(kind: str) -> str:
    return f'<span class="tag {kind}">{kind.upper()}</span>'


def _table(headers: list[str], rows: list[list[str]], numeric: tuple[int, ...] = ()) -> str:
    """An HTML table; cells are already escaped; columns listed in `numeric` are right-aligned."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def bar_chart_svg(items: list[tuple[str, float]], title: str, unit: str, width: int = 900) -> str:
    """Horizontal bars, one per (label, value), longest first as given, with the value printed at the bar's end."""
    label_w, bar_h, gap, top = 230, 20, 6, 28
    height = top + len(items) * (bar_h + gap) + 10
    peak = max((v for _, v in items), default=0) or 1.0
    span = width - label_w - 110
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><text x="0" y="16" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, (label, value) in enumerate(items):
        y = top + i * (bar_h + gap)
        w = max(1.0, span * value / peak)
        parts.append(f'<text x="{label_w - 8}" y="{y + 14}" font-size="12" text-anchor="end">{escape(label)}</text>'
                     f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{PALETTE[i % len(PALETTE)]}"/>'
                     f'<text x="{label_w + w + 6:.1f}" y="{y + 14}" font-size="12">{value:,.1f} {escape(unit)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def stacked_bars_svg(bars: list[tuple[str, list[tuple[str, float]]]], title: str, width: int = 900) -> str:
    """One horizontal stacked bar per (label, segments) on a shared MB scale, with a legend of segment names."""
    label_w, bar_h, gap, top = 150, 34, 16, 30
    names: list[str] = []
    for _, segments in bars:
        names += [n for n, _ in segments if n not in names]
    color = {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(names)}
    total = max((sum(v for _, v in segs) for _, segs in bars), default=0) or 1.0
    span = width - label_w - 120
    legend_y = top + len(bars) * (bar_h + gap) + 6
    height = legend_y + 20 * ((len(names) + 1) // 2) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{escape(title)}"><text x="0" y="16" font-size="14" font-weight="bold">{escape(title)}</text>']
    for i, (label, segments) in enumerate(bars):
        y = top + i * (bar_h + gap)
        x = float(label_w)
        parts.append(f'<text x="{label_w - 8}" y="{y + 21}" font-size="13" text-anchor="end">{escape(label)}</text>')
        for name, value in segments:
            w = span * value / total
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{max(w, 0.5):.1f}" height="{bar_h}" fill="{color[name]}">'
                         f'<title>{escape(name)}: {value / 2**20:,.2f} MB</title></rect>')
            x += w
        parts.append(f'<text x="{x + 6:.1f}" y="{y + 21}" font-size="12">'
                     f'{sum(v for _, v in segments) / 2**20:,.1f} MB</text>')
    for i, name in enumerate(names):
        lx, ly = (i % 2) * (width // 2), legend_y + (i // 2) * 20
        parts.append(f'<rect x="{lx}" y="{ly}" width="12" height="12" fill="{color[name]}"/>'
                     f'<text x="{lx + 18}" y="{ly + 11}" font-size="12">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _memory_section(report: dict[str, Any]) -> str:
    mem, rss = report["memory"], report["measured"]["rss"]
    plan = mem["planned"]
    baseline = rss["rss_imports"]
    planned = [("runtime baseline (measured)", baseline),
               ("frozen weights + constants", plan["frozen_weights"] + plan["graph_constants"]),
               ("trainable x2", plan["trainable_in_step"]), ("optimizer state x2", plan["optimizer_state_in_step"]),
               ("activations (peak live)", plan["activations_peak_live"])]
    measured = [("runtime baseline (measured)", baseline),
                ("train-step session", rss["rss_train_session"] - baseline),
                ("growth during train steps", rss["rss_after_train"] - rss["rss_train_session"]),
                ("inference session", rss["rss_infer_session"] - rss["rss_after_train"]),
                ("rest up to peak", max(0, rss["peak_rss"] - rss["rss_infer_session"]))]
    chart = stacked_bars_svg([("planned", planned), ("measured (RSS)", measured)],
                             "Memory breakdown: planned vs measured peak")
    rows = [[escape(r["item"]), _mb(r["planned"]), _mb(r["measured"]), escape(r["how"])] for r in mem["rows"]]
    rows.append(["<b>peak</b>", _mb(mem["planned_peak_with_baseline"]),
                 f"{_mb(mem['measured_peak'])} ({escape(mem['measured_peak_source'])})",
                 "planned: baseline + plan; measured: VmHWM of the child"])
    return (f"<h2>Memory {_tag('planned')}{_tag('measured')}</h2>{chart}"
            + _table(["item", "planned", "measured", "how"], rows, numeric=(1, 2)))


def _ops_section(report: dict[str, Any]) -> str:
    if not report.get("ops"):
        return ""
    out = [f"<h2>Time by op type {_tag('measured')}</h2><p class='note'>onnxruntime profiler, median kernel time "
           "per node over the timed runs, summed per op type (the profiler adds its own overhead per run).</p>"]
    for graph in ("train_step", "infer"):
        ops = report["ops"][graph]
        items = [(f"{o['op_type']} ({o['nodes']})", o["us_per_run"]) for o in ops["by_op_type"]]
        out.append(bar_chart_svg(items, f"{graph}: µs per run by op type (node count)", "µs"))
        out.append(_table(["node", "op", "µs/run", "share"],
                          [[escape(n["node"]), escape(n["op_type"]), f"{n['us_per_run']:,.0f}",
                            f"{100 * n['share']:.1f}%"] for n in ops["top_nodes"]], numeric=(2, 3)))
    return "".join(out)


def _npu_section(report: dict[str, Any]) -> str:
    npu = report.get("npu")
    if not npu or not npu.get("paths"):
        return f"<h2>NPU report</h2><p class='note'>{escape(npu.get('note', 'not run') if npu else 'not run')}</p>"
    rows = []
    for ep, entry in npu["paths"].items():
        for graph in ("infer", "train_step"):
            g = entry[graph]
            fallback = ", ".join(f"{op}×{n}" for op, n in list(g["cpu_fallback_ops"].items())[:6]) or "none"
            rows.append([escape(entry["name"]), graph, f"{g['ep_nodes']}/{g['nodes']}", f"{100 * g['coverage']:.0f}%",
                         str(g["partitions"]), escape(g["suitability"]), escape(fallback)])
    return (f"<h2>NPU paths (op coverage analysis, not a measurement)</h2><p class='note'>{escape(npu['method'])}</p>"
            + _table(["path", "graph", "EP nodes", "coverage", "partitions", "ORT verdict", "falls back to CPU"],
                     rows, numeric=(2, 3, 4)))


def render_html(report: dict[str, Any]) -> str:
    """The whole report page as a string."""
    m = report["measured"]
    lat_rows = [[g, _ms(m[g]["median_ms"]), _ms(m[g]["p90_ms"]), _ms(m[g]["min_ms"]),
                 _ms(report["compute"][g].get("host_compute_floor_ms")),
                 f"{report['compute'][g]['flops'] / 1e6:,.1f}"] for g in ("train_step", "infer")]
    projection = ""
    if report.get("projection"):
        p = report["projection"]
        projection = (f"<h2>Target {escape(p['profile']['name'])} {_tag('projection')}</h2><p class='note'>"
                      f"{escape(p['label'])}: max(FLOPs / {p['profile']['peak_fp32_gflops']} GFLOP/s, bytes / "
                      f"{p['profile']['memory_bandwidth_gbs']} GB/s). Peak RSS measured here is "
                      f"{100 * p['peak_rss_share_of_ram']:.1f}% of the target's RAM.</p>"
                      + _table(["graph", "roofline bound", "compute term", "memory term", "bound by",
                                "scaled by host efficiency"],
                               [[g, _ms(p[g]["projected_ms"]), _ms(p[g]["compute_ms"]), _ms(p[g]["memory_ms"]),
                                 p[g]["bound"], _ms(p[g].get("scaled_ms"))] for g in ("train_step", "infer")],
                               numeric=(1, 2, 3, 5))
                      + f"<p class='note'>{escape(p['scaled_label'])}</p>")
    host = report["host"]
    s = report["settings"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>edgepeft profile: {escape(report['model']['id'])}</title>
<style>{_CSS}</style></head><body>
<h1>edgepeft profile — {escape(report['model']['id'])} ({escape(', '.join(report['methods']))})</h1>
<p class="note">bundle {escape(report['bundle'])} · id {escape(report['bundle_id'][:16])} · batch {s['batch_size']} ·
seq {s['seq_len']} · {s['steps']} timed steps after {s['warmup']} warm-up · host {escape(host['machine'])},
{host['cpu_count']} CPUs, onnxruntime {escape(str(host['onnxruntime']))} · target {escape(str(report['target']))}</p>
<h2>Latency {_tag('measured')}</h2><p class="note">{escape(m['label'])}. Loss {m['loss_first']:.4f} →
{m['loss_last']:.4f} over the measured steps. Host compute floor = matmul FLOPs / measured GEMM throughput
({(host['host_gemm_gflops'] or 0):,.0f} GFLOP/s).</p>
{_table(["graph", "median", "p90", "min", "host compute floor", "MFLOPs/run"], lat_rows, numeric=(1, 2, 3, 4, 5))}
{projection}
{_memory_section(report)}
{_ops_section(report)}
{_npu_section(report)}
</body></html>
"""
