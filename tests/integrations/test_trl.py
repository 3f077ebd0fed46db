"""HAPOGRPOTrainer against the real TRL GRPOTrainer (no mocks of TRL).

A tiny random Llama and a word-level tokenizer are built in code and saved to a temporary
folder; both trainers load them from there. For one batch the loss, every parameter
gradient and the logged loss metrics must equal TRL's own, for each supported loss_type and
both importance-sampling levels. Then a 3-step CPU training run with HAPO injection.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from hapo import HAPOConfig
from hapo.integrations.trl import SUPPORTED_LOSS_TYPES, TESTED_TRL, HAPOGRPOTrainer

WORDS = [f"w{i}" for i in range(58)]          # vocabulary 61: not a multiple of any block
G = 4                                          # rollouts per prompt


def test_trl_version_is_the_tested_one():
    assert trl.__version__ == TESTED_TRL


@pytest.fixture(scope="module")
def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def save_tiny_llama(tmp_path_factory, tokenizer, *, seed, tied):
    """A 2-layer Llama with random weights and the tokenizer, saved to a fresh folder."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tied,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    path = tmp_path_factory.mktemp("tiny-llama-tied" if tied else "tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    return save_tiny_llama(tmp_path_factory, tokenizer, seed=0, tied=False)


@pytest.fixture(scope="module")
def dataset():
    rows = {"prompt": ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"],
            "teacher": ["w10 w11 w12", "w13 w14", "w15 w16 w17 w18 w19 w20"]}
    return Dataset.from_dict(rows)


def zero_reward(completions, **kwargs):
    """Every rollout fails: every group collapses (sparse reward)."""
    return [0.0] * len(completions)


def make_args(tmp_path, **overrides):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=G, num_generations=G,
                max_completion_length=8, use_cpu=True, report_to=[], logging_steps=1,
                save_strategy="no", seed=0, disable_tqdm=True,
                bf16=False)           # fp32: the comparison with TRL is to rounding error
    return GRPOConfig(**{**base, **overrides})


def make_trainer(cls, model_dir, tokenizer, dataset, tmp_path, hapo=None, **overrides):
    kwargs = {"hapo": hapo} if cls is HAPOGRPOTrainer else {}
    trainer = cls(model=model_dir, reward_funcs=zero_reward, args=make_args(tmp_path, **overrides),
                  train_dataset=dataset, processing_class=tokenizer, **kwargs)
    trainer.current_gradient_accumulation_steps = 2   # exercises TRL's accumulation scaling
    trainer.model.train()
    return trainer


def make_batch(trl_trainer, seed=0):
    """One GRPO batch in TRL's layout: left-padded prompts, right-padded completions."""
    g = torch.Generator().manual_seed(seed)
    V = trl_trainer.model.config.vocab_size
    B, Lp, K = 4, 5, 7
    prompt_ids = torch.randint(3, V, (B, Lp), generator=g)
    prompt_mask = torch.ones(B, Lp, dtype=torch.long)
    prompt_mask[1, :2] = 0
    prompt_ids[1, :2] = 0
    completion_ids = torch.randint(3, V, (B, K), generator=g)
    lengths = torch.tensor([7, 3, 0, 5])                 # row 2: a masked (truncated) rollout
    completion_mask = (torch.arange(K)[None] < lengths[:, None]).long()
    completion_ids = completion_ids.masked_fill(completion_mask == 0, 0)
    with torch.no_grad():
        logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trl_trainer, trl_trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), K)
    # Old and reference log-probs away from the current ones: ratios hit both clip sides.
    old = logps + 0.4 * torch.randn(B, K, generator=g)
    ref = logps + 0.3 * torch.randn(B, K, generator=g)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completion_ids, "completion_mask": completion_mask,
            "advantages": torch.randn(B, generator=g),
            "old_per_token_logps": old * completion_mask,
            "ref_per_token_logps": ref * completion_mask,
            "num_items_in_batch": completion_mask.sum()}


def loss_and_grads(trainer, inputs):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, dict(inputs))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


LOSS_OPTIONS = dict(beta=0.04, use_bias_correction_kl=False, epsilon=0.2, epsilon_high=0.28,
                    delta=1.6, temperature=0.7)


def assert_equal_to_trl(loss_o, grads_o, loss_t, grads_t):
    """Our loss and every parameter gradient against TRL's (a non-trivial loss)."""
    assert math.isfinite(loss_t.item()) and loss_t.abs() > 1e-6
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-7)
    assert grads_o.keys() == grads_t.keys() and len(grads_t) > 0
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, name=name: f"{name}: {m}")


def assert_close_to_trl_bf16(loss_o, grads_o, loss_t, grads_t):
    """Under bf16 autocast: the loss and each gradient equal to TRL's up to bf16 rounding."""
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-2, atol=1e-4)
    for name in grads_t:
        rel = (grads_o[name] - grads_t[name]).norm() / grads_t[name].norm().clamp(min=1e-12)
        assert rel < 2e-2, (name, rel.item())


