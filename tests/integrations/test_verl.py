"""The verl integration against the real verl package (no mocks of verl).

Our ``"hapo"`` policy loss and advantage estimator, fetched back from verl's registries,
must equal verl's ``compute_policy_loss_vanilla`` (+ its ``agg_loss``) and
``compute_grpo_outcome_advantage`` for every aggregation mode, and differ only where SSI
injects; the ``logprobs_from_logits`` drop-in must equal verl's.
"""
import numpy as np
import pytest
import torch
import verl
import verl.utils.torch_functional as verl_F
from verl.trainer.ppo import core_algos
from verl.workers.config import ActorConfig

import hapo.integrations.verl as hv
import hapo_kernels as hk
from hapo import HAPOConfig

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean",
             "seq-mean-token-sum-norm"]
GLOBAL_INFO = {"dp_size": 2, "batch_num_tokens": 41, "global_batch_size": 11,
               "loss_scale_factor": 13}


def test_verl_version_is_the_tested_one():
    assert verl.__version__ == hv.TESTED_VERL


def test_registered_in_verls_registries():
    assert core_algos.get_policy_loss_fn("hapo") is hv.compute_policy_loss_hapo
    assert core_algos.get_adv_estimator_fn("hapo") is hv.compute_hapo_outcome_advantage


@pytest.fixture(autouse=True)
def _fresh_config():
    hv.configure(None)
    torch.manual_seed(0)
    yield
    hv.configure(None)


def actor_config(global_info=None, loss_mode="vanilla", **clip):
    from verl.workers.config.actor import PolicyLossConfig
    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1,
                         policy_loss=PolicyLossConfig(loss_mode=loss_mode), **clip)
    config.global_batch_info.update(global_info or {})
    return config


def make_batch(bs=6, T=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 4, 0, 7, 1, 6])[:bs]           # row 2 fully masked
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    old = -torch.rand(bs, T, generator=g) * 3
    logp = (old + torch.randn(bs, T, generator=g)).clamp(max=-1e-3)  # ratios up to ~e^3
    old[0, :4], logp[0, :4] = -2.5, -1.3        # ratio e^1.2 > clip_ratio_c on a row with A < 0
    old[3, 2], old[5, 1] = -27.0, -0.001        # log-ratios beyond verl's clamp at +-20
    logp[5, 1] = -24.0
    a = torch.randn(bs, generator=g)
    a[0] = -a[0].abs()
    adv = a[:, None].expand(bs, T) * mask
    weights = torch.rand(bs, T, generator=g) + 0.5
    return logp, old, adv, mask, weights


def run_loss(fn, logp, old, adv, mask, mode, config, weights=None, **extra):
    lp = logp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask,
                       loss_agg_mode=mode, config=config, rollout_is_weights=weights, **extra)
    loss.backward()
    return loss.detach(), lp.grad, metrics


