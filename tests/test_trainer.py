"""HAPOTrainer on a tiny policy: one to three steps each."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hapo import HAPOConfig, HAPOTrainer
from hapo.demo.model import TinyCausalLM
from hapo.demo.task import ReverseTask

TASK = ReverseTask(length=3, digits=5)


# Tiny models run fastest on one thread (and do not fight other processes for cores).
pytestmark = pytest.mark.usefixtures("one_thread")


def make(config=None, policy=None, lr=1e-2, demos="task", **cfg):
    torch.manual_seed(0)
    policy = policy or TinyCausalLM(TASK.vocab_size, max_len=12, d_model=16, n_layers=1,
                                    n_heads=2, d_ff=32)
    config = config or HAPOConfig.from_kwargs(max_new_tokens=TASK.length, progress=False, **cfg)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    demos = TASK.demo if demos == "task" else demos
    return HAPOTrainer(policy, opt, TASK.reward, demos, config)


def prompts(n=4, seed=0):
    return TASK.sample_prompts(n, torch.Generator().manual_seed(seed))


METRICS = {"success_rate", "injection_rate", "collapsed_fraction", "clip_low", "clip_high",
           "entropy", "teacher_token_fraction", "loss", "grad_norm", "gate_gamma", "step"}


def test_step_returns_metrics_and_updates_the_policy():
    tr = make(group_size=4)
    before = copy.deepcopy(tr.policy.state_dict())
    m = tr.step(prompts())
    assert METRICS <= set(m)
    assert 0 <= m["success_rate"] <= 1 and 0 <= m["injection_rate"] <= 1
    # An untrained policy fails everywhere: all groups collapse, the mean gate injects
    # into every group, one member in four carries teacher tokens.
    assert m["collapsed_fraction"] == 1.0 and m["injection_rate"] == 1.0
    assert m["teacher_token_fraction"] == pytest.approx(0.25)
    assert m["entropy"] > 0
    changed = any(not torch.equal(before[k], v) for k, v in tr.policy.state_dict().items())
    assert changed and tr.global_step == 1 and len(tr.history) == 1


def test_grpo_mode_never_injects_and_collapsed_groups_give_zero_loss():
    tr = make(group_size=4, inject="never")
    m = tr.step(prompts())
    assert m["injection_rate"] == 0.0 and m["teacher_token_fraction"] == 0.0
    assert m["loss"] == 0.0           # every advantage is 0: advantage collapse


def test_always_inject_and_missing_demos():
    tr = make(group_size=4, inject="always", demos={})
    assert tr.step(prompts())["injection_rate"] == 0.0     # no demos -> nothing to inject
    tr = make(group_size=4, inject="always")
    assert tr.step(prompts())["injection_rate"] == 1.0


def test_gate_closes_when_the_policy_succeeds():
    # A reward that always pays: S = G, the mean gate never injects.
    tr = make(group_size=4)
    tr.reward_fn = lambda p, c, m: torch.ones(c.shape[0])
    m = tr.step(prompts())
    assert m["success_rate"] == 1.0 and m["injection_rate"] == 0.0


def test_generation_stops_at_eos_and_masks_the_rest():
    tr = make(group_size=2, eos_token_id=3)
    tr.config.max_new_tokens = 6
    completion, mask = tr.generate(prompts(8))
    for row, m in zip(completion.tolist(), mask.tolist()):
        if 3 in row:
            k = row.index(3)
            assert m[:k + 1] == [1] * (k + 1) and m[k + 1:] == [0] * (len(m) - k - 1)
            assert all(t == 0 for t in row[k + 1:])
        else:
            assert m == [1] * len(m)


def test_micro_batches_give_the_full_batch_gradient():
    for aggregation in ("token-mean", "grpo", "dr_grpo"):
        results = []
        for mb in (None, 3):
            tr = make(group_size=4, aggregation=aggregation, micro_batch_size=mb,
                      max_grad_norm=None)
            tr.optimizer = torch.optim.SGD(tr.policy.parameters(), lr=1.0)
            tr.step(prompts())
            results.append(torch.cat([p.detach().flatten() for p in tr.policy.parameters()]))
        torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-6)


def test_ppo_epochs_kl_and_hf_style_output():
    class HFLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = TinyCausalLM(TASK.vocab_size, max_len=8, d_model=16, n_layers=1,
                                      n_heads=2, d_ff=32)

        def forward(self, input_ids):
            return SimpleNamespace(logits=self.inner(input_ids))

    torch.manual_seed(0)
    tr = make(policy=HFLike(), group_size=4, ppo_epochs=2, beta=0.04, micro_batch_size=5)
    assert tr.ref_policy is not None
    m1 = tr.step(prompts())
    m2 = tr.step(prompts(seed=1))
    assert "kl" in m1 and m2["kl"] >= 0.0
    assert m2["step"] == 1


def test_checkpoint_resume_reproduces_the_run(tmp_path):
    cfg = dict(group_size=4, gate_mode="thompson", gate_memory="persistent",
               gate_seed=5, seed=3)
    a = make(**cfg)
    a.step(prompts(seed=0))
    a.save_checkpoint(tmp_path / "ckpt.pt")
    m_a = a.step(prompts(seed=1))

    b = make(**{**cfg, "seed": 999, "gate_seed": 999})
    b.load_checkpoint(tmp_path / "ckpt.pt")
    assert b.global_step == 1 and len(b.history) == 1
    m_b = b.step(prompts(seed=1))
    assert m_a == m_b
    for (k, va), vb in zip(a.policy.state_dict().items(), b.policy.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.gate.counts == b.gate.counts
    sa, sb = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    assert all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)


def test_resume_with_beta_restores_the_reference_policy(tmp_path):
    """The KL reference is a copy of the policy at construction: a trainer rebuilt from the
    trained weights (as a resume often does) had the wrong one. It is in the checkpoint."""
    cfg = dict(group_size=4, beta=0.2, seed=3)
    a = make(**cfg)
    for seed in range(2):
        a.step(prompts(seed=seed))
    a.save_checkpoint(tmp_path / "ckpt.pt")
    for seed in range(2, 5):
        a.step(prompts(seed=seed))

    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    assert "ref_policy" in state
    trained = TinyCausalLM(TASK.vocab_size, max_len=12, d_model=16, n_layers=1, n_heads=2,
                           d_ff=32)
    trained.load_state_dict(state["policy"])
    b = make(policy=trained, **cfg)                 # its reference: the trained weights
    b.load_checkpoint(tmp_path / "ckpt.pt")
    for (k, va), vb in zip(a.ref_policy.state_dict().items(),
                           b.ref_policy.state_dict().values()):
        assert torch.equal(va, vb), k
    for seed in range(2, 5):
        b.step(prompts(seed=seed))
    for (k, va), vb in zip(a.policy.state_dict().items(), b.policy.state_dict().values()):
        assert torch.equal(va, vb), k


def test_checkpoint_without_reference_policy_warns(tmp_path):
    a = make(group_size=4, beta=0.2)
    state = a.state_dict()
    del state["ref_policy"]                          # a checkpoint from before it was saved
    with pytest.warns(UserWarning, match="no reference policy"):
        a.load_state_dict(state)


def test_save_checkpoint_leaves_no_temporary_file(tmp_path, monkeypatch):
    a = make(group_size=4)
    a.save_checkpoint(tmp_path / "ckpt.pt")
    a.step(prompts())
    a.save_checkpoint(str(tmp_path / "ckpt.pt"))                # over the previous one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    b = make(group_size=4)
    b.load_checkpoint(tmp_path / "ckpt.pt")
    assert b.global_step == 1

    def fail(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(OSError, match="disk full"):
        a.save_checkpoint(tmp_path / "ckpt.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]
    monkeypatch.undo()
    b.load_checkpoint(tmp_path / "ckpt.pt")                    # the previous one, intact
    assert b.global_step == 1


def test_train_loop_with_progress_and_callback():
    tr = make(group_size=2, demos={})
    tr.config.progress = True
    seen = []
    out = tr.train(lambda step: (prompts(2, seed=step), [f"p{step}a", f"p{step}b"]), 2,
                   callback=lambda t, m: seen.append(m["step"]))
    assert [m["step"] for m in out] == seen == [0, 1]


def test_bad_inputs_raise():
    tr = make(group_size=2)
    with pytest.raises(ValueError, match="prompt_ids"):
        tr.step(torch.zeros(3))
    with pytest.raises(ValueError, match="prompt_keys"):
        tr.step(prompts(2), prompt_keys=["a"])
    tr.reward_fn = lambda p, c, m: torch.ones(3)
    with pytest.raises(ValueError, match="reward_fn"):
        tr.step(prompts(2))

    class NotAnLM(nn.Module):          # returns [B, T]: no vocabulary dimension
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(()))

        def forward(self, ids):
            return ids.float() * self.w

    tr = make(policy=NotAnLM(), group_size=2)
    with pytest.raises(ValueError, match="logits"):
        tr.step(prompts(2))


def test_teacher_rows_reach_the_loss_with_the_ssi_advantage():
    from hapo_kernels import reference
    tr = make(group_size=4)
    seen = {}
    inner = tr.loss_fn

    def recording(logits, targets, advantages, **kw):
        seen.update(targets=targets.clone(), advantages=advantages.clone(),
                    teacher=kw["teacher_mask"].clone())
        return inner(logits, targets, advantages, **kw)

    tr.loss_fn = recording
    p = prompts(2)
    tr.step(p)
    # Every rollout failed: member 0 of each group is replaced by the demonstration.
    assert seen["teacher"].tolist() == [True, False, False, False] * 2
    answer = TASK.answer(p)
    assert torch.equal(seen["targets"][[0, 4]], answer)
    want, _ = reference.group_advantages(torch.zeros(8), 4, torch.tensor([True, True]))
    torch.testing.assert_close(seen["advantages"], want.float())
    assert seen["advantages"][0] > 0 > seen["advantages"][1]


def test_scored_teacher_fixed_slot_and_constant_teacher():
    """score_teacher (default): the teacher's reward is the reward function's score of the
    demonstration; replace="fixed" puts it in member 0 of every group whatever the
    rewards; score_teacher=False uses the constant teacher_reward."""
    from hapo_kernels import reference

    def half_reward(prompt_ids, completion_ids, completion_mask):
        return 0.5 * TASK.reward(prompt_ids, completion_ids, completion_mask)

    for score, want_teacher in ((True, 0.5), (False, 2.0)):
        torch.manual_seed(0)
        policy = TinyCausalLM(TASK.vocab_size, max_len=12, d_model=16, n_layers=1,
                              n_heads=2, d_ff=32)
        cfg = HAPOConfig.from_kwargs(max_new_tokens=TASK.length, progress=False, group_size=4,
                                     inject="always", replace="fixed", scale="none",
                                     teacher_reward=2.0, score_teacher=score)
        tr = HAPOTrainer(policy, torch.optim.Adam(policy.parameters()), half_reward,
                         TASK.demo, cfg)
        seen = {}
        inner = tr.loss_fn

        def recording(logits, targets, advantages, seen=seen, inner=inner, **kw):
            seen.update(advantages=advantages.clone(), teacher=kw["teacher_mask"].clone())
            return inner(logits, targets, advantages, **kw)

        tr.loss_fn = recording
        m = tr.step(prompts(2))
        assert m["teacher_reward_mean"] == pytest.approx(want_teacher)
        assert seen["teacher"].tolist() == [True, False, False, False] * 2
        want, _ = reference.group_advantages(torch.zeros(8), 4, torch.tensor([True, True]),
                                             teacher_rewards=torch.full((2,), want_teacher),
                                             replace="fixed", scale="none")
        torch.testing.assert_close(seen["advantages"], want.float())
    with pytest.raises(ValueError, match="score_teacher"):
        HAPOConfig(score_teacher=1)
