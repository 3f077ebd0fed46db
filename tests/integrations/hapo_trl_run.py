"""One HAPO training run of HAPOGRPOTrainer, on one process or under ``accelerate launch``.

``test_trl.py`` runs it with the same global batch and seed on 1 and on 2 processes and
compares what it writes. Two processes are launched with ``torchrun`` (gloo on CPU; with
``--cpu``, ``accelerate launch --num_processes 2`` starts a single process):

    python hapo_trl_run.py MODEL_DIR OUT.pt --per-device 12 [--max-steps 4]
    torchrun --nproc_per_node 2 hapo_trl_run.py MODEL_DIR OUT.pt --per-device 6

Generation is greedy, so both layouts produce the same rollouts; the gate is Thompson
sampling with a cosine anneal (its random stream and schedule both matter). With
``--per-device 6`` on 2 processes the middle group of 4 rollouts spans both processes. The main
process saves the logged history (losses, injection metrics), the final parameters and the
gate's state; every process saves the injection metrics it logged itself.
"""
import argparse
import os

import torch
from datasets import Dataset
from trl import GRPOConfig

from hapo import HAPOConfig
from hapo.integrations.trl import HAPOGRPOTrainer

G = 4
PROMPTS = ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9", "w10 w11", "w12 w13 w14", "w15"]
TEACHERS = ["w20 w21 w22", "w23 w24", "w25 w26 w27 w28", "w29", "w30 w31", "w32 w33 w34"]


def zero_reward(completions, **kwargs):
    """Sparse reward: every rollout fails, so the gate decides every group."""
    return [0.0] * len(completions)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("out")
    parser.add_argument("--per-device", type=int, required=True)
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--loss-type", default="dapo")
    args = parser.parse_args()
    dataset = Dataset.from_dict({"prompt": PROMPTS, "teacher": TEACHERS})
    config = GRPOConfig(
        output_dir=os.path.dirname(args.out) or ".", per_device_train_batch_size=args.per_device,
        num_generations=G, max_completion_length=6, use_cpu=True, report_to=[],
        logging_steps=1, save_strategy="no", seed=0, disable_tqdm=True, bf16=False,
        learning_rate=1e-3, max_steps=args.max_steps, loss_type=args.loss_type,
        generation_kwargs={"do_sample": False})
    hapo = HAPOConfig(gate_mode="thompson", gate_seed=3, gate_threshold=0.8,
                      gate_schedule="cosine", gate_gamma_min=0.05, gate_schedule_steps=4)
    trainer = HAPOGRPOTrainer(model=args.model_dir, reward_funcs=zero_reward, args=config,
                              train_dataset=dataset, hapo=hapo)
    logged = []
    original = trainer.log

    def log(logs, *rest, **kwargs):       # the HAPO metrics this process is about to log
        logged.append({k: list(v) for k, v in trainer._metrics["train"].items()
                       if k.startswith("hapo/")})
        return original(logs, *rest, **kwargs)

    trainer.log = log
    trainer.train()
    rank = trainer.accelerator.process_index
    torch.save({"logged": logged}, f"{args.out}.rank{rank}")
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        torch.save({"history": trainer.state.log_history,
                    "params": {n: p.detach().cpu() for n, p in model.named_parameters()},
                    "gate": trainer._hapo_gate.state_dict(),
                    "processes": trainer.accelerator.num_processes}, args.out)


if __name__ == "__main__":
    main()
