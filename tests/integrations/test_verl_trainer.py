"""HAPO end to end in verl's trainer, step by step on CPU against verl's real classes.

verl 0.9.1 cannot run its FSDP engine without CUDA, so the Ray run itself is in
bench/gpu_check.sh. Here every step the trainer adds runs on a real ``DataProto`` batch
laid out as verl's agent loop lays it out (left-padded prompts, right-padded responses):
(a) the gate on the groups' scores, (b) the demonstration written into the replaced rows and
scored by verl's gsm8k reward function, (c) verl's own ``_compute_old_log_prob`` of the
edited batch through a CPU stand-in for the actor worker, the ``"hapo"`` estimator through
verl's ``compute_advantage``, and (d) verl's actor loss (``ppo_loss``, patched) on the
batch converted by verl's padding helpers: teacher rows get the shaped objective. Plus the
Hydra keys, the gate in checkpoints, and the worker-side patches through
``VERL_USE_EXTERNAL_MODULES`` alone (a subprocess).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from verl import DataProto
from verl.trainer.ppo import core_algos
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, compute_advantage
from verl.utils import tensordict_utils as tu
from verl.utils.reward_score import default_compute_score
from verl.workers.config import ActorConfig
from verl.workers.config.actor import PolicyLossConfig
from verl.workers.utils import losses as verl_losses
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

import hapo.integrations.verl as hv
import hapo.integrations.verl_trainer as hvt

P, G, PROMPT, RESPONSE = 3, 4, 6, 12
VOCAB = "#0123456789 abcdefghijklmnopqrstuvwxyz=+.?"


class CharTokenizer:
    """A character tokenizer: id 0 pads, id 1 ends a sequence, then one id per character."""
    pad_token_id = 0
    eos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return [2 + VOCAB.index(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(VOCAB[i - 2] for i in ids if i >= 2)


class GSM8KRewardManager:
    """Stands in for verl's reward loop manager (Ray workers): the same output, scored by
    verl's own rule-based gsm8k function."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = 0

    def compute_rm_score(self, data):
        self.calls += 1
        R = data.batch["responses"].shape[1]
        valid = data.batch["attention_mask"][:, -R:]
        rm = torch.zeros(len(data), R)
        for i in range(len(data)):
            n = int(valid[i].sum())
            text = self.tokenizer.decode(data.batch["responses"][i, :n].tolist())
            rm[i, n - 1] = default_compute_score(
                data.non_tensor_batch["data_source"][i], text,
                data.non_tensor_batch["reward_model"][i]["ground_truth"])
        return DataProto.from_dict(tensors={"rm_scores": rm})


def hydra_config(*hapo_overrides):
    """verl's packaged trainer config, composed as its command line would be."""
    import hydra
    import verl.trainer.main_ppo as main_ppo
    config_dir = os.path.join(os.path.dirname(main_ppo.__file__), "config")
    with hydra.initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra.compose(config_name="ppo_trainer", overrides=[
            "algorithm.adv_estimator=hapo", "actor_rollout_ref.rollout.n=4",
            "actor_rollout_ref.actor.policy_loss.loss_mode=hapo", *hapo_overrides])


