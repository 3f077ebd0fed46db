"""Tables, JSON and the plot for benchmark rows (plain dicts, see bench.__main__.run_row)."""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, List

MiB = 1 << 20
COLORS = {"eager (TRL)": "C0", "torch.compile": "C1", "Liger": "C2", "ours": "C3",
          "ours inplace_grad": "C4", "ours persistent": "C5"}


def _fmt(x, spec, missing="n/a"):
    return missing if x is None else format(x, spec)


def _shape(r):
    return f"{r['tokens']}x{r['V']} {r['dtype']}" if r["op"] != "advantages" \
        else f"{r['tokens']}x{r['group']}"


def full_table(rows: List[dict]) -> str:
    """One line per (op, shape, implementation)."""
    from tabulate import tabulate
    cpu = any(r.get("cpu_time_ms") is not None for r in rows)
    out = []
    for r in rows:
        out.append([r["op"], _shape(r), r["impl"],
                    _fmt(r.get("median_ms"), ".3f", r.get("status", "n/a"))]
                   + ([_fmt(r.get("cpu_time_ms"), ".1f", "")] if cpu else [])
                   + [_fmt(None if r.get("peak_extra_bytes") is None
                           else r["peak_extra_bytes"] / MiB, ".1f"),
                      f"{r['floor_bytes'] / MiB:.1f}",
                      _fmt(r.get("gbps"), ".1f"), _fmt(r.get("pct_copy_bw"), ".0f"),
                      _fmt(r.get("ours_speedup"), ".2f", ""),
                      _fmt(r.get("ours_mem_ratio"), ".2f", "")])
    head = (["op", "shape", "implementation", "median ms"] + (["CPU-time ms"] if cpu else [])
            + ["peak extra MiB", "floor MiB", "GB/s (floor)", "% copy BW", "ours x faster",
               "ours mem / its mem"])
    return tabulate(out, headers=head, tablefmt="github", disable_numparse=True)


def short_table(rows: List[dict]) -> str:
    """One line per (op, shape): ours against each baseline."""
    from tabulate import tabulate
    by = {}
    for r in rows:
        by.setdefault((r["op"], _shape(r)), {})[r["impl"]] = r
    out = []
    for (op, shape), impls in by.items():
        ours = impls.get("ours", {})
        line = [op, shape, _fmt(ours.get("median_ms"), ".3f", ours.get("status", "n/a")),
                _fmt(ours.get("pct_copy_bw"), ".0f")]
        for base in ("eager (TRL)", "torch.compile", "Liger"):
            b = impls.get(base)
            line.append("" if b is None else _fmt(b.get("ours_speedup"), ".2f",
                                                   (b.get("status") or "n/a").split(" (")[0]))
        inpl = impls.get("ours inplace_grad")
        line.append("" if inpl is None or inpl.get("peak_extra_bytes") is None else
                    f"{100 * inpl['peak_extra_bytes'] / max(inpl['logits_bytes'], 1):.1f}")
        pers = impls.get("ours persistent")      # the launch-grid variant, where it ran
        line.append("" if pers is None or pers.get("median_ms") is None else
                    f"{pers['median_ms']:.3f} ({_fmt(pers.get('pct_copy_bw'), '.0f')}%)")
        out.append(line)
    head = ["op", "shape", "ours ms", "% copy BW", "x vs eager", "x vs compile", "x vs Liger",
            "inplace extra mem % of logits", "persistent grid ms (% BW)"]
    return tabulate(out, headers=head, tablefmt="github", disable_numparse=True)


def check_table(results: Iterable) -> str:
    from tabulate import tabulate
    out = []
    for c in results:
        status = "n/a" if c.ok is None else ("PASS" if c.ok else "FAIL")
        errs = ", ".join(f"{k} {v:.1e}" for k, v in c.errors.items())
        tol = "" if c.tolerance is None else f"{c.tolerance:.0e}"
        out.append([c.op, c.impl, c.dtype, status, errs, tol, c.note])
    return tabulate(out, headers=["op", "implementation", "dtype", "vs float64 ref",
                                  "rel. error", "bound", "note"], tablefmt="github",
                    disable_numparse=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=str)


def plot(rows: List[dict], path: str, title: str) -> bool:
    """Time and peak extra memory against V, one line per implementation, a row per op
    (at the largest token count of the run). False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ops = [op for op in dict.fromkeys(r["op"] for r in rows) if op != "advantages"]
    if not ops:
        return False
    fig, axes = plt.subplots(len(ops), 2, figsize=(11, 3.2 * len(ops)), squeeze=False)
    for i, op in enumerate(ops):
        sel = [r for r in rows if r["op"] == op and r.get("median_ms") is not None]
        if not sel:
            continue
        tokens = max(r["tokens"] for r in sel)
        for impl in dict.fromkeys(r["impl"] for r in sel):
            pts = sorted((r["V"], r["median_ms"], r.get("peak_extra_bytes"))
                         for r in sel if r["impl"] == impl and r["tokens"] == tokens)
            if not pts:
                continue
            vs = [p[0] for p in pts]
            color = COLORS.get(impl)
            axes[i][0].plot(vs, [p[1] for p in pts], marker="o", label=impl, color=color)
            mem = [(p[0], p[2] / MiB) for p in pts if p[2] is not None]
            if mem:
                axes[i][1].plot([m[0] for m in mem], [m[1] for m in mem], marker="o",
                                label=impl, color=color)
        axes[i][0].set_title(f"{op}: median time, {tokens} tokens")
        axes[i][1].set_title(f"{op}: peak extra memory, {tokens} tokens")
        axes[i][0].set_ylabel("ms")
        axes[i][1].set_ylabel("MiB")
        for ax in axes[i]:
            ax.set_xlabel("vocabulary V")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        axes[i][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def summarize(folder: str) -> str:
    """The short summary gpu_check.sh prints last: checks, the >2^31 spot check, short table,
    from the newest results JSON in ``folder`` (a partial one if the sweep was cut off)."""
    import glob
    runs, others = [], []
    for path in sorted(glob.glob(os.path.join(folder, "*.json")), key=os.path.getmtime):
        try:
            with open(path) as f:
                content = json.load(f)
        except (OSError, ValueError):
            continue
        is_run = isinstance(content, dict) and "rows" in content and "copy_bandwidth_gbs" in content
        (runs if is_run else others).append((path, content))
    extra = []
    for path, content in others:      # other checks' files (big_tensor_check, memory_linear)
        if isinstance(content, dict):
            flags = {k: content[k] for k in ("ok", "passed", "status", "targets_met")
                     if k in content}
            extra.append(f"{os.path.basename(path)}: {flags or 'written'}")
    if not runs:
        return "\n".join(extra + [f"no python -m bench results JSON in {folder}"])
    path, data = runs[-1]
    checks = data.get("checks") or []
    failed = [f"{c['op']}/{c['impl']}/{c['dtype']}" for c in checks if c.get("ok") is False]
    lines = [f"results: {path}" + ("  (PARTIAL: the sweep was cut off)" if "partial" in path
                                   else ""),
             f"device: {data.get('device')}  torch {data.get('torch')}  triton "
             f"{data.get('triton')}  copy bandwidth {data.get('copy_bandwidth_gbs', 0):.0f} GB/s",
             f"correctness vs float64: {len(checks) - len(failed)}/{len(checks)} ok"
             + (f"; FAILED: {', '.join(failed)}" if failed else "")]
    if data.get("big_spot_check"):
        lines.append(f">2^31-element logits: {data['big_spot_check']}")
    lines.extend(extra)
    lines.append(short_table(data.get("rows", [])))
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else "bench/results"))
