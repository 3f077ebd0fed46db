"""A short HAPO run in verl's Ray trainer (GPU): ``python -m bench.verl_run --out DIR``.

Builds everything offline in ``DIR``: a tiny random Llama and a character tokenizer with a
chat template, a gsm8k-style parquet dataset (``openai/gsm8k`` rows, scored by verl's own
rule-based gsm8k reward) whose rows carry a teacher demonstration in
``extra_info["hapo_demonstration"]``. Then runs ``python -m hapo.integrations.verl_trainer``
(verl's legacy ``RayPPOTrainer`` with HAPO's step, vLLM rollouts, FSDP actor) for
``--steps`` steps on one GPU, with the gate on: the random policy never earns a reward, so
every group is injected. Checks afterwards: the log shows ``hapo/inject_rate`` > 0 and
``actor/hapo_teacher_fraction`` > 0 (teacher rows reached the actor's loss), and the last
checkpoint holds ``hapo_gate.pt``. ``--prepare-only`` builds the files and prints the
command (what the CPU tests run). Needs verl 0.9.1 with its GPU dependencies and vLLM.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from typing import List

CHARS = "0123456789+=?#. abcdefghijklmnopqrstuvwxyz"
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}={% endif %}")


def build_tokenizer(path: str):
    """A character-level fast tokenizer with pad/eos and a chat template, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    for c in CHARS:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def build_model(path: str, vocab_size: int) -> None:
    """A tiny random Llama (2 layers, hidden 128, head dim 64), saved to ``path``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64 if vocab_size <= 64 else vocab_size, hidden_size=128,
                         intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=2,
                         tie_word_embeddings=False)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def build_dataset(path: str, n: int, seed: int) -> None:
    """gsm8k-style rows: ``a+b?`` with the answer ``#### a+b`` and its demonstration."""
    import random

    import pandas as pd
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        rows.append({
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": f"{a}+{b}?"}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(a + b)},
            "extra_info": {"index": i, "hapo_demonstration": f"#### {a + b}"},
        })
    pd.DataFrame(rows).to_parquet(path)


def overrides(out: str, steps: int) -> List[str]:
    """verl's Hydra overrides for the run (one GPU, vLLM rollouts, FSDP actor)."""
    return [
        f"data.train_files={out}/train.parquet", f"data.val_files={out}/val.parquet",
        "data.train_batch_size=8", "data.max_prompt_length=16", "data.max_response_length=16",
        f"actor_rollout_ref.model.path={out}/model",
        "actor_rollout_ref.actor.optim.lr=1e-4", "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.actor.use_kl_loss=False",
        "actor_rollout_ref.actor.policy_loss.loss_mode=hapo",
        "actor_rollout_ref.rollout.name=vllm", "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=8",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=8",
        "algorithm.adv_estimator=hapo", "algorithm.use_kl_in_reward=False",
        "trainer.n_gpus_per_node=1", "trainer.nnodes=1", f"trainer.total_training_steps={steps}",
        "trainer.logger=[console]", "trainer.val_before_train=False", "trainer.test_freq=-1",
        f"trainer.save_freq={steps}", f"trainer.default_local_dir={out}/checkpoints",
        "trainer.project_name=hapo", "trainer.experiment_name=gpu_check",
        "+algorithm.hapo.inject=gate", "+algorithm.hapo.gate_threshold=0.8",
        "+algorithm.hapo.teacher_gamma=0.1",
    ]


def prepare(out: str) -> List[str]:
    """Build the model, tokenizer and data in ``out``; return the run's command."""
    os.makedirs(out, exist_ok=True)
    tok = build_tokenizer(os.path.join(out, "model"))
    build_model(os.path.join(out, "model"), len(tok))
    build_dataset(os.path.join(out, "train.parquet"), 64, seed=0)
    build_dataset(os.path.join(out, "val.parquet"), 8, seed=1)
    return [sys.executable, "-m", "hapo.integrations.verl_trainer"]


def check(log: str, out: str, steps: int) -> dict:
    """What the run must show: injections, teacher tokens in the actor loss, the gate saved."""
    def values(key):
        return [float(v) for v in re.findall(re.escape(key) + r"[:=]\s*([-0-9.eE+]+)", log)]
    result = {"inject_rate": values("hapo/inject_rate"),
              "teacher_fraction": values("actor/hapo_teacher_fraction"),
              "gate_saved": os.path.exists(os.path.join(
                  out, "checkpoints", f"global_step_{steps}", "hapo_gate.pt"))}
    result["ok"] = bool(result["inject_rate"] and max(result["inject_rate"]) > 0
                        and result["teacher_fraction"] and max(result["teacher_fraction"]) > 0
                        and result["gate_saved"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--prepare-only", action="store_true")
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    command = prepare(out) + overrides(out, args.steps)
    if args.prepare_only:
        print(" ".join(command))
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    log = run.stdout + run.stderr
    with open(os.path.join(out, "verl_run.log"), "w") as f:
        f.write(log)
    result = dict(check(log, out, args.steps), returncode=run.returncode)
    print(json.dumps(result))
    if run.returncode != 0 or not result["ok"]:
        print(log[-4000:])
        raise SystemExit(1)


if __name__ == "__main__":
    main()
