"""Fault injection: a process killed while it saves, a rank that exits, a rank that skips a
collective, ranks that disagree. Every scenario runs in subprocesses with a deadline
(``subprocess`` timeouts, gloo process groups with short timeouts), so none can hang the
suite: a rank left waiting fails within seconds, and so does the test.
"""
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEADLINE = 120          # seconds for any one subprocess scenario


def python(script: str, *args: str, env: dict = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for(proc: subprocess.Popen, word: str) -> None:
    """Read the child's stdout until a line ``word`` (the child flushes each line)."""
    for line in proc.stdout:
        if line.strip() == word:
            return
    proc.wait(timeout=DEADLINE)
    raise AssertionError(f"the child exited ({proc.returncode}) before {word!r}: "
                         f"{proc.stderr.read()[-3000:]}")


# --------------------------------------------------------------------------- checkpoints
TRAINER = """
import io, sys, time
import torch
from hapo import HAPOConfig, HAPOTrainer
from hapo.demo.model import TinyCausalLM
from hapo.demo.task import ReverseTask

torch.set_num_threads(1)
task = ReverseTask(length=3, digits=5)
torch.manual_seed(0)
policy = TinyCausalLM(task.vocab_size, max_len=12, d_model=int(sys.argv[2]), n_layers=2,
                      n_heads=2, d_ff=64)
trainer = HAPOTrainer(policy, torch.optim.Adam(policy.parameters(), lr=1e-2), task.reward,
                      task.demo, HAPOConfig.from_kwargs(group_size=2, max_new_tokens=3,
                                                        progress=False, beta=0.1))
prompts = task.sample_prompts(2, torch.Generator().manual_seed(0))
"""


def load_step(path) -> int:
    """The checkpoint at ``path``, loaded: its ``global_step``."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    assert {"policy", "optimizer", "gate", "generator"} <= set(state)
    return int(state["global_step"])


def test_kill_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path):
    """SIGKILL with half of the second checkpoint's bytes written: the first one is still
    there, whole (the previous code wrote onto it and left a truncated file)."""
    ckpt = tmp_path / "ckpt.pt"
    child = python(TRAINER + """
trainer.step(prompts)
trainer.save_checkpoint(sys.argv[1])
print("SAVED", flush=True)
trainer.step(prompts)
real_save = torch.save

def half_then_hang(obj, f, *args, **kwargs):
    buf = io.BytesIO()
    real_save(obj, buf)
    out = open(f, "wb") if isinstance(f, (str, bytes)) or hasattr(f, "__fspath__") else f
    data = buf.getvalue()
    out.write(data[:len(data) // 2])
    out.flush()
    print("HALF", flush=True)
    time.sleep(600)

torch.save = half_then_hang
trainer.save_checkpoint(sys.argv[1])
""", str(ckpt), "32")
    try:
        wait_for(child, "SAVED")
        assert load_step(ckpt) == 1
        wait_for(child, "HALF")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=DEADLINE) == -signal.SIGKILL
    finally:
        child.kill()
        child.communicate(timeout=DEADLINE)
    assert load_step(ckpt) == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt.pt"]
    assert all(name.startswith(".ckpt.pt.") and name.endswith(".tmp") for name in leftovers)


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2])
def test_kill_at_any_moment_of_repeated_saves(tmp_path, delay):
    """Saves of a few MB back to back, SIGKILL after ``delay``: the file at the path always
    loads, as one of the complete checkpoints."""
    ckpt = tmp_path / "ckpt.pt"
    child = python(TRAINER + """
trainer.step(prompts)
trainer.save_checkpoint(sys.argv[1])
print("SAVED", flush=True)
while True:
    trainer.global_step += 1
    trainer.save_checkpoint(sys.argv[1])
""", str(ckpt), "256")
    try:
        wait_for(child, "SAVED")
        if delay:
            import time
            time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=DEADLINE)
    finally:
        child.kill()
        child.communicate(timeout=DEADLINE)
    assert load_step(ckpt) >= 1


# --------------------------------------------------------------------------- ranks
RANK = """
import datetime, json, os, sys, time
import torch
import torch.distributed as dist
import hapo_kernels as hk

rank, world, init_file, scenario = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                        world_size=world, timeout=datetime.timedelta(seconds=8))
g = torch.Generator().manual_seed(0)
B, T, V = 2, 3, 11
x = torch.randn(B, T, V, generator=g)
y = torch.randint(0, V, (B, T), generator=g)
adv = torch.randn(B, generator=g)
cut = [0, 5, V]
lo, hi = cut[rank], cut[rank + 1]
group = dist.group.WORLD


def vocab_loss(**kw):
    args = dict(target_ids=y, advantages=adv, vocab_parallel_group=group)
    args.update(kw)
    logits = args.pop("logits", x)[..., lo:hi].clone().requires_grad_()
    return hk.fused_hapo_loss(logits, **args).loss


def run():
    other = rank == 1
    if scenario == "agree":
        return float(vocab_loss())
    if scenario == "temperature":
        return float(hk.selective_log_softmax(x[..., lo:hi], y, 0.7 if other else 1.0,
                                              vocab_parallel_group=group).sum())
    if scenario == "targets":
        yy = y.clone()
        if other:
            yy[1, 2] = (yy[1, 2] + 1) % V
        return float(vocab_loss(target_ids=yy))
    if scenario == "token_count":
        return float(vocab_loss(logits=x[:, :2] if other else x, target_ids=y[:, :2]
                                if other else y))
    if scenario == "loss_options":
        return float(vocab_loss(eps_low=0.1 if other else 0.2))
    if scenario == "bad_input_one_rank":
        old = torch.zeros(B, T + (1 if other else 0))
        return float(hk.fused_hapo_loss(x, y, adv, old_logp=old, aggregation="dapo",
                                        process_group=group).loss)
    if scenario == "group_size":
        return hk.group_advantages(torch.rand(8, generator=g), 2 if other else 4,
                                   process_group=group)[0].tolist()
    if scenario == "rewards_dtype":
        r = torch.rand(8, generator=g)
        return hk.group_advantages(r.double() if other else r, 4,
                                   process_group=group)[0].tolist()
    if scenario == "nan_reward":
        r = torch.rand(6, generator=g)
        if other:
            r[3] = float("nan")
        return hk.group_advantages(r, 4, process_group=group)[0].tolist()
    if scenario == "nan_reward_offsets":
        r = torch.rand(6, generator=g)
        if other:
            r[3] = float("nan")
        return hk.group_advantages(r, group_offsets=torch.tensor([0, 5, 12]),
                                   process_group=group)[0].tolist()
    if scenario == "rank_exits":
        if other:
            os._exit(0)
        return float(vocab_loss())
    if scenario == "rank_skips":
        if other:
            time.sleep(30)           # never joins; killed by the test after rank 0 fails
            return None
        return float(vocab_loss())
    raise SystemExit(f"unknown scenario {scenario}")


try:
    result = {"ok": run()}
except Exception as e:
    result = {"error": type(e).__name__, "message": str(e)}
print(json.dumps(result), flush=True)
os._exit(0)                          # no destroy_process_group: a peer may be gone
"""


def run_ranks(tmp_path, scenario, world=2, deadline=60):
    """Start ``world`` ranks of ``scenario``; every rank's result (None: it printed none)
    and how long the slowest took. Kills whatever is left at the deadline."""
    import json
    import time
    start = time.monotonic()
    procs = [python(RANK, str(r), str(world), str(tmp_path / "init"), scenario)
             for r in range(world)]
    out = []
    try:
        for proc in procs:
            left = max(1.0, deadline - (time.monotonic() - start))
            try:
                stdout, stderr = proc.communicate(timeout=left)
            except subprocess.TimeoutExpired:
                out.append(None)
                continue
            lines = [line for line in stdout.splitlines() if line.startswith("{")]
            out.append(json.loads(lines[-1]) if lines else {"crash": proc.returncode,
                                                             "stderr": stderr[-2000:]})
    finally:
        for proc in procs:
            proc.kill()
            proc.communicate()
    return out, time.monotonic() - start


def test_ranks_that_agree_run(tmp_path):
    res, _ = run_ranks(tmp_path, "agree")
    assert all("ok" in r for r in res), res
    assert res[0]["ok"] == pytest.approx(res[1]["ok"], rel=1e-6)


@pytest.mark.parametrize("scenario, words", [
    ("temperature", "disagree on temperature"),
    ("targets", "disagree on targets"),
    ("token_count", "disagree on target_ids shape"),
    ("loss_options", "disagree on options"),
    ("group_size", "disagree on group_size"),
    ("rewards_dtype", "disagree on rewards dtype"),
])
def test_ranks_that_disagree_all_raise(tmp_path, scenario, words):
    """Different temperature, targets or group size across ranks returned identical wrong
    results on every rank; a token-count or dtype mismatch aborted a rank inside gloo.
    Now every rank raises the same ValueError, before any kernel or other collective."""
    res, _ = run_ranks(tmp_path, scenario)
    for r in res:
        assert r is not None and r.get("error") == "ValueError", res
        assert words in r["message"], res


def test_one_rank_with_bad_input_does_not_strand_the_others(tmp_path):
    """Rank 1's old_logp has the wrong shape: it raises its own error, and rank 0 learns
    of it in the handshake instead of waiting in the token-count all-reduce."""
    res, took = run_ranks(tmp_path, "bad_input_one_rank")
    assert res[1] is not None and "old_logp" in res[1]["message"], res
    assert res[0] is not None and "rank(s) [1]" in res[0]["message"], res
    assert took < 40


@pytest.mark.parametrize("scenario, group", [("nan_reward", "group 2 (rollouts 8 .. 11)"),
                                             ("nan_reward_offsets", "group 1 (rollouts 5 .. 11)")])
def test_non_finite_reward_on_one_rank_named_on_every_rank(tmp_path, scenario, group):
    res, _ = run_ranks(tmp_path, scenario)
    for r in res:
        assert r is not None and r.get("error") == "ValueError", res
        assert "rollout 9" in r["message"] and group in r["message"], res


@pytest.mark.parametrize("scenario", ["rank_exits", "rank_skips"])
def test_a_missing_rank_fails_within_the_timeout(tmp_path, scenario):
    """A rank that exits or never joins: the other fails with the process group's timeout
    (8 s here) or a closed connection, within the test's deadline, instead of hanging."""
    res, took = run_ranks(tmp_path, scenario, deadline=45)
    assert res[0] is not None and "error" in res[0], res
    assert took < 45
