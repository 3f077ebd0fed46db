"""HAPO end to end in verl: a ``RayPPOTrainer`` subclass, its task runner and entry point.

``python -m hapo.integrations.verl_trainer <verl's Hydra overrides> algorithm.adv_estimator=hapo
actor_rollout_ref.actor.policy_loss.loss_mode=hapo +algorithm.hapo.inject=gate ...`` runs
verl's PPO trainer with one step added between reward scoring and the old log-probs:

(a) the gate (``HAPOConfig``'s ``gate_*`` options, ``+algorithm.hapo.*``) decides per
    group (``uid``) from the group's scores (``rm_scores``) whether to inject;
(b) in each injected group the worst response (lowest score, first on ties: the row
    ``hk.group_advantages`` replaces) is overwritten by the prompt's teacher demonstration
    (``responses``, ``input_ids``, ``attention_mask``, ``response_mask``, ``position_ids``),
    and that row is scored again by verl's reward function (the reward loop manager);
(c) verl's own steps then compute ``old_log_probs`` and ``ref_log_prob`` for the edited
    batch, so the teacher rows get the policy's and the reference's log-probs of the
    demonstration (``rollout_log_probs`` of those rows are set to the old ones: IS weight 1);
(d) ``teacher_mask`` ``[bs]`` goes into the batch; the actor's loss
    (``hapo.integrations.verl.hapo_ppo_loss``, in place of verl's ``ppo_loss`` in every
    process that imports ``hapo.integrations.verl``) hands it to the ``"hapo"`` policy
    loss, which trains those rows with the shaped teacher objective.

The advantage estimator ``"hapo"`` then takes the edited scores as they are (SSI's
substituted rewards, the teacher's scored by the reward function), without gating again.
The gate's state is written next to verl's checkpoint (``global_step_N/hapo_gate.pt``) and
read back on resume.

Why a trainer subclass (verl's recipe pattern) and not hooks: the HAPO step edits rows of
the batch and must run after scoring and before the old log-probs. The legacy trainer
(``RayPPOTrainer``, ``trainer.use_v1=False``) holds the whole batch as a ``DataProto`` in
the driver at that point, and its ``_compute_old_log_prob`` is the seam; verl's default
(v1) trainer keeps the batch in TransferQueue, where the advantage step sees only
``uid``, scores, masks and log-probs, and none of verl's hooks (``on_sample_end``,
``CheckpointCallback``, the registries) can rewrite responses before the log-probs.

Demonstrations: per prompt, ``extra_info[demo_field]`` of verl's dataset row (default
``"hapo_demonstration"``; ``+algorithm.hapo.demo_field=...``): a string (tokenized, EOS
appended) or a list of token ids. A group without one is never injected.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import missing_extra

try:
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer
except ImportError as exc:
    raise missing_extra("hapo.integrations.verl_trainer", "verl", exc) from exc

import hapo_kernels as hk

from . import verl as hv

__all__ = ["HAPORayPPOTrainer", "task_runner_class", "demonstrations", "write_demonstration",
           "prepare_environment", "GATE_FILE", "main"]

GATE_FILE = "hapo_gate.pt"


def _field(row: Any, key: str) -> Any:
    if isinstance(row, dict):
        return row.get(key)
    return getattr(row, "get", lambda *_: None)(key)


def demonstrations(batch: DataProto, tokenizer: Any, demo_field: str) -> List[Optional[list]]:
    """Each row's teacher demonstration as token ids (None where the row has none), from
    ``non_tensor_batch["extra_info"][i][demo_field]``: a string (tokenized without special
    tokens, EOS appended) or a sequence of ids."""
    extra = batch.non_tensor_batch.get("extra_info")
    out: List[Optional[list]] = []
    for i in range(len(batch)):
        demo = None if extra is None else _field(extra[i], demo_field)
        if demo is None:
            out.append(None)
        elif isinstance(demo, str):
            ids = list(tokenizer.encode(demo, add_special_tokens=False))
            if getattr(tokenizer, "eos_token_id", None) is not None:
                ids.append(int(tokenizer.eos_token_id))
            out.append(ids)
        else:
            ids = [int(t) for t in demo]
            if not ids:
                raise ValueError(f"row {i}: the demonstration in extra_info[{demo_field!r}] "
                                 "is empty")
            out.append(ids)
    return out


def write_demonstration(batch: DataProto, row: int, ids: List[int], pad_token_id: int) -> bool:
    """Overwrite the response of ``row`` with the token ids ``ids`` in every field verl
    derives from it: ``responses``, ``input_ids`` and ``attention_mask`` (response part),
    ``response_mask``, ``position_ids`` (``cumsum(attention_mask) - 1``, as verl's agent
    loop), and ``meta_info["global_token_num"]``. Returns whether ``ids`` was cut to the
    response width."""
    tensors = batch.batch
    responses = tensors["responses"]
    width = responses.shape[1]
    prompt_width = tensors["input_ids"].shape[1] - width
    positions = tensors["position_ids"]
    if positions.dim() != 2:
        raise ValueError("HAPO's demonstration rows support text models only (position_ids "
                         f"[bs, L]); got position_ids of shape {tuple(positions.shape)}")
    cut = len(ids) > width
    ids = torch.tensor(ids[:width], dtype=responses.dtype, device=responses.device)
    n = ids.numel()
    responses[row] = pad_token_id
    responses[row, :n] = ids
    tensors["input_ids"][row, prompt_width:] = responses[row]
    attention = tensors["attention_mask"]
    attention[row, prompt_width:] = 0
    attention[row, prompt_width:prompt_width + n] = 1
    if "response_mask" in tensors.keys():
        tensors["response_mask"][row] = attention[row, prompt_width:].to(
            tensors["response_mask"].dtype)
    tensors["position_ids"][row] = (attention[row].cumsum(-1) - 1).clamp(min=0).to(
        tensors["position_ids"].dtype)
    tokens = batch.meta_info.get("global_token_num")
    if isinstance(tokens, list) and len(tokens) == len(batch):
        tokens[row] = int(attention[row].sum())
    return cut


class HAPORayPPOTrainer(RayPPOTrainer):
    """verl's ``RayPPOTrainer`` with HAPO's gate and SSI step (see the module docstring).

    Configured by ``config.algorithm.hapo`` (``HAPOConfig`` keywords plus ``demo_field``);
    without that node it is verl's trainer. Needs ``self.tokenizer`` and verl's reward loop
    manager (``self.reward_loop_manager``) as the base trainer builds them.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hapo_setup()

    # ------------------------------------------------------------------ configuration
    def hapo_setup(self) -> None:
        """Read ``algorithm.hapo`` and configure the ``"hapo"`` loss and estimator."""
        node = self.config.algorithm.get("hapo", None)
        self.hapo_enabled = node is not None
        self.hapo_metrics: Dict[str, float] = {}
        if not self.hapo_enabled:
            return
        cfg = hv.hapo_config(node)
        if cfg.advantages.stats == "on-policy":
            raise ValueError("algorithm.hapo.stats='on-policy' is not supported by the verl "
                             "trainer: the teacher's scored reward enters the group statistics")
        if cfg.advantages.replace != "worst":
            raise ValueError("algorithm.hapo.replace must be 'worst' in the verl trainer (the "
                             "demonstration takes the lowest-scored response's row)")
        corr = self.config.algorithm.get("rollout_correction", None)
        if corr is not None and corr.get("bypass_mode", False):
            raise ValueError("HAPO needs the old log-probs recomputed (teacher rows were not "
                             "sampled): algorithm.rollout_correction.bypass_mode must be false")
        hv.configure(cfg)
        self.hapo_demo_field = str(node.get("demo_field", hv.DEMO_FIELD))

    # ------------------------------------------------------------------ the HAPO step
    def hapo_step(self, batch: DataProto) -> torch.Tensor:
        """Gate, write demonstrations into the replaced rows, score them; returns the
        teacher rows (int64). Edits ``batch`` in place and sets ``batch["teacher_mask"]``."""
        tensors = batch.batch
        bs = len(batch)
        hv.expect_injections(None)
        scores = tensors["rm_scores"].sum(-1).float()
        uids = batch.non_tensor_batch["uid"]
        order, offsets = hv.group_layout(uids)
        P = offsets.numel() - 1
        first = order[offsets[:-1]].tolist()
        demos = demonstrations(batch, self.tokenizer, self.hapo_demo_field)
        has_demo = torch.tensor([demos[i] is not None for i in first], dtype=torch.bool)
        cfg = hv.current_config()
        rewards = scores[order]
        offsets_dev = offsets.to(rewards.device)
        if cfg.inject == "gate":
            prompt_keys = batch.non_tensor_batch.get("index", uids)
            inject = hv.current_gate().decide(
                rewards, group_offsets=offsets_dev, prompt_ids=[prompt_keys[i] for i in first],
                has_demo=has_demo).cpu()
        elif cfg.inject == "always":
            inject = has_demo
        else:
            inject = torch.zeros(P, dtype=torch.bool)
        _, replaced = hk.group_advantages(rewards, group_offsets=offsets_dev,
                                          inject=inject.to(rewards.device))
        replaced = replaced.cpu()
        hit = torch.nonzero(replaced >= 0).flatten()
        rows = order[offsets[hit] + replaced[hit]]
        pad = getattr(self.tokenizer, "pad_token_id", None)
        pad = 0 if pad is None else int(pad)
        truncated = 0
        for group, row in zip(hit.tolist(), rows.tolist()):
            truncated += write_demonstration(batch, row, demos[first[group]], pad)
        teacher = torch.zeros(bs, dtype=torch.bool, device=scores.device)
        teacher[rows.to(scores.device)] = True
        teacher_scores = torch.zeros(0)
        if rows.numel():
            teacher_scores = self.hapo_score(batch, rows)
        tensors["teacher_mask"] = teacher
        hv.expect_injections({"inject": inject.clone(), "teacher_rows": rows.sort().values})
        self.hapo_metrics = {
            "hapo/inject_rate": float(inject.float().mean()) if P else 0.0,
            "hapo/injected_groups": float(inject.sum()),
            "hapo/groups_with_demo": float(has_demo.sum()),
            "hapo/teacher_score_mean": float(teacher_scores.mean()) if rows.numel() else 0.0,
            "hapo/demos_truncated": float(truncated),
        }
        if cfg.inject == "gate":
            self.hapo_metrics["hapo/gamma"] = float(hv.current_gate().gamma(
                hv.current_gate().step - 1))
        return rows

    def hapo_score(self, batch: DataProto, rows: torch.Tensor) -> torch.Tensor:
        """Score the rows ``rows`` with verl's reward function and write their
        ``rm_scores`` (and reward extra infos) back; returns their scores."""
        sub = batch.select_idxs(rows.numpy())
        sub.batch.pop("rm_scores")
        scored = self.reward_loop_manager.compute_rm_score(sub)
        rm = scored.batch["rm_scores"].to(batch.batch["rm_scores"].dtype)
        batch.batch["rm_scores"][rows.to(rm.device)] = rm
        for key, values in scored.non_tensor_batch.items():
            if key in batch.non_tensor_batch:
                column = batch.non_tensor_batch[key]
                for k, row in enumerate(rows.tolist()):
                    column[row] = values[k]
        return rm.sum(-1).float()

    # ------------------------------------------------------------------ verl's seams
    def _compute_old_log_prob(self, batch: DataProto) -> Tuple[DataProto, Any]:
        """The HAPO step, then verl's old log-probs of the edited batch."""
        rows = self.hapo_step(batch) if self.hapo_enabled else torch.zeros(0, dtype=torch.long)
        old_log_prob, mfu = super()._compute_old_log_prob(batch)
        if rows.numel() and "rollout_log_probs" in batch.batch.keys():
            # The sampler never produced the demonstration: its IS weight is 1.
            batch.batch["rollout_log_probs"][rows] = old_log_prob.batch["old_log_probs"][rows].to(
                batch.batch["rollout_log_probs"].dtype)
        return old_log_prob, mfu

    def _update_actor(self, batch: DataProto) -> DataProto:
        output = super()._update_actor(batch)
        if self.hapo_enabled:
            output.meta_info["metrics"].update(self.hapo_metrics)
        return output

    def _save_checkpoint(self) -> None:
        super()._save_checkpoint()
        state = hv.gate_state() if self.hapo_enabled else None
        if state is not None:
            folder = os.path.join(self.config.trainer.default_local_dir,
                                  f"global_step_{self.global_steps}")
            os.makedirs(folder, exist_ok=True)
            tmp = os.path.join(folder, GATE_FILE + ".tmp")
            torch.save(state, tmp)
            os.replace(tmp, os.path.join(folder, GATE_FILE))

    def _load_checkpoint(self) -> Any:
        result = super()._load_checkpoint()
        if self.hapo_enabled and self.global_steps > 0:
            self.hapo_load_gate(os.path.join(self.config.trainer.default_local_dir,
                                             f"global_step_{self.global_steps}"))
        return result

    def hapo_load_gate(self, folder: str) -> None:
        """Restore the gate saved in ``folder`` (a ``global_step_N`` checkpoint folder)."""
        if self.config.trainer.get("resume_mode") == "resume_path":
            folder = self.config.trainer.resume_from_path
        path = os.path.join(folder, GATE_FILE)
        if os.path.exists(path) and hv.gate_state() is not None:
            hv.load_gate_state(torch.load(path, weights_only=False))


