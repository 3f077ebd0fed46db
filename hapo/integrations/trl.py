"""``HAPOGRPOTrainer``: TRL's ``GRPOTrainer`` with our kernels for the loss step, and HAPO.

Everything TRL does around the loss (generation, reward functions, batching, logging,
checkpoints) is TRL's own. What changes:

* per-token log-probs and entropies come from ``hk.selective_log_softmax`` on the model's
  logits (TRL: its chunked fused LM head / ``selective_log_softmax``);
* the loss is one ``hk.fused_hapo_loss`` call honouring every loss option of
  ``GRPOConfig``: each ``loss_type`` (grpo, bnpo, dr_grpo, dapo, luspo, cispo, sapo, vespo,
  with TRL's normalisers and gradient-accumulation scaling), ``epsilon``,
  ``epsilon_high``, ``delta``, ``beta`` with ``use_bias_correction_kl``, ``temperature``,
  ``importance_sampling_level``, the SAPO and VESPO parameters, vLLM's
  ``importance_sampling_ratio`` (every ``vllm_importance_sampling_mode``),
  ``top_entropy_quantile``, ``off_policy_mask_threshold``, ``entropy_coef`` and
  ``use_adaptive_entropy`` (TRL's controller, state and checkpoint file included), and the
  MoE router auxiliary loss. ``scale_rewards`` and ``mask_truncated_completions`` act where
  TRL scores completions and are kept (HAPO uses ``scale_rewards`` for its advantages);
* with ``hapo=HAPOConfig(...)``, a dataset column holds each prompt's teacher
  demonstration; where TRL scores a generation batch the gate decides per group whether to
  inject, SSI (``hapo.inject_successes``) puts the demonstration in place of the worst
  rollout, advantages come from ``hk.group_advantages`` and the teacher tokens are trained
  with the shaped objective;
* with ``fused_linear=True``, log-probs, entropies and the loss come from the policy's last
  hidden state and its LM head weight (``hk.fused_linear_selective_log_softmax`` /
  ``hk.fused_linear_hapo_loss``): the completion logits are never materialised.

A ``GRPOConfig`` option this trainer cannot honour raises ``ValueError`` at construction
(``unsupported_options`` lists them with the reason); none is ignored silently.
"""
from __future__ import annotations

import functools
import hashlib
import os
import types
from typing import Any, Optional

import torch

from . import missing_extra

try:
    import trl  # noqa: F401  (first, so that a missing TRL is named before accelerate)
    from accelerate.utils import is_peft_model
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import nanmax, nanmin, use_adapter
except ImportError as exc:          # the extra is not installed: say how to get it
    raise missing_extra("hapo.integrations.trl", "trl", exc) from exc

import hapo_kernels as hk
from hapo_kernels import LossOptions
from hapo_kernels.distributed import broadcast_decisions
from hapo_kernels.objective import OBJECTIVES
from hapo_kernels.options import IGNORE_INDEX

from ..config import HAPOConfig
from ..lm_head import output_head
from ..ssi import swap_in_demonstrations

__all__ = ["HAPOGRPOTrainer", "unsupported_options", "SUPPORTED_LOSS_TYPES", "TESTED_TRL"]

TESTED_TRL = "1.16.0"       # the version `make test-integrations` checks against TRL's own loss
GATE_STATE_FILE = "hapo_gate.pt"    # the gate's state in each TRL checkpoint folder
SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo", "vespo")
# TRL's loss_type as (objective, aggregation); dapo, cispo and vespo divide by TRL's
# num_items_in_batch normaliser, the rest by gradient accumulation.
_LOSS_TYPES = {"grpo": ("clip", "grpo"), "bnpo": ("clip", "bnpo"),
               "dr_grpo": ("clip", "dr_grpo"), "dapo": ("clip", "dapo"),
               "luspo": ("clip", "luspo"), "cispo": ("cispo", "dapo"),
               "sapo": ("sapo", "grpo"), "vespo": ("vespo", "dapo")}