@pytest.mark.parametrize("global_info", [None, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("weighted", [False, True], ids=["", "rollout_is"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_equals_vanilla(mode, weighted, global_info):
    logp, old, adv, mask, weights = make_batch()
    config = actor_config(global_info, clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=2.5)
    w = weights if weighted else None
    ours = run_loss(core_algos.get_policy_loss_fn("hapo"), logp, old, adv, mask, mode, config, w)
    theirs = run_loss(core_algos.get_policy_loss_fn("vanilla"), logp, old, adv, mask, mode,
                      config, w)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-8)
    for key, value in theirs[2].items():
        assert ours[2][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert theirs[2]["actor/pg_clipfrac"] > 0 and theirs[2]["actor/pg_clipfrac_lower"] > 0


def test_policy_loss_default_clip_config():
    logp, old, adv, mask, _ = make_batch(seed=3)
    config = actor_config()
    for mode in AGG_MODES:
        ours = run_loss(hv.compute_policy_loss_hapo, logp, old, adv, mask, mode, config)
        theirs = run_loss(core_algos.compute_policy_loss_vanilla, logp, old, adv, mask, mode,
                          config)
        torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ours[1], theirs[1], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_teacher_rows_differ_only_there(mode):
    """Teacher rows get the shaped objective -A p/(p + 0.1); every other row is vanilla's."""
    logp, old, adv, mask, _ = make_batch(seed=1)
    config = actor_config()
    teacher = torch.tensor([True, False, False, True, False, False])
    ours = run_loss(hv.compute_policy_loss_hapo, logp, old, adv, mask, mode, config,
                    teacher_mask=teacher)
    theirs = run_loss(core_algos.compute_policy_loss_vanilla, logp, old, adv, mask, mode, config)
    torch.testing.assert_close(ours[1][~teacher], theirs[1][~teacher], rtol=1e-6, atol=1e-8)
    # d/dlogp of -A p/(p+g) is -A g p/(p+g)^2, times the mode's per-token weight, which the
    # vanilla gradient reveals on an unclipped token: -A rho w (rho = exp(logp - old)).
    one = run_loss(core_algos.compute_policy_loss_vanilla, old, old, torch.ones_like(adv), mask,
                   mode, config)[1]                       # rho = 1, A = 1: grad = -w
    p = logp.exp()
    shaped = -adv * 0.1 * p / (p + 0.1) ** 2 * (-one)
    torch.testing.assert_close(ours[1][teacher], shaped[teacher], rtol=1e-5, atol=1e-8)
    assert not torch.allclose(ours[1][teacher], theirs[1][teacher])
    assert ours[2]["actor/hapo_teacher_fraction"] == pytest.approx(
        float(mask[teacher].sum() / mask.sum()))


def rewards_batch(P=5, G=8, seed=0, collapse=(1, 3)):
    """Binary outcome rewards, uids interleaved (not contiguous), groups in `collapse` all fail."""
    g = torch.Generator().manual_seed(seed)
    r = (torch.rand(P, G, generator=g) < 0.5).float()
    for p in collapse:
        r[p] = 0.0
    uids = np.array([f"uid-{p}" for p in range(P) for _ in range(G)], dtype=object)
    perm = torch.randperm(P * G, generator=g)
    T = 6
    mask = torch.ones(P * G, T)
    mask[:, 4:] = (torch.rand(P * G, 2, generator=g) < 0.5).float()
    scores = r.reshape(-1)[perm]
    token_rewards = torch.zeros(P * G, T)
    token_rewards[torch.arange(P * G), mask.sum(1).long() - 1] = scores
    return token_rewards, mask, uids[perm.numpy()], r


@pytest.mark.parametrize("norm", [True, False])
def test_estimator_equals_grpo_without_injection(norm):
    rewards, mask, uids, _ = rewards_batch()
    fn = core_algos.get_adv_estimator_fn("hapo")
    ours, ours_ret = fn(token_level_rewards=rewards, response_mask=mask, index=uids,
                        norm_adv_by_std_in_grpo=norm)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids,
                                                          norm_adv_by_std_in_grpo=norm)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_ret, ours)
    assert hv.last_injection()["teacher_rows"].numel() == 0


def test_estimator_reads_norm_from_algo_config():
    from verl.trainer.config import AlgoConfig
    rewards, mask, uids, _ = rewards_batch(seed=4)
    ours, _ = hv.compute_hapo_outcome_advantage(rewards, mask, uids,
                                                config=AlgoConfig(norm_adv_by_std_in_grpo=False))
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids,
                                                          norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_estimator_differs_only_where_ssi_injects():
    """The gate opens on the collapsed groups; SSI moves only their advantages."""
    P, G = 5, 8
    rewards, mask, uids, r = rewards_batch(P, G, collapse=(1, 3))
    succ = r.sum(1)
    hv.configure(HAPOConfig(inject="gate", gate_threshold=0.3))   # posterior mean < 0.3
    ours, _ = hv.compute_hapo_outcome_advantage(rewards, mask, uids)
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids)
    last = hv.last_injection()
    expect = (1 + succ) / (2 + G) < 0.3
    assert expect[1] and expect[3]
    first_seen = [int(u.split("-")[1]) for u in dict.fromkeys(uids)]   # the estimator's order
    assert last["inject"].tolist() == expect[first_seen].tolist()
    group_of = torch.tensor([int(u.split("-")[1]) for u in uids])
    moved = expect[group_of]
    torch.testing.assert_close(ours[~moved], theirs[~moved], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[moved], theirs[moved])
    # docs/design.md section 6's worked check (G = 8, no success): teacher +2.475, failures -0.354.
    for p in (1, 3):
        rows = torch.nonzero(group_of == p).flatten()
        teacher_row = [i for i in last["teacher_rows"].tolist() if i in rows.tolist()]
        assert len(teacher_row) == 1 and teacher_row[0] == rows.min()   # first member on ties
        values = (ours[rows] * mask[rows]).sum(1) / mask[rows].sum(1)
        is_teacher = rows == teacher_row[0]
        torch.testing.assert_close(values[is_teacher], torch.tensor([2.4749]), atol=1e-3, rtol=0)
        torch.testing.assert_close(values[~is_teacher], torch.full((G - 1,), -0.35355),
                                   atol=1e-4, rtol=0)


def test_estimator_explicit_inject_and_bad_groups():
    rewards, mask, uids, _ = rewards_batch(P=3, G=4, collapse=())
    ours, _ = hv.compute_hapo_outcome_advantage(rewards, mask, uids, inject=[False, True, False])
    theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids)
    assert hv.last_injection()["inject"].tolist() == [False, True, False]
    injected_uid = list(dict.fromkeys(uids))[1]          # groups in first-appearance order
    same = torch.from_numpy(uids != injected_uid)
    torch.testing.assert_close(ours[same], theirs[same], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="inject"):
        hv.compute_hapo_outcome_advantage(rewards, mask, uids, inject=[True, False])