class FakeVLLM:
    """Stands in for TRL's ``vllm_generation``: completions of random tokens and sampler
    log-probs near the policy's (its own, plus noise), so that TRL's own code in
    ``_generate_and_score_completions`` computes ``importance_sampling_ratio`` (every mode)
    and ``sampling_per_token_logps`` exactly as it does after a vLLM rollout."""

    def __init__(self, trainer, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.trainer = trainer

    def sync_weights(self):
        pass

    @torch.no_grad()
    def generate(self, prompts, images, num_generations, profiler=None):
        completions, logprobs = [], []
        vocab = self.trainer.model.config.vocab_size
        for prompt in prompts:
            n = int(torch.randint(2, 8, (1,), generator=self.g))
            ids = torch.randint(3, vocab, (n,), generator=self.g)
            full = torch.cat([torch.tensor(prompt), ids])[None]
            lp, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                self.trainer, self.trainer.model, full, torch.ones_like(full), n)
            lp = lp[0] + 0.1 * torch.randn(n, generator=self.g)
            completions.append(ids.tolist())
            logprobs.append([[float(v)] for v in lp])
        return None, completions, logprobs, None


VLLM_ATTRS = ("use_vllm", "vllm_importance_sampling_correction", "vllm_importance_sampling_mode",
              "vllm_importance_sampling_clip_min", "vllm_importance_sampling_clip_max")


def turn_on_vllm(trainer, mode):
    """The trainer as if built with use_vllm=True (vLLM itself is not installed here)."""
    trainer.use_vllm = True
    trainer.vllm_importance_sampling_correction = True
    trainer.vllm_importance_sampling_mode = mode
    trainer.vllm_importance_sampling_clip_min = 0.5 if mode.endswith("mask") else None
    trainer.vllm_importance_sampling_clip_max = 3.0
    trainer._last_loaded_step = trainer.state.global_step


def make_vllm_batch(trl_trainer, dataset, mode, seed=0):
    """One generation batch made by TRL's own _generate_and_score_completions with a vLLM
    rollout: TRL's importance_sampling_ratio and sampling_per_token_logps included. The old
    log-probs are then moved away from the current ones (an older policy), so ratios clip."""
    turn_on_vllm(trl_trainer, mode)
    trl_trainer.vllm_generation = FakeVLLM(trl_trainer, seed)
    rows = [dataset[p] for p in range(2) for _ in range(G)][:G]
    with torch.no_grad():
        out = trl_trainer._generate_and_score_completions(rows)
    g = torch.Generator().manual_seed(seed + 1)
    mask = out["completion_mask"]
    for key, noise in (("old_per_token_logps", 0.4), ("ref_per_token_logps", 0.3)):
        if key in out:
            out[key] = (out[key] + noise * torch.randn(mask.shape, generator=g)) * mask
    out["advantages"] = torch.randn(mask.shape[0], generator=g)
    trl_trainer._metrics["train"].clear()
    return out


def trl_configs():
    """Every loss_type x importance-sampling level x {beta 0, beta > 0 with and without
    bias correction}; delta, the vLLM importance-sampling mode and the entropy options
    rotate through their values across them (a covering, not the full product)."""
    import itertools
    deltas = itertools.cycle([None, 1.6, 0.9, 1.1])
    modes = itertools.cycle([None, "sequence_mask", "token_truncate", "token_mask",
                             "sequence_truncate"])
    entropy = itertools.cycle([dict(), dict(top_entropy_quantile=0.5), dict(entropy_coef=0.05),
                               dict(off_policy_mask_threshold=0.05),
                               dict(top_entropy_quantile=0.3, entropy_coef=0.1,
                                    off_policy_mask_threshold=0.0)])
    configs = []
    for loss_type, level, (beta, bias) in itertools.product(
            SUPPORTED_LOSS_TYPES, ["token", "sequence"], [(0.0, True), (0.04, True),
                                                          (0.04, False)]):
        mode = next(modes)
        if loss_type == "vespo" and mode is not None and mode.startswith("sequence"):
            mode = "token_mask"             # TRL refuses sequence modes with vespo
        configs.append(dict(loss_type=loss_type, importance_sampling_level=level, beta=beta,
                            use_bias_correction_kl=bias, delta=next(deltas), vllm=mode,
                            **next(entropy)))
    return configs


def compare_metrics(ours, theirs):
    """Every loss metric TRL logged for the batch: the same names and values."""
    mine, want = ours._metrics["train"], theirs._metrics["train"]
    assert set(want) <= set(mine), set(want) - set(mine)
    for key in want:
        assert len(mine[key]) == len(want[key]), key
        for a, b in zip(mine[key], want[key]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-6), key


def config_ids(cfg):
    return "-".join(map(str, cfg.values()))


@pytest.mark.parametrize("cfg", trl_configs(), ids=config_ids)
def test_loss_and_gradients_equal_trl(model_dir, tokenizer, dataset, tmp_path, cfg):
    assert_config_equals_trl(model_dir, tokenizer, dataset, tmp_path, cfg, fused_linear=False)