# HAPOConfig fields (and fields of its loss / advantages options) that GRPOConfig owns in
# this trainer: they must stay at their defaults (set the GRPOConfig field instead) so that
# no value is silently dropped.
_OWNED_BY_GRPO_CONFIG = {
    "group_size": "num_generations", "max_new_tokens": "max_completion_length",
    "eos_token_id": "the tokenizer's eos token", "pad_token_id": "the tokenizer's pad token",
    "advantages.scale": "scale_rewards", "loss.temperature": "temperature",
    "loss.eps_low": "epsilon", "loss.eps_high": "epsilon_high", "loss.dual_clip": "delta",
    "loss.delta": "delta", "loss.beta": "beta", "loss.entropy_coef": "entropy_coef",
    "loss.entropy_mean": "entropy_coef", "loss.kl_bias_correction": "use_bias_correction_kl",
    "loss.importance_sampling": "importance_sampling_level", "loss.aggregation": "loss_type",
    "loss.objective": "loss_type", "loss.normalizer": "loss_type",
    "loss.max_len": "max_completion_length", "loss.loss_scale": "gradient_accumulation_steps",
    "loss.sapo_temperature_pos": "sapo_temperature_pos",
    "loss.sapo_temperature_neg": "sapo_temperature_neg", "loss.vespo_k_pos": "vespo_k_pos",
    "loss.vespo_lambda_pos": "vespo_lambda_pos", "loss.vespo_k_neg": "vespo_k_neg",
    "loss.vespo_lambda_neg": "vespo_lambda_neg",
    "loss.top_entropy_quantile": "top_entropy_quantile",
    "loss.off_policy_mask_threshold": "off_policy_mask_threshold",
    "ppo_epochs": "num_iterations", "micro_batch_size": "per_device_train_batch_size",
    "max_grad_norm": "max_grad_norm", "seed": "seed", "progress": "disable_tqdm",
}


def _field(config, dotted: str):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def unsupported_options(args: GRPOConfig, hapo: Optional[HAPOConfig] = None) -> list:
    """Human-readable reasons why ``args`` (and ``hapo``) cannot run on this trainer.

    Every loss option of TRL 1.16's text-model ``GRPOTrainer`` is honoured. What remains:
    a ``loss_type`` TRL itself does not know, SAPO temperatures <= 0 (TRL divides by them),
    and with HAPO a multi-objective aggregation other than TRL's default (SSI needs one
    scalar reward per rollout) or a ``HAPOConfig`` field that ``GRPOConfig`` owns here.
    Multimodal inputs raise when they arrive (the trainer is text-only).
    """
    bad = []
    if args.loss_type not in SUPPORTED_LOSS_TYPES:
        bad.append(f"loss_type={args.loss_type!r} (supported: {', '.join(SUPPORTED_LOSS_TYPES)})")
    if args.loss_type == "sapo":
        for name in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(args, name) > 0:
                bad.append(f"{name}={getattr(args, name)} (SAPO divides by it: must be > 0)")
    if hapo is not None:
        if args.multi_objective_aggregation != "sum_then_normalize":
            bad.append(f"multi_objective_aggregation={args.multi_objective_aggregation!r} with "
                       "HAPO (SSI needs one scalar reward per rollout)")
        defaults = HAPOConfig()
        for name, owner in _OWNED_BY_GRPO_CONFIG.items():
            if _field(hapo, name) != _field(defaults, name):
                bad.append(f"HAPOConfig.{name}={_field(hapo, name)!r} (set {owner} in GRPOConfig)")
    return bad


# Text-config fields by which a model changes its logits after the LM head (the ones TRL's
# fused LM head reads). The fused-linear path computes plain ``hidden @ weight.T + bias``.
_LOGIT_SCALES = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def _logit_transforms(config) -> list:
    """The fields of ``config`` that make its logits more than ``hidden @ weight.T + bias``."""
    text = config.get_text_config()
    found = []
    cap = getattr(text, "final_logit_softcapping", None)
    if cap is not None:
        found.append(f"final_logit_softcapping={cap}")
    for name in _LOGIT_SCALES:
        value = getattr(text, name, None)
        if value is not None and value != 1.0:
            found.append(f"{name}={value}")
    return found


def _add_hidden_state_forward(model) -> None:
    """Make ``model(..., hapo_last_hidden_state=True)`` return the decoder's last hidden state
    ``[B, L, H]`` (the LM head's input) instead of running the head.

    The call still goes through the model's own ``forward`` (like TRL's fused LM head, which
    patches it the same way), so wrappers around it (DDP's gradient sync, accelerate's
    autocast) see a normal forward. Without the flag the previous forward runs unchanged.
    """
    if getattr(model, "_hapo_hidden_state_forward", False):
        return
    previous = model.forward

    @functools.wraps(type(model).forward)      # generate() validates its kwargs against it
    def forward(self, *args, hapo_last_hidden_state=False, **kwargs):
        if not hapo_last_hidden_state:
            return previous(*args, **kwargs)
        kwargs["use_cache"] = False
        return self.get_decoder()(*args, **kwargs).last_hidden_state

    model.forward = types.MethodType(forward, model)
    model._hapo_hidden_state_forward = True