def test_estimator_uneven_and_single_response_groups():
    """verl's GRPO takes groups of any size; a group of one has mean 0 and std 1."""
    g = torch.Generator().manual_seed(2)
    sizes = [1, 4, 2, 1, 7, 3]
    uids = np.array([f"u{p}" for p, n in enumerate(sizes) for _ in range(n)], dtype=object)
    perm = torch.randperm(len(uids), generator=g).numpy()
    uids = uids[perm]
    rewards = torch.zeros(len(uids), 5)
    rewards[:, -1] = torch.randn(len(uids), generator=g)
    mask = torch.ones(len(uids), 5)
    for norm in (True, False):
        ours, _ = hv.compute_hapo_outcome_advantage(rewards, mask, uids,
                                                    norm_adv_by_std_in_grpo=norm)
        theirs, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uids,
                                                              norm_adv_by_std_in_grpo=norm)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    single = np.isin(uids, ["u0", "u3"])
    torch.testing.assert_close(ours[single][:, -1], rewards[single][:, -1])   # not 0


@pytest.mark.parametrize("shape", [(3, 5, 37), (11, 37)], ids=["BTV", "packed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_logits_equals_verl(shape, dtype):
    logits = (torch.randn(shape) * 3).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1])
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = hv.logprobs_from_logits(a, labels)
    theirs = hv.VERL_LOGPROBS_FROM_LOGITS(b, labels)
    g = torch.randn(shape[:-1])
    (ours * g).sum().backward()
    (theirs.float() * g).sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    assert ours.dtype == torch.float32 and ours.shape == labels.shape
    torch.testing.assert_close(ours, theirs.float(), **tol)
    torch.testing.assert_close(a.grad.float(), b.grad.float(), **tol)


def test_import_patches_logprobs_and_ppo_loss():
    """Importing the module (as VERL_USE_EXTERNAL_MODULES does) put ours in place."""
    assert "verl.utils.torch_functional" in hv.INSTALLED["logprobs_from_logits"]
    assert verl_F.logprobs_from_logits is hv.logprobs_from_logits
    assert "verl.workers.utils.losses" in hv.INSTALLED["ppo_loss"]
    import verl.workers.utils.losses as losses
    assert losses.ppo_loss is hv.hapo_ppo_loss