def assert_config_equals_trl(model_dir, tokenizer, dataset, tmp_path, cfg, fused_linear):
    """One TRL-made batch under ``cfg``: loss, every parameter gradient and every logged
    loss metric equal TRL's."""
    cfg = dict(cfg)
    mode = cfg.pop("vllm")
    opts = dict(epsilon=0.2, epsilon_high=0.28, temperature=0.7, sapo_temperature_neg=1.3,
                **cfg)
    theirs = make_trainer(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    if fused_linear:
        ours = make_fused_trainer(model_dir, tokenizer, dataset, tmp_path, **opts)
    else:
        ours = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    assert ours.fused_linear == fused_linear
    if mode is None:
        inputs = make_batch(theirs)
    else:
        inputs = make_vllm_batch(theirs, dataset, mode)
        assert "importance_sampling_ratio" in inputs and "sampling_per_token_logps" in inputs
        turn_on_vllm(ours, mode)
    loss_t, grads_t = loss_and_grads(theirs, inputs)
    loss_o, grads_o = loss_and_grads(ours, inputs)
    assert_equal_to_trl(loss_o, grads_o, loss_t, grads_t)
    compare_metrics(ours, theirs)


def test_adaptive_entropy_equals_trl(model_dir, tokenizer, dataset, tmp_path):
    """TRL's adaptive entropy controller: no bonus on the first window, then the coefficient
    moves by entropy_coef_delta toward the target; the same losses, gradients and metrics."""
    opts = dict(loss_type="grpo", use_adaptive_entropy=True, entropy_coef=0.02,
                entropy_coef_delta=0.01, entropy_target=100.0, top_entropy_quantile=0.5)
    theirs = make_trainer(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    ours = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    for seed in range(3):
        inputs = make_batch(theirs, seed=seed)
        loss_t, grads_t = loss_and_grads(theirs, inputs)
        loss_o, grads_o = loss_and_grads(ours, inputs)
        assert_equal_to_trl(loss_o, grads_o, loss_t, grads_t)
        assert ours.entropy_coef == pytest.approx(theirs.entropy_coef)
        assert ours._last_world_entropy == pytest.approx(theirs._last_world_entropy, rel=1e-5)
    assert theirs.entropy_coef == pytest.approx(0.05)
    compare_metrics(ours, theirs)


def test_default_config_equals_trl(model_dir, tokenizer, dataset, tmp_path):
    """TRL's defaults (dapo, beta 0, no old log-probs: ratio 1)."""
    theirs = make_trainer(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path)
    ours = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path)
    inputs = make_batch(theirs, seed=1)
    del inputs["old_per_token_logps"], inputs["ref_per_token_logps"]
    loss_t, grads_t = loss_and_grads(theirs, inputs)
    loss_o, grads_o = loss_and_grads(ours, inputs)
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-7)
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], rtol=1e-4, atol=1e-6)


def assert_logps_and_entropies_equal(theirs, ours):
    """Per-token log-probs and entropies of one batch, ours against TRL's; returns the
    inputs and TRL's log-probs for further checks."""
    b = make_batch(theirs)
    ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
    am = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
    with torch.no_grad():
        lp_t, ent_t, _ = theirs._get_per_token_logps_and_entropies(theirs.model, ids, am, 7,
                                                                    compute_entropy=True)
        lp_o, ent_o, _ = ours._get_per_token_logps_and_entropies(ours.model, ids, am, 7,
                                                                  batch_size=3,
                                                                  compute_entropy=True)
    torch.testing.assert_close(lp_o, lp_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent_o, ent_t, rtol=1e-5, atol=1e-6)
    return ids, am, lp_t


def test_logps_and_entropies_equal_trl(model_dir, tokenizer, dataset, tmp_path):
    opts = dict(temperature=0.7)
    theirs = make_trainer(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    ours = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    assert_logps_and_entropies_equal(theirs, ours)


@pytest.mark.parametrize("overrides, word", [
    (dict(loss_type="ppo"), "loss_type"),
    (dict(loss_type="sapo", sapo_temperature_neg=0.0), "sapo_temperature_neg"),
])
def test_unsupported_options_raise(model_dir, tokenizer, dataset, tmp_path, overrides, word):
    with pytest.raises(ValueError, match=word):
        make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **overrides)


def test_hapo_fields_owned_by_grpo_config_raise(model_dir, tokenizer, dataset, tmp_path):
    with pytest.raises(ValueError, match="HAPOConfig.loss.eps_low"):
        make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path,
                     hapo=HAPOConfig.from_kwargs(eps_low=0.3))
    with pytest.raises(ValueError, match="teacher_column|'teacher'"):
        make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset.remove_columns("teacher"),
                     tmp_path, hapo=HAPOConfig())


