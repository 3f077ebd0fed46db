"""The benchmark harness itself: tiny shapes, no timing claims (those live in bench/)."""
import json
import os

import pytest
import torch

from bench import __main__ as runner
from bench import baselines as bl
from bench import ops, timing


def test_cpu_peak_memory_sees_a_known_allocation():
    if not timing.cpu_peak_supported():
        pytest.skip("this kernel does not allow resetting the RSS high-water mark")
    timing.measure_peak_cpu(lambda: torch.ones(1 << 20))          # warm the allocator path
    peak = timing.measure_peak_cpu(lambda: torch.ones(16 << 20))  # 64 MiB of float32
    assert 60 << 20 <= peak <= 72 << 20


@pytest.mark.parametrize("op,dtype", [(op, dt) for op in ("sls_nograd", "sls_grad", "loss_token",
                                                           "loss_seq")
                                      for dt in (torch.float32, torch.bfloat16)]
                         + [("advantages", torch.float32)])
def test_eager_baselines_match_the_reference(op, dtype):
    res = ops.check(op, "eager (TRL)", ops.EAGER[op], dtype, "cpu", B=2, T=6, V=257,
                  kind="baseline")
    assert res.ok, (res.errors, res.note)


def _perturbed(fn, how):
    def wrong(inp):
        out = fn(inp)
        key = "grad" if "grad" in out else ("logp" if "logp" in out else "adv")
        out[key] = how(out[key])
        return out
    return wrong


@pytest.mark.parametrize("op", ["sls_nograd", "sls_grad", "loss_token", "advantages"])
@pytest.mark.parametrize("how", [lambda t: t * 1.01, lambda t: t + 1e-3,
                                 lambda t: torch.where(torch.rand_like(t.float()) < 0.1,
                                                       float("nan"), t.float())],
                         ids=["scaled", "shifted", "nan"])
def test_check_catches_a_wrong_implementation(op, how):
    res = ops.check(op, "wrong", _perturbed(ops.EAGER[op], how), torch.float32, "cpu",
                  B=2, T=6, V=257)
    assert res.ok is False


def test_check_catches_a_wrong_replaced_index_and_a_crash():
    def wrong(inp):
        out = ops.EAGER["advantages"](inp)
        out["replaced"] = out["replaced"].roll(1)
        return out
    assert ops.check("advantages", "wrong", wrong, torch.float32, "cpu").ok is False

    def crash(inp):
        raise RuntimeError("boom")
    res = ops.check("sls_nograd", "crash", crash, torch.float32, "cpu")
    assert res.ok is False and "boom" in res.note


def test_byte_floor_counts_passes_over_the_logits():
    N, V, s = 8 * 16, 1000, 2
    logits = N * V * s
    assert ops.floor_bytes("sls_nograd", 8, 16, V, torch.bfloat16) // logits == 1
    assert ops.floor_bytes("loss_token", 8, 16, V, torch.bfloat16) // logits == 2
    assert ops.floor_bytes("loss_seq", 8, 16, V, torch.bfloat16) // logits == 3


def test_trl_entropy_matches_the_reference():
    x = torch.randn(3, 5, 77)
    from hapo_kernels import reference as ref
    want = ref.log_probs(x, torch.zeros(3, 5, dtype=torch.long))[1]
    assert torch.allclose(bl.trl_entropy_from_logits(x).double(), want, atol=1e-5)


def test_quick_runner_end_to_end(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = runner.main(["--quick", "--tokens", "8", "--vocab", "64", "96", "--compile",
                      "--reps", "2", "--max-seconds", "0.2", "--json", str(out),
                      "--out-dir", str(tmp_path), "--short"])
    text = capsys.readouterr().out
    data = json.loads(out.read_text())
    assert "Correctness against the float64 reference" in text and "ours x faster" in text
    assert data["copy_bandwidth_gbs"] > 0
    assert {r["op"] for r in data["rows"]} == set(ops.OPS)
    eager = [r for r in data["rows"] if r["impl"] == "eager (TRL)"]
    assert eager and all(r["status"] == "ok" and r["median_ms"] > 0 for r in eager)
    assert all(r["status"].startswith("skipped") for r in data["rows"]
               if r["impl"] == "torch.compile")
    for c in data["checks"]:
        if c["impl"] == "eager (TRL)":
            assert c["ok"], c
    # the saved copy and the plot sit in --out-dir; rc is 1 only if a check failed
    assert list(tmp_path.glob("cpu-*.json")) and list(tmp_path.glob("cpu-*.png"))
    assert rc == (0 if data["checks_passed"] else 1)


def test_big_logits_spot_check_path_runs_on_small_shapes():
    cfg = {"tokens": [24], "vocab": [50, 97], "device": "cpu", "dtype": torch.float32}
    spot = runner.big_spot_check(cfg, min_elements=0, seq_len=8)
    assert spot["ok"], spot
    assert runner.big_spot_check(cfg) is None          # 24 x 97 is far below 2^31


@pytest.mark.kernel
@pytest.mark.parametrize("op", ["sls_nograd", "loss_token", "loss_seq"])
def test_liger_baseline_matches_the_reference(op):
    """The Liger wrapper (run through Triton's interpreter here, on CUDA in the sweep)."""
    import liger_kernel  # noqa: F401  (the dev extra installs it: a missing one must fail)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    res = ops.check(op, "Liger", ops.liger_impl(op, device), torch.float32, device, B=2, T=5, V=257,
                  kind="baseline")
    assert res.ok, (res.errors, res.note)


@pytest.mark.kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_persistent_grid_row_matches_the_reference(dtype):
    """The sweep's persistent-grid row (GPU tuning) computes the same loss and gradient."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    impl = {i.name: i for i in ops.implementations("loss_token")}[ops.PERSISTENT]
    res = ops.check("loss_token", impl.name, impl.build(device), dtype, device, B=2, T=5, V=257,
                  kind=impl.kind)
    assert res.ok, (res.errors, res.note)


def test_no_persistent_grid_row_on_the_cpu_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ops.PERSISTENT not in [i.name for i in ops.implementations("loss_token")]


def test_compare_loss_runs_on_tiny_shapes():
    from bench.compare_loss import NAMES, compare
    rows = compare("loss_token", 2, 3, 67, repeats=1)
    assert [r["implementation"] for r in rows] == list(NAMES)
    assert all(r["median_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert rows[0]["mem_ratio"] in (1.0, None)      # None: eager's peak below RSS resolution
    assert all(r["peak_mib"] >= 0 for r in rows)


def test_compare_loss_reports_progress(capsys):
    from bench.compare_loss import compare
    compare("loss_token", 1, 2, 33, repeats=2)
    err = capsys.readouterr().err
    assert "timing round 2/2" in err and "peak memory of ours" in err


@pytest.mark.parametrize("argv", [["--vocab", "0"], ["--tokens", "-4"], ["--threads", "0"]])
def test_runner_rejects_bad_sizes_with_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        runner.parse_args(argv)
    assert stop.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_results_go_to_the_ignored_out_folder(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    assert runner.parse_args([]).out_dir == os.path.join("out", "bench")
    assert "out/" in open(os.path.join(os.path.dirname(__file__), "..", ".gitignore")).read()