# --------------------------------------------------------------------------- entry point
def task_runner_class() -> Any:
    """verl's legacy task runner (a Ray actor class) that builds ``HAPORayPPOTrainer``."""
    import ray
    from verl.trainer import main_ppo_v0

    verl_run = main_ppo_v0.TaskRunner.__ray_metadata__.modified_class.run

    class HAPOTaskRunner(main_ppo_v0.BaseTaskRunner):
        """verl's legacy ``TaskRunner`` building ``HAPORayPPOTrainer``."""

        def run(self, config: Any) -> None:
            # This Ray actor's process only: verl's runner builds the trainer by this name.
            main_ppo_v0.RayPPOTrainer = HAPORayPPOTrainer
            return verl_run(self, config)

    return ray.remote(num_cpus=1)(HAPOTaskRunner)


def prepare_environment(config: Any) -> Dict[str, str]:
    """The environment every verl process of the run needs, set in ``os.environ`` before
    Ray starts (a local cluster inherits it; for an existing cluster pass the same through
    ``+ray_kwargs.ray_init.runtime_env.env_vars``): ``VERL_USE_EXTERNAL_MODULES`` naming
    ``hapo.integrations.verl`` (registrations, the log-prob and loss patches) and
    ``HAPO_VERL_CONFIG`` (the HAPO options, for the workers' loss)."""
    env = {}
    modules = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    if "hapo.integrations.verl" not in modules:
        modules.append("hapo.integrations.verl")
    env["VERL_USE_EXTERNAL_MODULES"] = ",".join(modules)
    node = config.algorithm.get("hapo", None)
    if node is not None:
        from omegaconf import OmegaConf
        plain = OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) \
            else dict(node)
        env[hv.CONFIG_ENV] = json.dumps(plain)
    os.environ.update(env)
    return env


def main(argv: Optional[List[str]] = None) -> None:
    """``python -m hapo.integrations.verl_trainer [overrides]``: verl's Hydra config
    (``verl/trainer/config/ppo_trainer.yaml``) with the overrides, run by
    ``HAPORayPPOTrainer``."""
    import sys

    import hydra
    import verl.trainer.main_ppo as main_ppo
    from verl.trainer.main_ppo import run_ppo

    config_dir = os.path.join(os.path.dirname(main_ppo.__file__), "config")
    overrides = list(sys.argv[1:] if argv is None else argv)
    with hydra.initialize_config_dir(config_dir=config_dir, version_base=None):
        config = hydra.compose(config_name="ppo_trainer", overrides=overrides)
    main_ppo.auto_set_device(config)
    main_ppo.validate_config(config=config,
                             use_reference_policy=main_ppo.need_reference_policy(config),
                             use_critic=main_ppo.need_critic(config))
    prepare_environment(config)
    run_ppo(config, task_runner_class=task_runner_class())


if __name__ == "__main__":
    main()