def test_hapo_batch_injects_the_demonstration(model_dir, tokenizer, dataset, tmp_path):
    """All rollouts fail: every group gets its teacher row, reward 1, and SSI advantages."""
    trainer = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path,
                           hapo=HAPOConfig(gate_threshold=0.8), num_iterations=2, beta=0.02,
                           use_bias_correction_kl=False)    # old and reference log-probs too
    rows = [dataset[p] for p in range(len(dataset)) for _ in range(G)]
    out = trainer._generate_and_score_completions(rows)
    P = len(dataset)
    teacher = out["teacher_mask"].view(P, G)
    assert teacher.sum(1).tolist() == [1] * P and teacher[:, 0].all()   # ties: first member
    for p in range(P):
        demo = tokenizer(dataset[p]["teacher"], add_special_tokens=False)["input_ids"] + [1]
        row = p * G
        n = int(out["completion_mask"][row].sum())
        assert out["completion_ids"][row, :n].tolist() == demo
    # G = 4, one success in a group of failures: A = (1 - 1/4) / (std + 1e-4), std = 0.5.
    adv = out["advantages"].view(P, G)
    torch.testing.assert_close(adv[:, 0], torch.full((P,), 0.75 / 0.5001))
    torch.testing.assert_close(adv[:, 1:], torch.full((P, G - 1), -0.25 / 0.5001))
    assert out["num_items_in_batch"] == out["completion_mask"].sum()
    # The teacher rows' old-policy and reference log-probs are those of the new tokens.
    ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
    am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
    K = out["completion_ids"].size(1)
    with torch.no_grad():
        fresh, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, am, K)
        fresh_ref, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, am, K)
    rows_t = out["teacher_mask"]
    torch.testing.assert_close(out["old_per_token_logps"][rows_t], fresh[rows_t])
    torch.testing.assert_close(out["ref_per_token_logps"][rows_t], fresh_ref[rows_t])
    assert out["old_per_token_logps"].shape == out["completion_ids"].shape
    assert trainer._metrics["train"]["hapo/injection_rate"] == [1.0]
    assert trainer._metrics["train"]["hapo/collapsed_group_fraction"] == [1.0]


def test_three_step_training_run_with_hapo(model_dir, tokenizer, dataset, tmp_path):
    trainer = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path,
                           hapo=HAPOConfig(), max_steps=3, learning_rate=1e-2,
                           loss_type="grpo", beta=0.02, use_bias_correction_kl=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and len(logs) == 3
    for h in logs:
        assert math.isfinite(h["loss"])
        assert h["hapo/injection_rate"] == 1.0          # every group collapsed: the gate opens
        assert h["hapo/collapsed_group_fraction"] == 1.0
        assert 0 < h["hapo/teacher_token_fraction"] < 1
        assert "clip_ratio/region_mean" in h and "entropy" in h and "kl" in h
    changed = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert changed