def _teacher_ids(demo, tokenizer, eos_id) -> Optional[torch.Tensor]:
    """A demonstration from the dataset column as completion token ids (None: no demo)."""
    if demo is None:
        return None
    if isinstance(demo, str):
        ids = tokenizer(demo, add_special_tokens=False)["input_ids"]
        return torch.tensor(ids + ([eos_id] if eos_id is not None else []), dtype=torch.long)
    return torch.as_tensor(demo, dtype=torch.long).reshape(-1)


def _pad_right(t: Optional[torch.Tensor], width: int, value) -> Optional[torch.Tensor]:
    if t is None or t.dim() != 2 or t.shape[1] >= width:
        return t
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


class HAPOGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose loss step runs on hapo-kernels; HAPO with ``hapo=``.

    Args (beyond ``GRPOTrainer``'s):
        hapo: a ``HAPOConfig`` to turn HAPO on (gate, SSI, shaped teacher objective).
            Its rollout/loss fields belong to ``GRPOConfig`` here and must stay at their
            defaults; the gate fields, ``inject``, the teacher objective of ``loss`` and the
            ``advantages`` options (but ``scale``) are used.
        teacher_column: the dataset column with each prompt's teacher demonstration: a
            completion string (tokenized, EOS appended) or token ids; None: no demo.
        prompt_id_column: the dataset column that identifies a prompt for
            ``HAPOConfig(gate_memory="persistent")``; None: the prompt itself.
        fused_linear: compute log-probs, entropies and the loss from the last hidden state
            and the LM head weight (and bias), never materialising the completion logits.
            ``HAPOConfig(fused_linear=True)`` turns it on too. Not for models that change
            their logits after the head (``final_logit_softcapping``, a logit scale).
        fused_linear_chunk_size: tokens per chunk on that path (None: sized from memory);
            ``HAPOConfig.fused_linear_chunk_size`` is used when this is None.
    """

    def __init__(self, model: Any, reward_funcs: Any = None, args: Optional[GRPOConfig] = None,
                 *rest: Any, hapo: Optional[HAPOConfig] = None, teacher_column: str = "teacher",
                 prompt_id_column: Optional[str] = None, fused_linear: bool = False,
                 fused_linear_chunk_size: Optional[int] = None, **kwargs: Any) -> None:
        if args is None:
            args = GRPOConfig(output_dir="hapo-grpo")
        if hapo is not None and not isinstance(hapo, HAPOConfig):
            raise ValueError(f"hapo must be a HAPOConfig or None, got {type(hapo).__name__}")
        self.fused_linear, self.fused_linear_chunk_size = self._fused_linear_settings(
            fused_linear, fused_linear_chunk_size, hapo)
        bad = unsupported_options(args, hapo)
        if bad:
            raise ValueError("HAPOGRPOTrainer cannot honour these GRPOConfig options: "
                             + "; ".join(bad))
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        self.hapo = hapo
        self.teacher_column = teacher_column
        self.prompt_id_column = prompt_id_column
        self._hapo_gate = None
        if hapo is not None:
            ds = self.train_dataset
            cols = getattr(ds, "column_names", None)
            if cols is not None and teacher_column not in cols:
                raise ValueError(f"HAPO needs the teacher demonstrations in the dataset column "
                                 f"{teacher_column!r}; the train dataset has {cols}")
            if cols is not None and prompt_id_column is not None \
                    and prompt_id_column not in cols:
                raise ValueError(f"prompt_id_column={prompt_id_column!r} is not a column of the "
                                 f"train dataset ({cols})")
            self._hapo_gate = hapo.make_gate()
            # advantages.replace="random": the member an injected group loses, seeded.
            self._hapo_replace_generator = torch.Generator().manual_seed(args.seed)
        # The loss options, built and checked once here: a bad value fails at construction.
        objective, aggregation = _LOSS_TYPES[self.loss_type]
        self._loss_options = (hapo.loss if hapo else LossOptions()).updated(
            temperature=self.temperature, eps_low=self.epsilon_low, eps_high=self.epsilon_high,
            objective=objective, aggregation=aggregation,
            delta=args.delta if objective == "clip" else None,    # TRL ignores it elsewhere
            beta=self.beta, kl_bias_correction=bool(args.use_bias_correction_kl),
            importance_sampling=self.importance_sampling_level,
            sapo_temperature_pos=args.sapo_temperature_pos,
            sapo_temperature_neg=args.sapo_temperature_neg,
            vespo_k_pos=args.vespo_k_pos, vespo_lambda_pos=args.vespo_lambda_pos,
            vespo_k_neg=args.vespo_k_neg, vespo_lambda_neg=args.vespo_lambda_neg,
            top_entropy_quantile=self.top_entropy_quantile,
            off_policy_mask_threshold=self.off_policy_mask_threshold,
            entropy_mean=True)
        # The logits' storage takes their gradient unless the model's forward saved them for
        # its own backward (a tanh soft-cap does); autograd would refuse that loudly.
        text_config = self.model.config.get_text_config()
        self._inplace_grad = getattr(text_config, "final_logit_softcapping", None) is None
        if self.fused_linear:
            self._setup_fused_linear()

    @staticmethod
    def _fused_linear_settings(fused_linear, chunk_size, hapo):
        """``(fused_linear, chunk_size)`` from the keyword arguments and ``hapo``'s fields."""
        if not isinstance(fused_linear, bool):
            raise ValueError(f"fused_linear must be a bool, got {fused_linear!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, int) or chunk_size <= 0):
            raise ValueError(f"fused_linear_chunk_size must be a positive int or None, got "
                             f"{chunk_size!r}")
        if hapo is not None:
            fused_linear = fused_linear or hapo.fused_linear
            other = hapo.fused_linear_chunk_size
            if chunk_size is not None and other is not None and other != chunk_size:
                raise ValueError(f"fused_linear_chunk_size={chunk_size} disagrees with "
                                 f"HAPOConfig.fused_linear_chunk_size={other}; set one")
            chunk_size = chunk_size if chunk_size is not None else other
        return fused_linear, chunk_size

    def _setup_fused_linear(self):
        """Check the models have a plain linear LM head, and give them the hidden-state call."""
        found = _logit_transforms(self.model.config)
        if found:
            raise ValueError("fused_linear=True computes hidden @ lm_head.weight.T + bias, but "
                             f"this model changes its logits after the head ({', '.join(found)});"
                             " use fused_linear=False for it")
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3):
            raise ValueError("fused_linear=True reads lm_head.weight directly; it cannot run "
                             "with FSDP or DeepSpeed ZeRO-3, which shard it")
        if self.aux_loss_enabled:
            raise ValueError("fused_linear=True runs the decoder without the model's head, so "
                             "there is no MoE router auxiliary loss; use fused_linear=False or "
                             "router_aux_loss_coef=0.0")
        output_head(self.model)             # a clear error now if there is no LM head
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        _add_hidden_state_forward(policy)
        if self.ref_model is not None:
            _add_hidden_state_forward(self.accelerator.unwrap_model(self.ref_model))

    # ------------------------------------------------------------------ log-probs
    def _completion_logits(self, model, input_ids, attention_mask, logits_to_keep):
        """Logits ``[B, K, V]`` that predict the last ``K = logits_to_keep`` tokens.

        The LM head runs on exactly those K positions (a tensor ``logits_to_keep``), so the
        logits are a fresh contiguous tensor that nothing else holds: the loss can write
        their gradient into them (``inplace_grad``) instead of allocating a second copy.
        """
        return self._completion_forward(model, input_ids, attention_mask, logits_to_keep).logits

    def _completion_forward(self, model, input_ids, attention_mask, logits_to_keep,
                            router_logits=False):
        """The model's output with ``logits`` for the last ``logits_to_keep`` tokens (see
        ``_completion_logits``) and, with ``router_logits``, a MoE model's ``aux_loss``."""
        L = input_ids.size(1)
        keep = torch.arange(L - logits_to_keep - 1, L - 1, device=input_ids.device)
        extra = {"output_router_logits": True} if router_logits else {}
        with self.accelerator.autocast():
            return model(input_ids=input_ids, attention_mask=attention_mask,
                         logits_to_keep=keep, use_cache=False, **extra)

    def _completion_hidden(self, model, input_ids, attention_mask, logits_to_keep):
        """Fused-linear path: ``(hidden [B, K, H], weight [V, H], bias [V] or None)`` for the
        last ``K = logits_to_keep`` tokens, in the dtype the model's own head would run in.

        ``weight`` is the head's parameter itself (a cast where the dtype differs), so with
        tied embeddings its gradient lands on the shared parameter like the embedding's.
        """
        L = input_ids.size(1)
        with self.accelerator.autocast():
            hidden = model(input_ids=input_ids, attention_mask=attention_mask,
                           hapo_last_hidden_state=True)
            device = hidden.device.type
            autocast_dtype = (torch.get_autocast_dtype(device)
                              if torch.is_autocast_enabled(device) else None)
        weight, bias = output_head(self.accelerator.unwrap_model(model))
        # TRL's head runs in float32 with cast_lm_head_to_fp32, else in the autocast dtype.
        dtype = (torch.float32 if self.args.cast_lm_head_to_fp32
                 else autocast_dtype or weight.dtype)
        hidden = hidden[:, L - logits_to_keep - 1:L - 1].to(weight.device, dtype)
        weight = weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        return hidden, weight, bias

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask,
                                           logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False,
                                           **extra):
        used = sorted(k for k, v in extra.items() if v is not None)
        if used:
            raise ValueError(f"HAPOGRPOTrainer is text-only; got model inputs {used}")
        batch_size = batch_size or input_ids.size(0)
        logps, ents = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start:start + batch_size]
            am = attention_mask[start:start + batch_size]
            targets = ids[:, -logits_to_keep:].masked_fill(am[:, -logits_to_keep:] == 0,
                                                           IGNORE_INDEX)
            if self.fused_linear:
                hidden, weight, bias = self._completion_hidden(model, ids, am, logits_to_keep)
                with torch.autocast(hidden.device.type, enabled=False):
                    lp, ent = hk.fused_linear_selective_log_softmax(
                        hidden, weight, targets, bias=bias, temperature=self.temperature,
                        return_entropy=True, chunk_size=self.fused_linear_chunk_size)
            else:
                logits = self._completion_logits(model, ids, am, logits_to_keep)
                lp, ent = hk.selective_log_softmax(logits, targets,
                                                   temperature=self.temperature,
                                                   return_entropy=True)
            logps.append(lp)
            ents.append(ent)
        return torch.cat(logps), (torch.cat(ents) if compute_entropy else None), None

    # ------------------------------------------------------------------ loss
    def _aggregation(self, inputs, mode):
        """``(normalizer, max_len, accumulation, divide_by)`` reproducing TRL's scaling: TRL
        divides the loss by the gradient-accumulation steps except where ``num_items_in_batch``
        normalises it (dapo, cispo, vespo), and the entropy bonus by them always."""
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self._loss_options.aggregation == "dapo":
            n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return float(n), None, accum, 1.0
        if self.loss_type == "dr_grpo":
            return None, self.max_completion_length, accum, accum
        return None, None, accum, accum

    def _entropy_coefficient(self):
        """The entropy bonus's coefficient this micro-batch (TRL's adaptive gate included)."""
        if not self._entropy_bonus_enabled:
            return 0.0
        if self.use_adaptive_entropy:
            return (self.entropy_coef if self._last_world_entropy <= self.args.entropy_target
                    else 0.0)
        return self.entropy_coef

    def _compute_loss(self, model, inputs):
        mode = "train" if self.model.training else "eval"
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask * inputs["tool_mask"] if "tool_mask" in inputs else completion_mask
        used = sorted(k for k in ("pixel_values", "image_grid_thw", "token_type_ids",
                                  "mm_token_type_ids") if inputs.get(k) is not None)
        if used:
            raise ValueError(f"HAPOGRPOTrainer is text-only; got model inputs {used}")

        normalizer, max_len, accum, divide_by = self._aggregation(inputs, mode)
        coef = self._entropy_coefficient()
        # TRL: loss / divide_by - coef * entropy_mean / accum, as one kernel call.
        kernel_coef = coef * divide_by / accum
        ref = inputs.get("ref_per_token_logps") if self.beta != 0.0 else None
        # TRL multiplies the policy term by vLLM's ratio when it corrects for the sampler (and
        # VESPO folds it into its weight whenever it is there).
        is_ratio = None
        if (self.use_vllm and self.vllm_importance_sampling_correction) or \
                self.loss_type == "vespo":
            is_ratio = inputs.get("importance_sampling_ratio")
        group = None
        if self.accelerator.num_processes > 1 and self.top_entropy_quantile < 1.0:
            group = torch.distributed.group.WORLD     # the quantile of every rank's tokens
        common = dict(mask=mask, old_logp=inputs.get("old_per_token_logps"), ref_logp=ref,
                      teacher_mask=inputs.get("teacher_mask"), options=self._loss_options,
                      normalizer=normalizer, max_len=max_len, entropy_coef=kernel_coef,
                      rollout_is_weights=is_ratio,
                      sampling_logp=inputs.get("sampling_per_token_logps"),
                      process_group=group,
                      # TRL's division by the accumulation steps, on the forward's weights:
                      # no pass over the saved gradient in the backward.
                      loss_scale=1.0 / divide_by)
        K = completion_ids.size(1)
        aux_loss = None
        if self.fused_linear:
            hidden, weight, bias = self._completion_hidden(model, input_ids, attention_mask, K)
            with torch.autocast(hidden.device.type, enabled=False):
                out = hk.fused_linear_hapo_loss(
                    hidden, weight, completion_ids, inputs["advantages"], bias=bias,
                    chunk_size=self.fused_linear_chunk_size, **common)
        else:
            model_out = self._completion_forward(model, input_ids, attention_mask, K,
                                                 router_logits=self.aux_loss_enabled)
            logits = model_out.logits
            aux_loss = model_out.aux_loss if self.aux_loss_enabled else None
            del model_out
            out = hk.fused_hapo_loss(logits, completion_ids, inputs["advantages"],
                                     inplace_grad=self._inplace_grad, **common)
        loss = out.loss
        self._log_loss_metrics(out, mask, mode, inputs, kernel_coef, divide_by)
        if aux_loss is not None:        # TRL: scaled for gradient accumulation like the loss
            loss = loss + self.router_aux_loss_coef * aux_loss / accum
            self._metrics[mode]["aux_loss"].append(
                self.accelerator.gather_for_metrics(aux_loss.detach()).mean().item())
        return loss

    @torch.no_grad()
    def _log_loss_metrics(self, out, mask, mode, inputs, kernel_coef, divide_by):
        """TRL's loss metrics (names and reductions), from the kernel's per-token outputs;
        TRL's adaptive-entropy controller update."""
        m = mask.float()
        sequence = self.importance_sampling_level == "sequence"
        metrics = self._metrics[mode]

        def global_mean(x, per_sequence=False):
            if per_sequence:        # TRL: a (B, 1) quantity is averaged over sequences
                local = torch.stack([x.sum(), torch.tensor(float(x.numel()), device=x.device)])
            else:
                local = torch.stack([(x * m).sum(), m.sum()])
            tot = self.accelerator.reduce(local.float(), reduction="sum")
            return (tot[0] / tot[1].clamp(min=1.0)).item()

        low, high = out.per_token_clip_low, out.per_token_clip_high
        if sequence:
            # TRL flags each sequence's ratio (B, 1), fully masked rows included (ratio 1):
            # the objective table's flags on the per-sequence ratio.
            rho = out.per_token_ratio[:, :1]
            adv = inputs["advantages"].reshape(-1, 1).to(rho.dtype)
            low, high = OBJECTIVES[self._loss_options.objective].clipped(
                rho, adv, self._loss_options, torch.log(rho))
            teacher = inputs.get("teacher_mask")
            if teacher is not None:         # teacher rows count only under "ratio"
                counted = ~teacher.reshape(-1, 1).bool()
                if self._loss_options.teacher_objective != "ratio":
                    low, high = low & counted, high & counted

        def flag_mean(flag):
            return global_mean(flag.float(), sequence)

        if self._entropy_bonus_enabled:
            entropies = out.per_token_entropy
            effective = m
            if self.top_entropy_quantile < 1.0:
                effective = m * self.get_high_entropy_mask(entropies, mask,
                                                           1 - self.top_entropy_quantile)
            entropy_mean = (entropies * effective).sum() / effective.sum().clamp(min=1.0)
            # TRL logs the loss before its accumulation scaling and before the bonus.
            policy_loss = out.loss.detach() * divide_by + kernel_coef * entropy_mean
            metrics["policy_loss"].append(self.accelerator.gather(policy_loss).nanmean().item())
            if self.use_adaptive_entropy and mode == "train":
                self._update_adaptive_entropy(torch.stack([(entropies * effective).sum(),
                                                           effective.sum()]))
            if mode == "train" and self.accelerator.sync_gradients:
                metrics["entropy_coef"].append(self.entropy_coef)

        if self.beta != 0.0:        # per token (bias-corrected: times its sequence's ratio)
            metrics["kl"].append(global_mean(out.per_token_kl))
        metrics["entropy"].append(global_mean(out.per_token_entropy))
        if self.loss_type == "cispo":
            metrics["cispo_clip_ratio"].append(flag_mean(high))
        elif self.loss_type == "vespo":
            old = inputs.get("old_per_token_logps")
            log_ratio = torch.zeros_like(m) if old is None else (out.per_token_logp - old) * m
            is_ratio = inputs.get("importance_sampling_ratio")
            phi = self.get_gamma_weights(
                advantages=inputs["advantages"].reshape(-1, 1), log_ratio_per_token=log_ratio,
                mask=m, importance_sampling_ratio=is_ratio, k_pos=self.args.vespo_k_pos,
                lambda_pos=self.args.vespo_lambda_pos, k_neg=self.args.vespo_k_neg,
                lambda_neg=self.args.vespo_lambda_neg)
            metrics["vespo/phi_seq_mean"].append(global_mean(phi, True))
        elif self.loss_type != "sapo":
            region = low | high
            for name, flag in (("low_mean", low), ("high_mean", high), ("region_mean", region)):
                metrics[f"clip_ratio/{name}"].append(flag_mean(flag))

            def per_seq(flag):
                return flag[:, 0].float() if sequence else (flag.float() * m).sum(-1) / m.sum(-1)

            metrics["clip_ratio/low_min"].append(
                nanmin(self.accelerator.gather(per_seq(low))).item())
            metrics["clip_ratio/high_max"].append(
                nanmax(self.accelerator.gather(per_seq(high))).item())
        if self.hapo is not None:           # over every process's tokens, like TRL's means
            teacher = inputs.get("teacher_mask")
            teacher = (torch.zeros_like(m) if teacher is None
                       else teacher.reshape(-1, 1).float().expand_as(m))
            metrics["hapo/teacher_token_fraction"].append(global_mean(teacher))

    def _update_adaptive_entropy(self, stats):
        """TRL's adaptive entropy controller: the window's entropy over every rank moves
        ``entropy_coef`` by ``entropy_coef_delta`` at each optimizer step."""
        stats = stats.detach()
        self._entropy_window_stats = (stats if self._entropy_window_stats is None
                                      else self._entropy_window_stats + stats)
        if not self.accelerator.sync_gradients:
            return
        window = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
        world_entropy = (window[0] / window[1].clamp(min=1.0)).item()
        if world_entropy <= self.args.entropy_target:
            self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta,
                                    self.args.entropy_coef_max)
        else:
            self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta,
                                    self.args.entropy_coef_min)
        self._last_world_entropy = world_entropy
        self._entropy_window_stats = None

    # ------------------------------------------------------------------ HAPO
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)
        self._hapo_scored = (inputs, rewards_per_func)
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        if self.hapo is None or not self.model.training:
            return output           # evaluation stays plain GRPO
        return self._apply_hapo(output)

    def _prompt_key(self, row) -> int:
        """A prompt's identity for the persistent gate, the same on every process and
        across restarts: the dataset's ``prompt_id_column`` value if set, else the prompt
        itself (text or messages), hashed to an int64."""
        value = row[self.prompt_id_column] if self.prompt_id_column else row["prompt"]
        digest = hashlib.sha1(repr(value).encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "little", signed=True)

    @torch.no_grad()
    def _apply_hapo(self, output):
        """Gate and SSI on the generation batch of every process; this process's rows.

        TRL hands each process its slice of the rollouts but the rewards of all of them
        (groups may span processes). Every process runs the gate on the whole batch (the
        first process's decisions are broadcast), computes the SSI advantages of the whole
        batch, and swaps the demonstration into the replaced rollouts it holds.
        """
        inputs, rewards_per_func = self._hapo_scored
        device = output["completion_ids"].device
        G = self.num_generations
        weights = self.reward_weights.to(rewards_per_func.device)
        if torch.isnan(rewards_per_func).all(dim=1).any():
            raise ValueError("HAPO needs a reward for every rollout; a reward function returned "
                             "None for every function on some completion")
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1).to(device)
        n_local = len(inputs)
        start = self.accelerator.process_index * n_local
        P = rewards.numel() // G
        grouped = rewards.view(P, G)
        collapsed = (grouped == grouped[:, :1]).all(dim=1)

        eos = self._tokenizer.eos_token_id
        demos = [_teacher_ids(row.get(self.teacher_column), self._tokenizer, eos)
                 for row in inputs]
        demos = [None if d is None else d[:self.max_completion_length] for d in demos]
        has_demo_rows = torch.tensor([d is not None and d.numel() > 0 for d in demos],
                                     dtype=torch.long, device=device)
        keys_rows = torch.tensor([self._prompt_key(row) for row in inputs], dtype=torch.long,
                                 device=device)
        # A group's rows share a prompt: its first row speaks for it.
        has_demo = self.accelerator.gather(has_demo_rows).view(P, G)[:, 0].bool()
        keys = self.accelerator.gather(keys_rows).view(P, G)[:, 0].tolist()
        if self.hapo.inject == "gate":
            persistent = self._hapo_gate.memory == "persistent"
            inject = self._hapo_gate.decide(rewards, G, has_demo=has_demo,
                                            prompt_ids=keys if persistent else None)
            if self.accelerator.num_processes > 1:
                inject = broadcast_decisions(inject)
        elif self.hapo.inject == "always":
            inject = has_demo
        else:
            inject = torch.zeros_like(has_demo)
        options = self.hapo.advantages.updated(scale=self.scale_rewards)
        index = None
        if options.replace == "random":       # one draw per group, the same on every process
            index = torch.randint(0, G, (P,), generator=self._hapo_replace_generator)
            index = index.to(device)
        advantages, replaced = hk.group_advantages(rewards, G, inject, replace_index=index,
                                                   options=options)
        injected = replaced >= 0
        members = torch.arange(P, device=device) * G + replaced
        rows = [int(g) - start for g in members[injected].tolist()
                if start <= int(g) < start + n_local]

        # Widen the completion block so the injected demonstrations fit untruncated.
        old_width = output["completion_ids"].shape[1]
        width = max([old_width] + [demos[r].numel() for r in rows])
        pad = self._tokenizer.pad_token_id
        for key, value in (("completion_ids", pad), ("completion_mask", 0), ("tool_mask", 1),
                           ("old_per_token_logps", 0.0), ("ref_per_token_logps", 0.0),
                           ("sampling_per_token_logps", 0.0),
                           ("importance_sampling_ratio", 1.0)):
            # Per-token tensors only: vLLM's ratio is (B, 1) in the sequence modes.
            if key in output and output[key].dim() == 2 and output[key].shape[1] == old_width:
                output[key] = _pad_right(output[key], width, value)
        ids, mask, teacher = swap_in_demonstrations(
            output["completion_ids"], output["completion_mask"], rows,
            [demos[r] for r in rows], output.get("teacher_mask"), pad_token_id=pad)
        output["completion_ids"], output["completion_mask"] = ids, mask
        output["teacher_mask"] = teacher
        output["advantages"] = advantages[start:start + n_local].float()
        loss_mask = mask * output.get("tool_mask", 1)
        output["num_items_in_batch"] = self.accelerator.gather(loss_mask.sum()).sum()
        if rows:
            index = torch.tensor(rows, device=device)
            self._rescore_rows(output, index)
            # No sampler produced the demonstration: no importance correction, no drift.
            if "importance_sampling_ratio" in output:
                output["importance_sampling_ratio"][index] = 1.0
            if "sampling_per_token_logps" in output:
                fresh = output.get("old_per_token_logps")
                output["sampling_per_token_logps"][index] = (
                    0.0 if fresh is None else fresh[index].to(
                        output["sampling_per_token_logps"].dtype))

        # Whole-batch numbers: every process logs the same.
        mode = "train"
        self._metrics[mode]["hapo/injection_rate"].append(injected.float().mean().item())
        self._metrics[mode]["hapo/collapsed_group_fraction"].append(collapsed.float().mean().item())
        return output

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):
        """TRL's checkpoint, plus the gate's state (posteriors, step, random stream) in the
        same folder (TRL's pattern for its adaptive-entropy controller)."""
        super()._save_checkpoint(model, trial)
        if self._hapo_gate is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save({"gate": self._hapo_gate.state_dict(),
                        "replace_generator": self._hapo_replace_generator.get_state()},
                       os.path.join(folder, GATE_STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        """TRL's resume, plus the gate's state where the checkpoint holds one (every
        process loads it, so every process's gate continues the same stream)."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if self._hapo_gate is not None and checkpoint is not None:
            path = os.path.join(checkpoint, GATE_STATE_FILE)
            if os.path.exists(path):
                state = torch.load(path, weights_only=False)
                self._hapo_gate.load_state_dict(state["gate"])
                self._hapo_replace_generator.set_state(state["replace_generator"])

    def _rescore_rows(self, output, rows):
        """Old-policy and reference log-probs of the injected (teacher) rows."""
        ids = torch.cat([output["prompt_ids"][rows], output["completion_ids"][rows]], dim=1)
        am = torch.cat([output["prompt_mask"][rows], output["completion_mask"][rows]], dim=1)
        K = output["completion_ids"].size(1)
        if "old_per_token_logps" in output:
            lp, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, am, K)
            output["old_per_token_logps"][rows] = lp.to(output["old_per_token_logps"].dtype)
        if "ref_per_token_logps" in output:
            if self.ref_model is not None:
                lp, _, _ = self._get_per_token_logps_and_entropies(self.ref_model, ids, am, K)
            else:
                model = self.accelerator.unwrap_model(self.model)
                name = "ref" if "ref" in model.peft_config else None
                with use_adapter(model, adapter_name=name):
                    lp, _, _ = self._get_per_token_logps_and_entropies(self.model, ids, am, K)
            output["ref_per_token_logps"][rows] = lp.to(output["ref_per_token_logps"].dtype)
