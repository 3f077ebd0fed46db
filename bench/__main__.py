"""``python -m bench`` / ``hapo-bench``: ours against the baselines users would pick.

Every row: median time, peak memory above the inputs, the op's byte floor (docs/design.md section
10), the GB/s that floor implies, its share of the copy bandwidth measured in this run, and
how much faster ours is than that row. See bench/timing.py for how time and memory are
measured on each device, bench/ops.py for what each op does and its byte floor.

    python -m bench --quick            # CPU: correctness table + a small timing table, < 2 min
    python -m bench                    # CPU defaults, or the GPU sweep on CUDA
    python -m bench --device cuda --json out.json --out-dir $OUT
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time

import torch

from hapo.cli import THREADS_HELP, default_threads, positive_int

from . import ops, report, timing

GPU_TOKENS, GPU_VOCAB = [4096, 16384], [32768, 151936]
CPU_TOKENS, CPU_VOCAB = [1024], [8192, 32768]
QUICK_TOKENS, QUICK_VOCAB = [256], [2048, 8192]
SEQ_LEN = 1024                   # tokens = B * SEQ_LEN (fewer tokens: one sequence)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="hapo-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small CPU run with the correctness "
                   "check (under 2 minutes on 2 cores)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="logits dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--tokens", type=positive_int, nargs="+", help="token counts N = B*T")
    p.add_argument("--vocab", type=positive_int, nargs="+", help="vocabulary sizes V")
    p.add_argument("--seq-len", type=positive_int, default=SEQ_LEN)
    p.add_argument("--ops", nargs="+", choices=list(ops.OPS), default=list(ops.OPS))
    p.add_argument("--compile", nargs="*", default=None, metavar="OP",
                   help="ops to run the torch.compile baseline for (default: all; --quick: "
                        "loss_token only; give no OP to skip it)")
    p.add_argument("--compile-at", choices=["all", "largest"], default=None,
                   help="shapes for the torch.compile baseline: every one (default), or only "
                        "the largest (default in --quick): a new shape can mean a recompile "
                        "of 30-60 s")
    p.add_argument("--threads", type=positive_int, default=None, help=THREADS_HELP)
    p.add_argument("--reps", type=positive_int, default=None, help="CPU repeats per row")
    p.add_argument("--max-seconds", type=float, default=None, help="time budget per row")
    p.add_argument("--check", dest="check", action="store_true", default=None,
                   help="correctness table against the float64 reference (default in --quick)")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--out-dir", default=os.environ.get("OUT") or os.path.join("out", "bench"),
                   help="where <device>-<date>.json/.png go (default $OUT or out/bench)")
    p.add_argument("--no-save", action="store_true", help="don't write into --out-dir")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--short", action="store_true", help="print the short table last")
    return p.parse_args(argv)


def settings(args):
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device")
    gpu = device == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu
                                                           else torch.float32)
    if args.quick:
        tokens, vocab = QUICK_TOKENS, QUICK_VOCAB
    else:
        tokens, vocab = (GPU_TOKENS, GPU_VOCAB) if gpu else (CPU_TOKENS, CPU_VOCAB)
    tokens, vocab = args.tokens or tokens, args.vocab or vocab
    compile_ops = args.compile
    if compile_ops is None:
        compile_ops = ["loss_token"] if args.quick else list(ops.OPS)
    return dict(device=device, dtype=dtype, tokens=tokens, vocab=vocab,
                compile_ops=set(compile_ops),
                compile_at=args.compile_at or ("largest" if args.quick else "all"),
                check=args.quick if args.check is None else args.check,
                reps=args.reps or (5 if args.quick else 10),
                max_seconds=args.max_seconds or (1.0 if args.quick else 5.0))


def batch_shape(tokens: int, seq_len: int):
    T = min(seq_len, tokens)
    if tokens % T:
        raise SystemExit(f"--tokens {tokens} is not a multiple of --seq-len {T}")
    return tokens // T, T


# --------------------------------------------------------------------------- one row
def run_row(op, impl, fn, B, T, V, cfg, copy_bw):
    """Time and measure one implementation; returns the row dict (status 'ok' or why not)."""
    device, dtype = cfg["device"], cfg["dtype"]
    row = dict(op=op, impl=impl.name, kind=impl.kind, device=device,
               dtype=str(dtype).replace("torch.", ""), B=B, T=T, V=V, tokens=B * T,
               group=ops.GROUP, floor_bytes=ops.floor_bytes(op, B, T, V, dtype),
               logits_bytes=B * (T + 1) * V * torch.empty((), dtype=dtype).element_size(),
               median_ms=None, peak_extra_bytes=None, status="ok")
    sets = []
    try:
        one = ops.make_inputs(op, B, T, V, dtype, device, seed=0, shifted=impl.shifted)
        row["input_bytes"] = ops.input_bytes(one)
        budget = None
        if device == "cuda":
            free, _total = torch.cuda.mem_get_info()
            budget = free // 4
        n = timing.rotation_count(row["input_bytes"], device, budget_bytes=budget)
        sets = [one] + [ops.make_inputs(op, B, T, V, dtype, device, seed=s, shifted=impl.shifted)
                        for s in range(1, n)]
        rot = timing.Rotation(sets)
        fn(rot.next())                                   # warm-up / compile, outside timing
        st = timing.time_stats(lambda: fn(rot.next()), device, warmup=1, reps=cfg["reps"],
                               max_seconds=cfg["max_seconds"])
        t = st["median"]
        row.update(median_ms=t * 1e3, min_ms=st["min"] * 1e3, calls=st["n"])
        if "cpu_median" in st:
            row["cpu_time_ms"] = st["cpu_median"] * 1e3
        row["peak_extra_bytes"] = timing.measure_peak(lambda: fn(sets[0]), device)
        row["gbps"] = row["floor_bytes"] / t / 1e9
        row["pct_copy_bw"] = 100 * row["gbps"] / copy_bw
        row["rotating_sets"] = n
    except ops.Unavailable as exc:
        row["status"] = str(exc)
    except torch.cuda.OutOfMemoryError:
        row["status"] = "n/a (out of memory)"
    except Exception as exc:                             # report, keep the sweep going
        row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    finally:
        sets.clear()
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def add_speedups(rows):
    """ours_speedup on every baseline row: its time over ours (same op and shape)."""
    ours = {(r["op"], r["tokens"], r["V"]): r for r in rows if r["impl"] == "ours"}
    for r in rows:
        o = ours.get((r["op"], r["tokens"], r["V"]))
        if r["kind"] == "ours" or o is None:
            continue
        if r.get("median_ms") and o.get("median_ms"):
            r["ours_speedup"] = r["median_ms"] / o["median_ms"]
        if r.get("peak_extra_bytes") and o.get("peak_extra_bytes") is not None:
            r["ours_mem_ratio"] = o["peak_extra_bytes"] / r["peak_extra_bytes"]
    return rows


def plan(cfg, op_names, seq_len):
    """(op, B, T, V) for every timed case, largest shapes first (the targets are there, and a
    run cut short by a timeout keeps them); group_advantages once per token count."""
    cases = []
    for N in sorted(cfg["tokens"], reverse=True):
        B, T = batch_shape(N, seq_len)
        for op in op_names:
            if op == "advantages":
                cases.append((op, B, T, 0))
                continue
            for V in sorted(cfg["vocab"], reverse=True):
                cases.append((op, B, T, V))
    return cases


# --------------------------------------------------------------------------- checks
def correctness(cfg, op_names):
    """Every available implementation against the float64 reference, fp32 and bf16."""
    results = []
    for op in op_names:
        for dtype in (torch.float32, torch.bfloat16):
            if op == "advantages" and dtype != torch.float32:
                continue
            for impl in ops.implementations(op):
                if impl.name == "torch.compile":
                    continue                # same code as eager; compiling here costs minutes
                try:
                    fn = impl.build(cfg["device"])
                except ops.Unavailable as exc:
                    results.append(ops.CheckResult(op, impl.name, str(dtype)[6:], None,
                                               note=str(exc)))
                    continue
                results.append(ops.check(op, impl.name, fn, dtype, cfg["device"],
                                         kind=impl.kind, shifted=impl.shifted))
    return results


def big_spot_check(cfg, min_elements=2 ** 31, seq_len=SEQ_LEN):
    """No size limits: logits over 2^31 elements (16384 x 151936 is 2.49e9). Ours on the largest
    shape of the run; the last rows (where int32 offsets would go wrong) against float64:
    no-grad log-probs, and the token-level loss gradient of the last sequence (its reference
    uses the whole batch's token count as normalizer, so the two must agree exactly)."""
    from hapo_kernels import reference as ref
    N, V = max(cfg["tokens"]), max(cfg["vocab"])
    dev = cfg["device"]
    if N * V < min_elements:
        return None
    out = {"shape": f"{N}x{V}", "elements": N * V}
    B, T = batch_shape(N, seq_len)
    try:
        inp = ops.make_inputs("sls_nograd", B, T, V, cfg["dtype"], dev, seed=7)
        got = ops.ours("sls_nograd")(inp)["logp"][-1, -4:]
        want = ref.log_probs(inp["full"][-1:, T - 4:T], inp["ids"][-1:, -4:])[0][0]
        out["logp_rel_error"] = ops.rel_error(got, want)
        del inp
        inp = ops.make_inputs("loss_token", B, T, V, cfg["dtype"], dev, seed=8)
        grad = ops.ours("loss_token")(inp)["grad"][-1]
        last = inp["full"].detach()[-1:, :-1].clone().requires_grad_(True)
        res = ref.hapo_loss(last, inp["ids"][-1:], inp["adv"][-1:], mask=inp["mask"][-1:],
                            old_logp=inp["old"][-1:], ref_logp=inp["ref"][-1:],
                            normalizer=float(inp["mask"].sum()), **ops.LOSS_KW)
        (want_grad,) = torch.autograd.grad(res.loss, last)
        out["grad_rel_error"] = ops.rel_error(grad, want_grad[0])
        out["ok"] = out["logp_rel_error"] < 1e-4 and out["grad_rel_error"] < 1e-2
    except Exception as exc:
        out.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:200]}")
    if dev == "cuda":
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    cfg = settings(args)
    if cfg["device"] == "cpu":
        torch.set_num_threads(args.threads or default_threads())
    threads = torch.get_num_threads()
    device_label = timing.device_name(cfg["device"])
    start = time.time()
    # Recorded in the JSON: on a shared machine other processes' load skews CPU timings.
    load_start = os.getloadavg()
    print(f"hapo-bench: {device_label}, torch {torch.__version__}, logits "
          f"{str(cfg['dtype'])[6:]}, tokens {cfg['tokens']}, V {cfg['vocab']}", flush=True)

    checks = []
    if cfg["check"]:
        checks = correctness(cfg, args.ops)
        print("\nCorrectness against the float64 reference (hapo_kernels.reference):")
        print(report.check_table(checks), flush=True)

    copy_bw = timing.copy_bandwidth_gbs(cfg["device"], (2 << 30) if cfg["device"] == "cuda"
                                        else (256 << 20))
    print(f"\ndevice copy bandwidth (read + write): {copy_bw:.1f} GB/s", flush=True)

    date = _dt.date.today().isoformat()
    dev_slug = report.slug(device_label if cfg["device"] == "cuda"
                           else f"cpu-{os.cpu_count()}core")
    base = os.path.join(args.out_dir, f"{dev_slug}-{date}")
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)

    def payload(rows, spot=None):
        out = dict(device=device_label, device_kind=cfg["device"], date=date, command=command,
                   torch=torch.__version__, python=platform.python_version(),
                   threads=threads, copy_bandwidth_gbs=copy_bw,
                   load_average_start=load_start, load_average_end=os.getloadavg(),
                   seconds=time.time() - start, rows=rows, big_spot_check=spot,
                   checks=[c.__dict__ for c in checks],
                   checks_passed=all(c.ok is not False for c in checks))
        try:
            import triton
            out["triton"] = triton.__version__
        except ImportError:
            pass
        return out

    from tqdm import tqdm
    rows = []
    cases = plan(cfg, args.ops, args.seq_len)
    todo = [(c, impl) for c in cases for impl in ops.implementations(c[0])]
    for (op, B, T, V), impl in tqdm(todo, desc="benchmark", unit="row", file=sys.stderr):
        skip = None
        if impl.name == "torch.compile" and op not in cfg["compile_ops"]:
            skip = "skipped (--compile)"
        elif impl.name == "torch.compile" and cfg["compile_at"] == "largest" and \
                (B * T, V) != (max(cfg["tokens"]), max(cfg["vocab"]) if V else 0):
            skip = "skipped (--compile-at largest)"
        else:
            try:
                fn = impl.build(cfg["device"])
            except ops.Unavailable as exc:
                skip = str(exc)
        if skip is not None:
            rows.append(dict(op=op, impl=impl.name, kind=impl.kind, device=cfg["device"],
                             dtype=str(cfg["dtype"])[6:], B=B, T=T, V=V, tokens=B * T,
                             group=ops.GROUP, logits_bytes=0, status=skip,
                             floor_bytes=ops.floor_bytes(op, B, T, V, cfg["dtype"])))
        else:
            rows.append(run_row(op, impl, fn, B, T, V, cfg, copy_bw))
        if not args.no_save:             # partial results survive a timeout
            report.write_json(base + ".partial.json", payload(add_speedups(rows)))
    add_speedups(rows)
    spot = big_spot_check(cfg, seq_len=args.seq_len)
    data = payload(rows, spot)

    print("\n" + report.full_table(rows))
    if spot:
        print(f"\n>2^31-element logits spot check: {spot}")
    saved = []
    if args.json:
        report.write_json(args.json, data)
        saved.append(args.json)
    if not args.no_save:
        report.write_json(base + ".json", data)
        saved.append(base + ".json")
        if os.path.exists(base + ".partial.json"):
            os.remove(base + ".partial.json")
        if not args.no_plot and report.plot(rows, base + ".png",
                                            f"hapo-kernels, {device_label}, {date}"):
            saved.append(base + ".png")
    if args.short:
        print("\n" + report.short_table(rows))
    wrote = ", ".join(saved) or "nothing"
    print(f"\n{len(rows)} rows in {time.time() - start:.0f} s; wrote {wrote}")
    if checks and not data["checks_passed"]:
        print("CORRECTNESS CHECK FAILED (see the table above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
