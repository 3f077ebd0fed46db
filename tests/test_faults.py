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