# --------------------------------------------------------------------------- verl's own tests
# verl's wheel ships its tests; they are loaded from the installed distribution by path
# (not as ``tests.*``, a name this repository's folder shares) and run with the project's
# functions put where verl's test modules look them up.
def verl_test_module(relative_path):
    import importlib.metadata
    import importlib.util
    path = importlib.metadata.distribution("verl").locate_file(relative_path)
    name = "verl_own_" + relative_path.replace("/", "_").removesuffix(".py")
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


verl_core_algos_tests = verl_test_module("tests/trainer/ppo/test_core_algos_on_cpu.py")
verl_rollout_corr_tests = verl_test_module("tests/trainer/ppo/test_rollout_corr_integration.py")


@pytest.mark.parametrize("args", [(64, 128, 5, 0), (128, 256, 8, 1), (512, 512, 10, 2)])
def test_verls_grpo_equivalence_with_hapo_estimator(monkeypatch, args):
    """verl's test_grpo_and_vectorized_equivalence (uneven, shuffled groups) with our
    estimator in place of verl's vectorized GRPO."""
    monkeypatch.setattr(verl_core_algos_tests, "compute_grpo_vectorized_outcome_advantage",
                        hv.compute_hapo_outcome_advantage)
    verl_core_algos_tests.test_grpo_and_vectorized_equivalence(*args)


def test_verls_grpo_low_variance_with_hapo_estimator(monkeypatch):
    monkeypatch.setattr(verl_core_algos_tests, "compute_grpo_vectorized_outcome_advantage",
                        hv.compute_hapo_outcome_advantage)
    verl_core_algos_tests.test_grpo_vectorized_matches_original_for_low_variance_rewards()


class TestVerlRolloutISWithHapoLoss(verl_rollout_corr_tests.TestRolloutISIntegration):
    """verl's rollout-correction policy-loss tests with the ``"hapo"`` loss as vanilla."""

    @pytest.fixture(autouse=True)
    def _hapo_loss(self, monkeypatch):
        monkeypatch.setattr(verl_rollout_corr_tests, "compute_policy_loss_vanilla",
                            hv.compute_policy_loss_hapo)


# --------------------------------------------------------------------------- the fused loss
def verl_logprobs(logits, targets):
    return torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("weighted", [False, True], ids=["", "rollout_is"])
