"""Markdown tables of the benchmark tools (tools/benchmark.py, tools/compare_maskrcnn.py)."""

import math
from typing import Dict, Optional

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def _fmt(v, digits=3) -> str:
    """``v`` with ``digits`` decimals; a dash for a missing or NaN value."""
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _rss(r: Dict) -> Optional[float]:
    """The per-call peak RSS increase, or the process peak where the kernel cannot reset the
    high-water mark."""
    return r["peak_rss_increase_mb"] if r["peak_rss_increase_mb"] is not None else r["peak_rss_mb"]


def benchmark_report(result: Dict) -> str:
    """The markdown table of ``tools/benchmark.py``."""
    s = result["settings"]
    lines = [
        f"Device: {result['machine']['device']}, {s['threads']} threads, AMP "
        f"{'on' if s['amp'] else 'off'}; "
        f"load average (1/5/15 min) before {result['machine']['load_before']}, after "
        f"{result['machine']['load_after']}.",
        "",
    ]
    sizes = s["sizes"]
    header = ["model", "params"] + [f"latency {z}² median / p90 (s)" for z in sizes]
    header += [f"CPU s/call {sizes[0]}²"]
    header += [f"img/s b{b} @{sizes[0]}²" for b in s["batch_sizes"]]
    if not s["no_train"]:
        header += [
            f"train step b{s['train_batch']} @{s['train_size'] or sizes[0]}² median / p90 (s)"
        ]
    header += [f"peak RSS +MB infer @{sizes[0]}²", "detections"]
    if not s["no_train"]:
        header.insert(len(header) - 1, "peak RSS +MB train")
    if s["device"].startswith("cuda"):
        header.insert(len(header) - 1, f"CUDA max alloc MB infer @{sizes[0]}²")
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, m in result["models"].items():
        inf = m["inference"]
        row = [name, f"{m['params'] / 1e6:.1f}M"]
        row += [f"{_fmt(inf[str(z)]['median_s'])} / {_fmt(inf[str(z)]['p90_s'])}" for z in sizes]
        row += [_fmt(inf[str(sizes[0])].get("cpu_median_s"))]
        row += [_fmt(m["throughput"][str(b)]["images_per_s"], 2) for b in s["batch_sizes"]]
        first = inf[str(sizes[0])]
        if not s["no_train"] and "train" not in m:  # an exported model: inference only
            row += ["—"]
        elif not s["no_train"]:
            t = m["train"]
            row += [
                f"{_fmt(t['median_s'])} / {_fmt(t['p90_s'])} (fwd "
                f"{_fmt(t['forward_s_median'], 2)}, "
                f"bwd {_fmt(t['backward_s_median'], 2)}, opt {_fmt(t['optimizer_s_median'], 2)})"
            ]
        row += [_fmt(_rss(first), 0)]
        if not s["no_train"]:
            row += [_fmt(_rss(m["train"]), 0) if "train" in m else "—"]
        if s["device"].startswith("cuda"):
            row += [_fmt(first["cuda_max_allocated_mb"], 0)]
        counts = f"{first['detections']}"
        if "proposals" in first:
            counts += f" ({first['proposals']} proposals, {first['mask_head_rois']} mask-head RoIs)"
        row += [counts]
        lines.append("| " + " | ".join(row) + " |")
    if result.get("ratios"):
        lines.append("")
        for key, r in result["ratios"].items():
            lines.append(f"- {key}: {r:.2f}")
    for w in result.get("warnings", []):
        lines.append(f"- WARNING: {w}")
    return "\n".join(lines)


def profile_report(name: str, prof: Dict) -> str:
    """One torch.profiler table per phase (``tools/benchmark.py --profile``)."""
    lines = []
    for phase, t in prof.items():
        lines.append(
            f"\n### {name}: {phase} (torch.profiler, total self CPU {t['total_self_cpu_ms']:.0f} "
            "ms)\n"
        )
        if t["ranges"]:
            lines.append(
                "ranges (module:: = forward of a child module): "
                + ", ".join(f"{m['range']} {m['cpu_ms']:.0f} ms" for m in t["ranges"])
            )
            lines.append("")
        lines += ["| op | self CPU ms | share | calls |", "|---|---|---|---|"]
        lines += [
            f"| {o['op']} | {o['self_cpu_ms']:.1f} | {100 * o['share']:.1f} % | {o['calls']} |"
            for o in t["top_ops"]
        ]
    return "\n".join(lines)


def comparison_report(result: Dict) -> str:
    """The side-by-side table of ``tools/compare_maskrcnn.py``."""
    s = result["settings"]
    budget = "equal training time" if s.get("equal_time") else "equal images seen"
    lines = [
        f"{budget}, batch {s['batch']}, from scratch; train {s['train']}, test {s['test']} "
        f"(COCOEvaluator segm, max {s['max_dets']} detections; matching F1 at IoU 0.5 of the "
        f"detections scoring >= 0.5); device {s['device']}.",
        "",
        "| model | backbone | params | iterations | images seen | train time (s) | train+eval (s) "
        "| " + " | ".join(METRICS) + " | F1@0.5 | pred/true |",
        "|" + "---|" * (8 + len(METRICS)),
    ]
    for key in ("iaunet", "mask_rcnn"):
        r = result[key]
        lines.append(
            f"| {r['name']} | {r['backbone']} | {r['params'] / 1e6:.1f}M | {r['iterations']} | "
            f"{r['images_seen']} | {r['train_time_s']:.0f} | {r['train_and_eval_time_s']:.0f} | "
            + " | ".join(_fmt(r["segm"].get(m), 1) for m in METRICS)
            + f" | {_fmt(r['matching'].get('F1@0.5'), 1)} | "
            f"{r['matching'].get('count_ratio', float('nan')):.2f} |"
        )
    return "\n".join(lines)