def make_batch(seed=0):
    """A batch as verl has it after scoring: uids, left-padded prompts, right-padded
    responses, gsm8k rewards at the last response token, demonstrations in extra_info."""
    tok = CharTokenizer()
    g = torch.Generator().manual_seed(seed)
    bs = P * G
    plen = torch.randint(2, PROMPT + 1, (bs,), generator=g)
    rlen = torch.randint(8, RESPONSE + 1, (bs,), generator=g)
    prompt_mask = (torch.arange(PROMPT)[None] >= (PROMPT - plen)[:, None]).long()
    resp_mask = (torch.arange(RESPONSE)[None] < rlen[:, None]).long()
    prompts = torch.randint(2, len(VOCAB) + 2, (bs, PROMPT), generator=g) * prompt_mask
    responses = torch.randint(2, len(VOCAB) + 2, (bs, RESPONSE), generator=g) * resp_mask
    answer = torch.tensor(tok.encode("#### 42"))
    rm = torch.zeros(bs, RESPONSE)
    for i in (5, 6):                           # group 1 has two correct responses
        n = int(rlen[i])
        responses[i, n - answer.numel():n] = answer
        rm[i, n - 1] = 1.0
    attention = torch.cat([prompt_mask, resp_mask], 1)
    demos = ["so #### 42", [2 + VOCAB.index(c) for c in "#### 42"] + [1], None]
    extra = np.array([{"hapo_demonstration": demos[i // G]} if demos[i // G] is not None
                      else {} for i in range(bs)], dtype=object)
    uids = np.array([f"uid-{i // G}" for i in range(bs)], dtype=object)
    batch = DataProto.from_dict(
        tensors=dict(prompts=prompts, responses=responses,
                     input_ids=torch.cat([prompts, responses], 1), attention_mask=attention,
                     position_ids=(attention.cumsum(-1) - 1).clamp(min=0),
                     response_mask=resp_mask.float(), rm_scores=rm),
        non_tensors={"uid": uids, "extra_info": extra,
                     "data_source": np.array(["openai/gsm8k"] * bs, dtype=object),
                     "reward_model": np.array([{"ground_truth": "42"}] * bs, dtype=object),
                     "index": np.array([i // G for i in range(bs)], dtype=object)},
        meta_info={"global_token_num": attention.sum(-1).tolist(), "temperature": 1.0})
    perm = torch.randperm(bs, generator=g)           # verl's _balance_batch reorders rows
    return batch.select_idxs(perm.numpy()), tok


class TinyPolicy(torch.nn.Module):
    """A causal-enough policy for log-probs: each position's logits from its token."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.embed = torch.nn.Parameter(torch.randn(len(VOCAB) + 2, 16, generator=g))
        self.head = torch.nn.Parameter(torch.randn(16, len(VOCAB) + 2, generator=g) * 0.5)

    def token_logprobs(self, ids):
        """``out[t] = log p(ids[t+1] | ids[t])``, 0 at the end: verl's no-padding layout."""
        logits = self.embed[ids] @ self.head
        out = torch.zeros(ids.numel())
        out[:-1] = torch.log_softmax(logits[:-1], -1).gather(-1, ids[1:, None]).squeeze(-1)
        return out


class CPUActorWorkers:
    """Stands in for verl's actor worker group: ``compute_log_prob`` on the no-padding
    TensorDict that verl's trainer builds, returning what verl's workers return."""

    def __init__(self, policy):
        self.policy = policy
        self.seen = None

    def compute_log_prob(self, batch_td):
        self.seen = batch_td
        ids = batch_td["input_ids"]
        with torch.no_grad():
            seqs = [self.policy.token_logprobs(s) for s in ids.unbind()]
        nested = torch.nested.as_nested_tensor(seqs, layout=torch.jagged)
        return tu.get_tensordict({"log_probs": nested, "entropy": nested.clone()},
                                 non_tensor_dict={"metrics": {"mfu": 0.0}})


def make_trainer(config, tok, policy=None):
    """verl's trainer class without its Ray workers (``__init__`` starts none of them on
    CPU here): the attributes the HAPO step and ``_compute_old_log_prob`` read."""
    trainer = object.__new__(hvt.HAPORayPPOTrainer)
    trainer.config = config
    trainer.tokenizer = tok
    trainer.reward_loop_manager = GSM8KRewardManager(tok)
    trainer.actor_rollout_wg = CPUActorWorkers(policy or TinyPolicy())
    trainer.global_steps = 0
    trainer.hapo_setup()
    return trainer


@pytest.fixture(autouse=True)
def _fresh():
    hv.configure(None)
    hv.expect_injections(None)
    yield
    hv.configure(None)
    hv.expect_injections(None)


def rows_of(batch, uid):
    return [i for i, u in enumerate(batch.non_tensor_batch["uid"]) if u == uid]


# --------------------------------------------------------------------------- (a) + (b)
def test_gate_decides_on_group_scores_and_demos_replace_the_worst_rows():
    batch, tok = make_batch()
    before = batch.batch.clone()
    trainer = make_trainer(hydra_config("+algorithm.hapo.inject=gate",
                                        "+algorithm.hapo.gate_threshold=0.3"), tok)
    rows = trainer.hapo_step(batch).tolist()
    # (a) posterior means (1 + S) / (2 + 4): 1/6 (uid-0), 1/2 (uid-1), 1/6 (uid-2, no demo)
    assert hv.last_injection() is None
    assert trainer.hapo_metrics["hapo/injected_groups"] == 1.0
    assert trainer.hapo_metrics["hapo/groups_with_demo"] == 2.0
    group0 = rows_of(batch, "uid-0")
    assert rows == [min(group0)]          # all scores 0: the first member of the group
    # (b) the row holds the demonstration in every field verl derives from the response
    row = rows[0]
    demo = tok.encode("so #### 42") + [1]
    n = len(demo)
    assert batch.batch["responses"][row, :n].tolist() == demo
    assert batch.batch["responses"][row, n:].eq(0).all()
    ids = batch.batch["input_ids"][row]
    assert torch.equal(ids[PROMPT:], batch.batch["responses"][row])
    assert torch.equal(ids[:PROMPT], before["input_ids"][row, :PROMPT])
    mask = batch.batch["attention_mask"][row]
    assert mask[PROMPT:].tolist() == [1] * n + [0] * (RESPONSE - n)
    assert torch.equal(mask[:PROMPT], before["attention_mask"][row, :PROMPT])
    assert batch.batch["response_mask"][row].tolist() == [1.0] * n + [0.0] * (RESPONSE - n)
    assert batch.batch["position_ids"][row].tolist() == (mask.cumsum(-1) - 1).clamp(min=0).tolist()
    assert batch.meta_info["global_token_num"][row] == int(mask.sum())
    # scored by verl's gsm8k function: 1.0 at the demonstration's last token
    rm = batch.batch["rm_scores"][row]
    assert rm[n - 1] == 1.0 and rm.sum() == 1.0
    assert trainer.reward_loop_manager.calls == 1
    assert batch.batch["teacher_mask"].tolist() == [i == row for i in range(P * G)]
    others = [i for i in range(P * G) if i != row]
    for key in ("responses", "attention_mask", "rm_scores", "position_ids"):
        assert torch.equal(batch.batch[key][others], before[key][others]), key


def test_inject_always_uses_every_demo_and_ids_demos():
    batch, tok = make_batch(seed=1)
    trainer = make_trainer(hydra_config("+algorithm.hapo.inject=always"), tok)
    rows = trainer.hapo_step(batch).tolist()
    assert len(rows) == 2                               # uid-2 has no demonstration
    row1 = [r for r in rows if r in rows_of(batch, "uid-1")][0]
    ids = [2 + VOCAB.index(c) for c in "#### 42"] + [1]
    assert batch.batch["responses"][row1, :len(ids)].tolist() == ids
    # the worst of uid-1 (score 0, first on ties) was replaced, not a correct one
    assert float(batch.batch["rm_scores"][row1].sum()) == 1.0
    assert trainer.hapo_metrics["hapo/teacher_score_mean"] == 1.0


# --------------------------------------------------------------------------- (c)
def test_old_log_probs_of_teacher_rows_are_the_policys_on_the_demonstration():
    batch, tok = make_batch(seed=2)
    policy = TinyPolicy()
    trainer = make_trainer(hydra_config("+algorithm.hapo.inject=always"), tok, policy)
    old, _ = trainer._compute_old_log_prob(batch)          # the HAPO step, then verl's own
    rows = torch.nonzero(batch.batch["teacher_mask"]).flatten().tolist()
    assert len(rows) == 2
    # what verl sent to the workers is the edited batch
    assert trainer.actor_rollout_wg.seen["teacher_mask"].sum() == 2
    for row in rows:
        mask = batch.batch["attention_mask"][row].bool()
        ids = batch.batch["input_ids"][row][mask]
        n = int(batch.batch["response_mask"][row].sum())
        expect = policy.token_logprobs(ids)[-n - 1:-1]
        torch.testing.assert_close(old.batch["old_log_probs"][row, :n], expect)
        assert old.batch["old_log_probs"][row, n:].eq(0).all()


def test_estimator_in_verls_compute_advantage_takes_the_edited_scores():
    batch, tok = make_batch(seed=3)
    trainer = make_trainer(hydra_config("+algorithm.hapo.inject=always"), tok)
    rows = trainer.hapo_step(batch)
    batch.batch["token_level_rewards"] = batch.batch["rm_scores"].clone()
    ours = compute_advantage(batch, adv_estimator="hapo", num_repeat=G,
                             config=trainer.config.algorithm)
    grpo, _ = core_algos.compute_grpo_outcome_advantage(
        batch.batch["token_level_rewards"], batch.batch["response_mask"],
        batch.non_tensor_batch["uid"])
    torch.testing.assert_close(ours.batch["advantages"], grpo, rtol=1e-5, atol=1e-6)
    assert hv.last_injection()["teacher_rows"].tolist() == rows.sort().values.tolist()
    # the teacher (1.0 among zeros) gets the largest advantage of its group
    for row in rows.tolist():
        group = rows_of(batch, batch.non_tensor_batch["uid"][row])
        a = ours.batch["advantages"][group].sum(-1) / batch.batch["response_mask"][group].sum(-1)
        assert group[int(a.argmax())] == row


# --------------------------------------------------------------------------- (d)
def actor_loss(batch, policy, loss_mode, loss_fn):
    """verl's actor-side loss on ``batch``: verl's padding helpers, the model's log-probs
    as a jagged tensor, verl's global batch info, then ``loss_fn`` (verl's ppo_loss)."""
    td = left_right_2_no_padding(batch.to_tensordict())
    n_tokens = int(batch.batch["response_mask"].sum())
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=n_tokens, global_batch_size=len(batch))
    seqs = [policy.token_logprobs(s) for s in td["input_ids"].unbind()]
    log_probs = torch.nested.as_nested_tensor(seqs, layout=torch.jagged)
    config = ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=1,
                         clip_ratio_low=0.2, clip_ratio_high=0.28,
                         loss_agg_mode="seq-mean-token-mean",
                         policy_loss=PolicyLossConfig(loss_mode=loss_mode))
    loss, metrics = loss_fn(config, {"log_probs": log_probs}, td)
    return loss, metrics, td, log_probs, config


def test_actor_loss_trains_teacher_rows_with_the_shaped_objective():
    batch, tok = make_batch(seed=4)
    policy = TinyPolicy()
    trainer = make_trainer(hydra_config("+algorithm.hapo.inject=always",
                                        "+algorithm.hapo.teacher_gamma=0.25"), tok, policy)
    old, _ = trainer._compute_old_log_prob(batch)
    batch = batch.union(DataProto.from_dict(tensors={"old_log_probs": old.batch["old_log_probs"]}))
    batch.batch["token_level_rewards"] = batch.batch["rm_scores"].clone()
    batch = compute_advantage(batch, adv_estimator="hapo", num_repeat=G,
                              config=trainer.config.algorithm)
    teacher = batch.batch["teacher_mask"]
    assert verl_losses.ppo_loss is hv.hapo_ppo_loss      # installed on import
    loss, metrics, td, log_probs, config = actor_loss(batch, policy, "hapo",
                                                      verl_losses.ppo_loss)
    assert "actor/hapo_teacher_fraction" in metrics
    # the same, computed directly with the teacher rows given
    lp = no_padding_2_padding(log_probs, td)
    mask = batch.batch["response_mask"]
    config.global_batch_info.update(dp_size=1, batch_num_tokens=int(mask.sum()),
                                    global_batch_size=len(batch), loss_scale_factor=None)
    direct, _ = hv.compute_policy_loss_hapo(
        batch.batch["old_log_probs"], lp, batch.batch["advantages"], mask.bool(),
        "seq-mean-token-mean", config, teacher_mask=teacher)
    torch.testing.assert_close(loss, direct, rtol=1e-6, atol=1e-7)
    # verl's own ppo_loss (what verl does without the patch) trains them as on-policy
    vanilla, _, _, _, _ = actor_loss(batch, policy, "hapo", hv._verl_ppo_loss)
    assert not torch.allclose(loss, vanilla)
    shaped_only = hv.compute_policy_loss_hapo(
        batch.batch["old_log_probs"], lp, batch.batch["advantages"], mask.bool(),
        "seq-mean-token-mean", config, teacher_mask=torch.zeros_like(teacher))[0]
    torch.testing.assert_close(vanilla, shaped_only, rtol=1e-6, atol=1e-7)
    # teacher tokens by hand: l = -A p / (p + gamma), p = exp(logp)
    t = teacher.nonzero().flatten()
    p = lp[t].exp()
    by_hand = (-batch.batch["advantages"][t] * p / (p + 0.25) * mask[t]).sum(-1) / mask[t].sum(-1)
    # global_batch_size = bs: the rows without teacher tokens give the rest of the loss
    assert float(by_hand.sum()) / len(batch) == pytest.approx(
        float(direct - hv.compute_policy_loss_hapo(
            batch.batch["old_log_probs"], lp, batch.batch["advantages"],
            mask.bool() & ~teacher[:, None], "seq-mean-token-mean", config)[0]), rel=1e-5)


# --------------------------------------------------------------------------- config, state
def test_hydra_keys_reach_hapo_config_and_the_worker_environment():
    config = hydra_config("+algorithm.hapo.inject=gate", "+algorithm.hapo.teacher_gamma=0.3",
                          "+algorithm.hapo.gate_mode=thompson", "+algorithm.hapo.gate_seed=5",
                          "+algorithm.hapo.gate_prior=[2.0,1.0]", "+algorithm.hapo.demo_field=d")
    cfg = hv.hapo_config(config.algorithm.hapo)
    assert (cfg.inject, cfg.loss.teacher_gamma, cfg.gate_mode, cfg.gate_prior) == \
        ("gate", 0.3, "thompson", (2.0, 1.0))
    env = hvt.prepare_environment(config)
    try:
        assert "hapo.integrations.verl" in env["VERL_USE_EXTERNAL_MODULES"].split(",")
        assert hv.hapo_config(json.loads(env[hv.CONFIG_ENV])) == cfg
    finally:
        for key in env:
            os.environ.pop(key, None)
    with pytest.raises(TypeError, match="teacher_gama"):
        hv.hapo_config({"teacher_gama": 0.3})
    with pytest.raises(ValueError, match="on-policy"):
        make_trainer(hydra_config("+algorithm.hapo.stats=on-policy"), CharTokenizer())
    with pytest.raises(ValueError, match="replace"):
        make_trainer(hydra_config("+algorithm.hapo.replace=fixed"), CharTokenizer())


def test_gate_state_in_verls_checkpoint_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(RayPPOTrainer, "_save_checkpoint", lambda self: None)
    config = hydra_config("+algorithm.hapo.inject=gate", "+algorithm.hapo.gate_mode=thompson",
                          "+algorithm.hapo.gate_seed=3", "+algorithm.hapo.gate_schedule=linear",
                          "+algorithm.hapo.gate_schedule_steps=10",
                          f"trainer.default_local_dir={tmp_path}")
    trainer = make_trainer(config, CharTokenizer())
    for seed in range(3):
        batch, _ = make_batch(seed)
        trainer.hapo_step(batch)
    trainer.global_steps = 3
    trainer._save_checkpoint()
    assert (tmp_path / "global_step_3" / hvt.GATE_FILE).exists()
    saved = hv.gate_state()
    batch, _ = make_batch(7)
    trainer.hapo_step(batch)
    after = hv.current_gate().generator.get_state()

    def load(self):
        self.global_steps = 3
        return None
    monkeypatch.setattr(RayPPOTrainer, "_load_checkpoint", load)
    hv.configure(None)
    resumed = make_trainer(config, CharTokenizer())
    resumed._load_checkpoint()
    assert hv.current_gate().step == saved["step"] == 3
    batch, _ = make_batch(7)
    resumed.hapo_step(batch)
    assert torch.equal(hv.current_gate().generator.get_state(), after)


# --------------------------------------------------------------------------- the workers
def test_verl_use_external_modules_alone_installs_everything():
    """A fresh process that only sets VERL_USE_EXTERNAL_MODULES (as verl's workers do) and
    imports verl: the registrations, the log-prob patch and the actor-loss patch are live
    where verl's worker builds its loss, with the HAPO options from HAPO_VERL_CONFIG."""
    code = (
        "import verl.workers.engine_workers as ew, verl.utils.torch_functional as F\n"
        "from verl.trainer.ppo import core_algos as ca\n"
        "import hapo.integrations.verl as hv\n"
        "assert ca.get_policy_loss_fn('hapo') is hv.compute_policy_loss_hapo\n"
        "assert ca.get_adv_estimator_fn('hapo') is hv.compute_hapo_outcome_advantage\n"
        "assert ew.ppo_loss is hv.hapo_ppo_loss\n"
        "assert F.logprobs_from_logits is hv.logprobs_from_logits\n"
        "assert hv.current_config().loss.teacher_gamma == 0.3\n"
        "print('ok')\n")
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="hapo.integrations.verl",
               HAPO_VERL_CONFIG=json.dumps({"teacher_gamma": 0.3, "inject": "never"}))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


# --------------------------------------------------------------------------- the GPU run's setup
def test_gpu_run_setup_composes_and_feeds_demonstrations(tmp_path):
    """bench/verl_run.py's files and overrides, checked as far as CPU allows: verl's
    config validation passes, verl's dataset and collate give batches whose rows carry the
    demonstration, and the demonstration earns reward 1 from verl's gsm8k function."""
    from transformers import AutoTokenizer
    from verl.trainer.main_ppo import need_critic, need_reference_policy, validate_config
    from verl.trainer.ppo.utils import create_rl_dataset
    from verl.utils.dataset.rl_dataset import collate_fn

    from bench import verl_run
    out = str(tmp_path)
    verl_run.prepare(out)
    config = hydra_config(*verl_run.overrides(out, 2))
    validate_config(config=config, use_reference_policy=need_reference_policy(config),
                    use_critic=need_critic(config))
    assert hv.hapo_config(config.algorithm.hapo).inject == "gate"
    tok = AutoTokenizer.from_pretrained(os.path.join(out, "model"))
    dataset = create_rl_dataset(config.data.train_files, config.data, tok, None, is_train=True)
    batch = DataProto.from_single_dict(collate_fn([dataset[i] for i in range(4)]))
    demos = hvt.demonstrations(batch, tok, hv.DEMO_FIELD)
    for i, ids in enumerate(demos):
        assert ids[-1] == tok.eos_token_id
        text = tok.decode(ids, skip_special_tokens=True)
        truth = batch.non_tensor_batch["reward_model"][i]["ground_truth"]
        assert text == f"#### {truth}"
        assert default_compute_score("openai/gsm8k", text, truth) == 1.0
    result = verl_run.check("step:1 - hapo/inject_rate:1.0 - actor/hapo_teacher_fraction:0.3",
                            out, 2)
    assert result["inject_rate"] == [1.0] and not result["gate_saved"] and not result["ok"]


def test_teacher_rows_follow_verls_micro_batches():
    """verl's engine splits the batch into micro-batches (dynamic batch size reorders the
    rows); the teacher mask travels with its rows, and the micro-batch losses add up to the
    whole batch's under verl's global normalisers."""
    from verl.workers.engine.utils import prepare_micro_batches
    batch, tok = make_batch(seed=5)
    policy = TinyPolicy()
    trainer = make_trainer(hydra_config("+algorithm.hapo.inject=always"), tok, policy)
    old, _ = trainer._compute_old_log_prob(batch)
    batch = batch.union(DataProto.from_dict(tensors={"old_log_probs": old.batch["old_log_probs"]}))
    batch.batch["token_level_rewards"] = batch.batch["rm_scores"].clone()
    batch = compute_advantage(batch, adv_estimator="hapo", num_repeat=G,
                              config=trainer.config.algorithm)
    whole, _, _, _, _ = actor_loss(batch, policy, "hapo", verl_losses.ppo_loss)
    td = left_right_2_no_padding(batch.to_tensordict())
    n_tokens = int(batch.batch["response_mask"].sum())
    tu.assign_non_tensor(td, dp_size=1, batch_num_tokens=n_tokens, global_batch_size=len(batch),
                         use_dynamic_bsz=True, max_token_len_per_gpu=40)
    micro_batches, order = prepare_micro_batches(td)
    assert len(micro_batches) > 1 and order is not None
    config = ActorConfig(strategy="fsdp", rollout_n=G, ppo_micro_batch_size_per_gpu=1,
                         clip_ratio_low=0.2, clip_ratio_high=0.28,
                         loss_agg_mode="seq-mean-token-mean",
                         policy_loss=PolicyLossConfig(loss_mode="hapo"))
    total, teachers = 0.0, 0
    for micro in micro_batches:
        seqs = [policy.token_logprobs(s) for s in micro["input_ids"].unbind()]
        log_probs = torch.nested.as_nested_tensor(seqs, layout=torch.jagged)
        loss, _ = verl_losses.ppo_loss(config, {"log_probs": log_probs}, micro)
        total = total + loss
        teachers += int(micro["teacher_mask"].sum())
    assert teachers == int(batch.batch["teacher_mask"].sum()) == 2
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)