def test_bf16_autocast_close_to_trl(model_dir, tokenizer, dataset, tmp_path):
    """GRPOConfig's default bf16 autocast: equal to TRL up to bf16 rounding."""
    opts = dict(LOSS_OPTIONS, loss_type="dapo", bf16=True)
    theirs = make_trainer(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    ours = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    inputs = make_batch(theirs)
    loss_t, grads_t = loss_and_grads(theirs, inputs)
    loss_o, grads_o = loss_and_grads(ours, inputs)
    assert_close_to_trl_bf16(loss_o, grads_o, loss_t, grads_t)


def test_teacher_rows_use_the_shaped_objective(model_dir, tokenizer, dataset, tmp_path):
    """With a teacher_mask in the batch the loss is design section 4's, teacher rows shaped."""
    from hapo_kernels.reference import hapo_loss

    opts = dict(LOSS_OPTIONS, loss_type="grpo")
    ours = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path,
                        hapo=HAPOConfig(), **opts)
    theirs = make_trainer(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    inputs = make_batch(theirs)
    inputs["teacher_mask"] = torch.tensor([True, False, False, False])
    loss, _ = loss_and_grads(ours, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        logits = ours._completion_logits(ours.model, ids, am, 7)
    want = hapo_loss(logits, inputs["completion_ids"], inputs["advantages"],
                     mask=inputs["completion_mask"], old_logp=inputs["old_per_token_logps"],
                     ref_logp=inputs["ref_per_token_logps"], teacher_mask=inputs["teacher_mask"],
                     temperature=0.7, eps_low=0.2, eps_high=0.28, delta=1.6, beta=0.04,
                     importance_sampling="token", aggregation="grpo").loss / 2
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
    without = dict(inputs)
    del without["teacher_mask"]
    assert not torch.isclose(loss_and_grads(ours, without)[0], loss)


def test_hapo_widens_the_batch_for_a_longer_demonstration(model_dir, tokenizer, dataset,
                                                          tmp_path):
    trainer = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path,
                           hapo=HAPOConfig())
    g = torch.Generator().manual_seed(0)
    output = {"prompt_ids": torch.randint(3, 61, (G, 3), generator=g),
              "prompt_mask": torch.ones(G, 3, dtype=torch.long),
              "completion_ids": torch.randint(3, 61, (G, 3), generator=g),
              "completion_mask": torch.ones(G, 3, dtype=torch.long),
              "advantages": torch.zeros(G), "num_items_in_batch": torch.tensor(3 * G)}
    trainer._hapo_scored = ([dataset[2]] * G, torch.tensor([[0.0], [1.0], [0.0], [1.0]]))
    out = trainer._apply_hapo(output)
    demo = tokenizer(dataset[2]["teacher"], add_special_tokens=False)["input_ids"] + [1]
    assert out["completion_ids"].shape == (G, len(demo)) == out["completion_mask"].shape
    assert out["completion_ids"][0].tolist() == demo and out["completion_mask"][0].all()
    assert out["teacher_mask"].tolist() == [True, False, False, False]  # lowest reward, first
    cmask = out["completion_mask"]
    assert (cmask[1:, 3:] == 0).all() and (cmask[1:, :3] == 1).all()
    assert int(out["num_items_in_batch"]) == len(demo) + 3 * (G - 1)
    # Rewards [1 (teacher), 1, 0, 1]: mean 0.75, std 0.5.
    torch.testing.assert_close(out["advantages"], torch.tensor([0.25, 0.25, -0.75, 0.25]) / 0.5001)


# ---------------------------------------------------------------- fused_linear=True
# The loss and log-probs from the last hidden state and lm_head.weight, never the logits.
# Chunks of 5 tokens cut across the 7-token completions of the test batch.
FUSED = dict(fused_linear=True, fused_linear_chunk_size=5)


def make_fused_trainer(model_dir, tokenizer, dataset, tmp_path, hapo=None, **overrides):
    trainer = HAPOGRPOTrainer(model=model_dir, reward_funcs=zero_reward,
                              args=make_args(tmp_path, **overrides), train_dataset=dataset,
                              processing_class=tokenizer, hapo=hapo, **FUSED)
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()
    return trainer


def assert_fused_equals_trl(model_dir, tokenizer, dataset, tmp_path, seed=0, **opts):
    theirs = make_trainer(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    ours = make_fused_trainer(model_dir, tokenizer, dataset, tmp_path, **opts)
    assert ours.fused_linear
    inputs = make_batch(theirs, seed=seed)
    head_calls = []
    hook = ours.model.get_output_embeddings().register_forward_hook(
        lambda *args: head_calls.append(1))
    try:
        loss_o, grads_o = loss_and_grads(ours, inputs)
    finally:
        hook.remove()
    assert head_calls == []                  # the LM head module never ran: no logits
    loss_t, grads_t = loss_and_grads(theirs, inputs)
    assert_equal_to_trl(loss_o, grads_o, loss_t, grads_t)
    return ours, theirs


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_fused_linear_loss_and_gradients_equal_trl(model_dir, tokenizer, dataset, tmp_path,
                                                   loss_type, level):
    opts = dict(LOSS_OPTIONS, loss_type=loss_type, importance_sampling_level=level)
    ours, theirs = assert_fused_equals_trl(model_dir, tokenizer, dataset, tmp_path, **opts)
    compare_metrics(ours, theirs)
    assert theirs._metrics["train"]["clip_ratio/region_mean"][0] > 0


# Every other configuration of the covering (each loss type, level, KL setting; the
# rotating delta, vLLM mode and entropy options) on the fused LM head.
@pytest.mark.parametrize("cfg", trl_configs()[::2], ids=config_ids)
def test_fused_linear_trl_options_equal_trl(model_dir, tokenizer, dataset, tmp_path, cfg):
    assert_config_equals_trl(model_dir, tokenizer, dataset, tmp_path, cfg, fused_linear=True)


def test_fused_linear_default_config_equals_trl(model_dir, tokenizer, dataset, tmp_path):
    """TRL's defaults: dapo with the num_items_in_batch normaliser, no old log-probs."""
    theirs = make_trainer(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path)
    ours = make_fused_trainer(model_dir, tokenizer, dataset, tmp_path)
    inputs = make_batch(theirs, seed=1)
    del inputs["old_per_token_logps"], inputs["ref_per_token_logps"]
    inputs["num_items_in_batch"] = inputs["num_items_in_batch"] * 3   # a larger generation batch
    loss_t, grads_t = loss_and_grads(theirs, inputs)
    loss_o, grads_o = loss_and_grads(ours, inputs)
    torch.testing.assert_close(loss_o, loss_t, rtol=1e-5, atol=1e-7)
    for name in grads_t:
        torch.testing.assert_close(grads_o[name], grads_t[name], rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory, tokenizer):
    """Like model_dir, with lm_head.weight tied to the input embedding, and a bias-free head."""
    return save_tiny_llama(tmp_path_factory, tokenizer, seed=1, tied=True)


@pytest.mark.parametrize("loss_type, level", [("dapo", "token"), ("grpo", "sequence")])
def test_fused_linear_tied_embeddings_equal_trl(tied_model_dir, tokenizer, dataset, tmp_path,
                                               loss_type, level):
    opts = dict(LOSS_OPTIONS, loss_type=loss_type, importance_sampling_level=level)
    ours, _ = assert_fused_equals_trl(tied_model_dir, tokenizer, dataset, tmp_path, **opts)
    model = ours.model
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    # The one tied parameter got both gradients: the head's and the embedding lookup's.
    inputs = make_batch(ours)
    _, grads = loss_and_grads(ours, inputs)
    tied = grads["model.embed_tokens.weight"]
    unused = sorted(set(range(tied.shape[0])) - set(inputs["prompt_ids"].flatten().tolist())
                    - set(inputs["completion_ids"].flatten().tolist()))
    assert unused and tied[unused].abs().sum() > 0      # rows only the head touches


def test_fused_linear_logps_and_entropies_equal_trl(model_dir, tokenizer, dataset, tmp_path):
    opts = dict(temperature=0.7, beta=0.04, use_bias_correction_kl=False)   # a reference model
    theirs = make_trainer(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    ours = make_fused_trainer(model_dir, tokenizer, dataset, tmp_path, **opts)
    ids, am, lp_t = assert_logps_and_entropies_equal(theirs, ours)
    with torch.no_grad():
        lp_ref, _, _ = ours._get_per_token_logps_and_entropies(ours.ref_model, ids, am, 7)
    torch.testing.assert_close(lp_ref, lp_t, rtol=1e-5, atol=1e-6)   # same weights at start


def test_fused_linear_bf16_autocast_close_to_trl(model_dir, tokenizer, dataset, tmp_path):
    opts = dict(LOSS_OPTIONS, loss_type="dapo", bf16=True)
    theirs = make_trainer(GRPOTrainer, model_dir, tokenizer, dataset, tmp_path, **opts)
    ours = make_fused_trainer(model_dir, tokenizer, dataset, tmp_path, **opts)
    inputs = make_batch(theirs)
    loss_t, grads_t = loss_and_grads(theirs, inputs)
    loss_o, grads_o = loss_and_grads(ours, inputs)
    assert_close_to_trl_bf16(loss_o, grads_o, loss_t, grads_t)


@pytest.mark.parametrize("field, value", [("final_logit_softcapping", 30.0),
                                          ("logit_scale", 0.5)])
def test_fused_linear_rejects_logit_transforms(model_dir, tokenizer, dataset, tmp_path,
                                               field, value):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    setattr(model.config, field, value)
    with pytest.raises(ValueError, match=f"fused_linear.*{field}"):
        HAPOGRPOTrainer(model=model, reward_funcs=zero_reward, args=make_args(tmp_path),
                        train_dataset=dataset, processing_class=tokenizer, fused_linear=True)


def test_fused_linear_options(model_dir, tokenizer, dataset, tmp_path):
    """HAPOConfig(fused_linear=True) turns the path on; bad or conflicting values raise."""
    trainer = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path,
                           hapo=HAPOConfig(fused_linear=True, fused_linear_chunk_size=3))
    assert trainer.fused_linear and trainer.fused_linear_chunk_size == 3
    assert not make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset,
                            tmp_path).fused_linear                       # off by default
    with pytest.raises(ValueError, match="fused_linear_chunk_size"):
        make_fused_trainer(model_dir, tokenizer, dataset, tmp_path,
                           hapo=HAPOConfig(fused_linear_chunk_size=7))
    with pytest.raises(ValueError, match="fused_linear must be a bool"):
        HAPOGRPOTrainer(model=model_dir, reward_funcs=zero_reward, args=make_args(tmp_path),
                        train_dataset=dataset, processing_class=tokenizer, fused_linear=1)


def test_fused_linear_three_step_training_run_with_hapo(model_dir, tokenizer, dataset,
                                                        tmp_path, monkeypatch):
    import hapo_kernels as hk

    calls = {"loss": 0, "logps": 0}
    for name, key in (("fused_linear_hapo_loss", "loss"),
                      ("fused_linear_selective_log_softmax", "logps")):
        def spy(*args, _fn=getattr(hk, name), _key=key, **kwargs):
            calls[_key] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(hk, name, spy)
    trainer = make_fused_trainer(model_dir, tokenizer, dataset, tmp_path,
                                 hapo=HAPOConfig(), max_steps=3, learning_rate=1e-2,
                                 loss_type="grpo", beta=0.02, use_bias_correction_kl=False,
                                 num_iterations=2)          # old log-probs on the fused path
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert trainer.state.global_step == 3 and len(logs) == 3
    assert calls["loss"] == 3 and calls["logps"] > 0
    for h in logs:
        assert math.isfinite(h["loss"])
        assert 0 < h["hapo/teacher_token_fraction"] < 1
        assert "clip_ratio/region_mean" in h and "entropy" in h and "kl" in h
    # A batch is generated (and the gate runs) every num_iterations = 2 steps.
    rates = [h["hapo/injection_rate"] for h in logs if "hapo/injection_rate" in h]
    assert rates == [1.0, 1.0]
    changed = any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert changed


def length_reward(completions, **kwargs):
    """A reward that differs within a group (the completion's length), so every loss type
    gets a learning signal."""
    return [float(len(c.split())) for c in completions]


@pytest.mark.parametrize("loss_type", ["bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo",
                                       "vespo", "grpo"])
def test_train_loss_types(model_dir, tokenizer, dataset, tmp_path, loss_type):
    """TRL's own test_train_loss_types (tests/test_grpo_trainer.py), the trainer swapped:
    every loss type trains and every parameter changes. Its pattern and settings; the tiny
    local Llama and a length reward stand in for the Hub models (offline here)."""
    rows = Dataset.from_dict({"prompt": [dataset[i % 3]["prompt"] for i in range(6)]})
    training_args = GRPOConfig(
        output_dir=str(tmp_path),
        importance_sampling_level="sequence" if loss_type == "luspo" else "token",
        learning_rate=0.1,  # higher lr: gradients are tiny and the default lr can stall updates
        per_device_train_batch_size=3,  # reduce the batch size to reduce memory usage
        num_generations=3,  # reduce the number of generations to reduce memory usage
        max_completion_length=32,  # reduce the completion length to reduce memory usage
        gradient_accumulation_steps=2,  # DAPO with an accumulated batch
        loss_type=loss_type, report_to="none", use_cpu=True, bf16=False, seed=0,
        save_strategy="no", disable_tqdm=True)
    trainer = HAPOGRPOTrainer(model=model_dir, reward_funcs=length_reward, args=training_args,
                              train_dataset=rows, processing_class=tokenizer)
    previous_trainable_params = {n: param.clone() for n, param in trainer.model.named_parameters()}
    trainer.train()
    assert trainer.state.log_history[-1]["train_loss"] is not None
    for n, param in previous_trainable_params.items():
        new_param = trainer.model.get_parameter(n)
        assert not torch.equal(param, new_param), f"Parameter {n} has not changed."


# ---------------------------------------------------------------- HAPO on several processes
RUN_SCRIPT = os.path.join(os.path.dirname(__file__), "hapo_trl_run.py")


def run_hapo_script(model_dir, out, per_device, processes, port=29533):
    """hapo_trl_run.py on one process, or on ``processes`` gloo processes via torchrun
    (accelerate's launcher runs a single process with --cpu)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    if processes == 1:
        cmd = [sys.executable, RUN_SCRIPT]
    else:
        torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
        cmd = [torchrun, "--nproc_per_node", str(processes), "--master_port", str(port),
               RUN_SCRIPT]
    done = subprocess.run(cmd + [model_dir, str(out), "--per-device", str(per_device)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out, weights_only=False)


def test_two_processes_equal_one(model_dir, tmp_path):
    """HAPO with groups of 4 rollouts over 2 gloo processes (6 rollouts each: the middle
    group spans both) equals one process with the same global batch of 12 and seed: the
    same injections, losses and logged HAPO metrics at every step, on every process, and
    the same parameters (float32 rounding) and gate state after 4 steps."""
    one = run_hapo_script(model_dir, tmp_path / "one.pt", per_device=12, processes=1)
    two = run_hapo_script(model_dir, tmp_path / "two.pt", per_device=6, processes=2)
    assert (one["processes"], two["processes"]) == (1, 2)
    steps_one = [h for h in one["history"] if "loss" in h]
    steps_two = [h for h in two["history"] if "loss" in h]
    assert len(steps_one) == len(steps_two) == 4
    rates = []
    for a, b in zip(steps_one, steps_two):
        for key in ("loss", "hapo/injection_rate", "hapo/collapsed_group_fraction",
                    "hapo/teacher_token_fraction", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
        rates.append(a["hapo/injection_rate"])
    assert len(set(rates)) > 1            # the annealed Thompson gate both opened and closed
    # Adam divides by the gradient's running RMS, so float32 reduction-order noise in a
    # near-zero gradient reaches the parameters amplified: 1.2e-6 seen on some CPUs. The
    # bound, 1e-5, is a hundredth of one step (lr 1e-3).
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, rtol=1e-5, atol=1e-5)
        assert not torch.equal(p, LlamaForCausalLM.from_pretrained(model_dir)
                               .get_parameter(name).detach()) or "norm" in name
    assert one["gate"]["step"] == two["gate"]["step"] == 4
    assert torch.equal(one["gate"]["generator"], two["gate"]["generator"])
    logged = [torch.load(f"{tmp_path / 'two.pt'}.rank{r}", weights_only=False)["logged"]
              for r in (0, 1)]
    assert logged[0] == logged[1] and any(entry for entry in logged[0])


# ---------------------------------------------------------------- gate state and memory
def annealed_thompson():
    return HAPOConfig(gate_mode="thompson", gate_seed=5, gate_threshold=0.8,
                      gate_schedule="cosine", gate_gamma_min=0.05, gate_schedule_steps=4)


def injection_log(trainer):
    return [(h["step"], h["hapo/injection_rate"]) for h in trainer.state.log_history
            if "hapo/injection_rate" in h]


def test_resume_continues_the_gate(model_dir, tokenizer, tmp_path):
    """The gate's state goes into TRL's checkpoint folder; resume_from_checkpoint restores
    it, so the resumed run continues the anneal and the Thompson stream exactly."""
    from hapo.integrations.trl import GATE_STATE_FILE
    rows = Dataset.from_dict({"prompt": [f"w{i} w{i + 1}" for i in range(1, 13)],
                              "teacher": [f"w{i + 20} w{i + 21}" for i in range(1, 13)]})
    opts = dict(max_steps=6, save_strategy="steps", save_steps=3, learning_rate=1e-3,
                per_device_train_batch_size=2 * G)
    full = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, rows, tmp_path / "full",
                        hapo=annealed_thompson(), **opts)
    full.train()
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / GATE_STATE_FILE).exists()
    saved = torch.load(checkpoint / GATE_STATE_FILE, weights_only=False)
    assert saved["gate"]["step"] == 3

    resumed = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, rows, tmp_path / "resumed",
                           hapo=annealed_thompson(), **opts)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    want = [entry for entry in injection_log(full) if entry[0] > 3]
    assert [e for e in injection_log(resumed) if e[0] > 3] == want and len(want) == 3
    assert len({rate for _, rate in injection_log(full)}) > 1     # the gate opened and closed
    a, b = full._hapo_gate.state_dict(), resumed._hapo_gate.state_dict()
    assert a["step"] == b["step"] == 6
    assert torch.equal(a["generator"], b["generator"])
    # Without the restore the gate would restart at step 0 (gamma 0.8) and another stream.
    fresh = annealed_thompson().make_gate()
    assert fresh.gamma() == pytest.approx(0.8) and resumed._hapo_gate.gamma() < 0.1


@pytest.mark.parametrize("column", [None, "uid"])
def test_persistent_gate_memory(model_dir, tokenizer, dataset, tmp_path, column):
    """gate_memory="persistent": one posterior per prompt across steps, keyed by the
    dataset's prompt_id_column or the prompt itself."""
    rows = dataset.add_column("uid", ["a", "b", "c"])
    trainer = HAPOGRPOTrainer(
        model=model_dir, reward_funcs=zero_reward,
        args=make_args(tmp_path, max_steps=3, learning_rate=1e-3), train_dataset=rows,
        processing_class=tokenizer, prompt_id_column=column,
        hapo=HAPOConfig(gate_memory="persistent", gate_discount=0.5))
    trainer.train()
    counts = trainer._hapo_gate.counts
    keys = {trainer._prompt_key(rows[i]) for i in range(3)}
    assert set(counts) == keys and len(keys) == 3
    # 3 steps of one prompt (G = 4 rollouts) each: every prompt seen once, no successes.
    assert sorted(c for _, c in counts.values()) == [float(G)] * 3
    assert all(s == 0.0 for s, _ in counts.values())
    if column == "uid":       # the identity is the column's, not the prompt's
        other = rows.map(lambda r: {"prompt": r["prompt"] + " w50"})
        assert trainer._prompt_key(other[0]) == trainer._prompt_key(rows[0])
    with pytest.raises(ValueError, match="prompt_id_column"):
        HAPOGRPOTrainer(model=model_dir, reward_funcs=zero_reward, args=make_args(tmp_path),
                        train_dataset=rows, processing_class=tokenizer,
                        prompt_id_column="nope", hapo=HAPOConfig())


@pytest.mark.parametrize("replace", ["worst", "fixed", "random"])
def test_hapo_replace_modes(model_dir, tokenizer, dataset, tmp_path, replace):
    """advantages.replace picks the member the demonstration replaces (random: seeded by
    GRPOConfig.seed, the same draw on every process)."""
    from hapo_kernels import AdvantageOptions
    trainer = make_trainer(HAPOGRPOTrainer, model_dir, tokenizer, dataset, tmp_path,
                           hapo=HAPOConfig(advantages=AdvantageOptions(replace=replace)))
    g = torch.Generator().manual_seed(0)
    output = {"prompt_ids": torch.randint(3, 61, (G, 3), generator=g),
              "prompt_mask": torch.ones(G, 3, dtype=torch.long),
              "completion_ids": torch.randint(3, 61, (G, 3), generator=g),
              "completion_mask": torch.ones(G, 3, dtype=torch.long),
              "advantages": torch.zeros(G), "num_items_in_batch": torch.tensor(3 * G)}
    trainer._hapo_scored = ([dataset[1]] * G, torch.tensor([[1.0], [0.0], [1.0], [0.0]]))
    out = trainer._apply_hapo(output)
    member = {"worst": 1, "fixed": 0,
              "random": int(torch.randint(0, G, (1,), generator=torch.Generator().manual_seed(0)))}
    want = [m == member[replace] for m in range(G)]
    assert out["teacher_mask"].tolist() == want


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory, tokenizer):
    """A 2-layer Mixtral (4 experts, top 2) with random weights: a MoE router aux loss."""
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(2)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, pad_token_id=0, eos_token_id=1,
                           bos_token_id=None, router_aux_loss_coef=0.02)
    path = tmp_path_factory.mktemp("tiny-mixtral")
    MixtralForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_moe_router_aux_loss_equals_trl(moe_model_dir, tokenizer, dataset, tmp_path):
    """TRL adds router_aux_loss_coef * aux / GA for MoE models (the architecture's own
    coefficient by default): the same loss, gradients (router weights included) and
    aux_loss metric."""
    opts = dict(LOSS_OPTIONS, loss_type="grpo")
    theirs = make_trainer(GRPOTrainer, moe_model_dir, tokenizer, dataset, tmp_path, **opts)
    ours = make_trainer(HAPOGRPOTrainer, moe_model_dir, tokenizer, dataset, tmp_path, **opts)
    assert theirs.aux_loss_enabled and ours.aux_loss_enabled
    inputs = make_batch(theirs)
    loss_t, grads_t = loss_and_grads(theirs, inputs)
    loss_o, grads_o = loss_and_grads(ours, inputs)
    assert_equal_to_trl(loss_o, grads_o, loss_t, grads_t)
    assert any("gate" in name for name in grads_t)     # the router got the aux gradient
    compare_metrics(ours, theirs)
    assert "aux_loss" in ours._metrics["train"]
    with pytest.raises(ValueError, match="router"):
        make_fused_trainer(moe_model_dir, tokenizer, dataset, tmp_path, **opts)