@pytest.mark.parametrize("global_info", [None, GLOBAL_INFO], ids=["local", "global"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("loss_mode", sorted(hv.FUSED_LOSS_MODES))
def test_fused_loss_equals_verls_policy_loss(loss_mode, mode, global_info, weighted):
    """hk.fused_hapo_loss from the logits, under hv.loss_options, equals verl's registered
    policy loss on the log-probs of the same logits: loss and the logits' gradient, for every
    aggregation mode, with a fully masked row, locally and with verl's global normalisers."""
    logp, old, adv, mask, weights = make_batch()
    weights = weights if weighted else None
    B, T, V = logp.shape[0], logp.shape[1], 23
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    targets = torch.randint(0, V, (B, T), generator=g)
    old = (verl_logprobs(logits, targets) + 0.4 * torch.randn(B, T, generator=g,
                                                               dtype=torch.float64)).float()
    old[0] -= 12.0            # a row with A < 0 whose mean log-ratio passes gspo's clamp at 10
    old[3, 2] -= 25.0         # a token beyond the clamp at +-20
    config = actor_config(global_info, loss_mode, clip_ratio_low=0.2, clip_ratio_high=0.28,
                          clip_ratio_c=2.5, tau_pos=1.3, tau_neg=0.8)
    theirs_x = logits.clone().requires_grad_(True)
    verl_fn = core_algos.get_policy_loss_fn(loss_mode)
    theirs, _ = verl_fn(old_log_prob=old.double(), log_prob=verl_logprobs(theirs_x, targets),
                        advantages=adv.double(), response_mask=mask.bool(), loss_agg_mode=mode,
                        config=config,
                        rollout_is_weights=None if weights is None else weights.double())
    theirs.backward()
    ours_x = logits.float().clone().requires_grad_(True)
    out = hk.fused_hapo_loss(ours_x, targets, adv, mask=mask, old_logp=old,
                             rollout_is_weights=weights, options=hv.loss_options(config, mode))
    out.loss.backward()
    assert out.loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(ours_x.grad.double(), theirs_x.grad, rtol=1e-4, atol=1e-6)
    assert theirs_x.grad.abs().sum() > 0


def test_fused_geo_mean_clip_flags_are_verls_metrics():
    """verl's geo_mean metrics from the fused loss's per-token outputs: pg_clipfrac and
    pg_clipfrac_lower are the masked means of the clip flags (a token whose own log-ratio
    leaves [-clip_ratio_low, clip_ratio_high], by the sign of its advantage)."""
    logp, old, adv, mask, _ = make_batch()
    B, T, V = logp.shape[0], logp.shape[1], 23
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, T, V, generator=g) * 2
    targets = torch.randint(0, V, (B, T), generator=g)
    old = (verl_logprobs(logits, targets) + 0.4 * torch.randn(B, T, generator=g,
                                                               dtype=torch.float64)).float()
    config = actor_config(None, "geo_mean", clip_ratio_low=0.2, clip_ratio_high=0.28)
    _, metrics = core_algos.get_policy_loss_fn("geo_mean")(
        old_log_prob=old, log_prob=verl_logprobs(logits, targets).float(), advantages=adv,
        response_mask=mask.bool(), loss_agg_mode="token-mean", config=config)
    out = hk.fused_hapo_loss(logits, targets, adv, mask=mask, old_logp=old,
                             options=hv.loss_options(config))
    m = mask.bool()
    high = out.per_token_clip_high[m].float().mean().item()
    low = out.per_token_clip_low[m].float().mean().item()
    assert high == pytest.approx(metrics["actor/pg_clipfrac"], abs=1e-6)
    assert low == pytest.approx(metrics["actor/pg_clipfrac_lower"], abs=1e-6)
    assert high > 0 and low > 0


def test_readme_verl_snippet_runs():
    """The README's verl Python snippet, run as written on a verl actor config and a batch."""
    import pathlib
    import re
    readme = (pathlib.Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("### verl in detail"):]
    section = section[:section.index("\n#", 5)]
    snippets = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(snippets) == 1
    logp, old, adv, mask, _ = make_batch()
    g = torch.Generator().manual_seed(1)
    namespace = {"actor_config": actor_config(), "response_mask": mask,
                 "logits": torch.randn(6, 9, 17, generator=g, requires_grad=True),
                 "response_ids": torch.randint(0, 17, (6, 9), generator=g),
                 "advantages": adv[:, 0], "old_log_probs": old}
    exec(snippets[0], namespace)
    assert torch.isfinite(namespace["out"].loss)
    assert hv.current_config().loss.teacher_gamma == 0.1


def test_estimator_persistent_gate_memory_keys_on_prompt_ids():
    """gate_memory="persistent" works in the estimator: per-response prompt ids (verl's
    uids by default, which are new each step; the trainer passes the dataset's index)."""
    hv.configure(HAPOConfig(inject="gate", gate_memory="persistent", gate_threshold=0.3))
    rewards, mask, uids, r = rewards_batch(P=3, G=4, collapse=(1,))
    prompt = np.array([int(u.split("-")[1]) for u in uids], dtype=object)
    for step in range(2):
        fresh = np.array([f"{u}-step{step}" for u in uids], dtype=object)
        hv.compute_hapo_outcome_advantage(rewards, mask, fresh, prompt_ids=prompt)
    counts = hv.current_gate().counts
    assert sorted(counts) == [0, 1, 2]
    assert counts[1] == (0.0, 8.0)                  # two steps of 4 failures, one key
    assert counts[0] == (2 * float(r[0].sum()), 2 * (4 - float(r[0].sum())))
