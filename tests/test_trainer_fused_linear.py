"""HAPOTrainer with ``fused_linear=True``: the same step as the logits path, from the last
hidden state and the LM head (hapo.lm_head's hooks, and the Hugging Face route)."""
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


class HookedLM(TinyCausalLM):
    """A plain module with the two hooks: ``hapo_hidden_states`` and the head."""

    def hapo_hidden_states(self, input_ids):
        T = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(T, device=input_ids.device))
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=input_ids.device)
        return self.norm(self.blocks(h, mask=causal, is_causal=True))

    def get_output_embeddings(self):
        return self.head


class HFStyle(nn.Module):
    """Hugging Face's shape: ``.logits`` outputs, ``get_decoder()`` returning an object with
    ``.last_hidden_state``, ``get_output_embeddings()``; the head has no bias."""

    def __init__(self):
        super().__init__()
        self.model = _Decoder()
        self.lm_head = nn.Linear(16, TASK.vocab_size, bias=False)

    def get_decoder(self):
        return self.model

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.lm_head(self.model(input_ids=input_ids)
                                                   .last_hidden_state))


class _Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(TASK.vocab_size, 16)
        self.mix = nn.Linear(16, 16)

    def forward(self, input_ids):
        h = self.tok(input_ids)
        h = torch.cumsum(h, 1) / torch.arange(1, h.shape[1] + 1)[:, None]    # causal mean
        return SimpleNamespace(last_hidden_state=torch.tanh(self.mix(h)))


def run_step(policy, fused, **cfg):
    torch.manual_seed(0)
    policy = copy.deepcopy(policy)
    config = HAPOConfig.from_kwargs(max_new_tokens=TASK.length, progress=False, group_size=4,
                        fused_linear=fused, **cfg)
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    tr = HAPOTrainer(policy, opt, TASK.reward, TASK.demo, config)
    m = tr.step(TASK.sample_prompts(4, torch.Generator().manual_seed(0)))
    return m, policy.state_dict()


@pytest.mark.parametrize("make,cfg", [
    (lambda: HookedLM(TASK.vocab_size, max_len=12, d_model=16, n_layers=1, n_heads=2,
                      d_ff=32), dict(fused_linear_chunk_size=5, micro_batch_size=6)),
    (HFStyle, dict(ppo_epochs=2, beta=0.04, importance_sampling="sequence",
                   fused_linear_chunk_size=4)),
], ids=["hooks", "hf-style"])
def test_fused_linear_step_equals_logits_step(make, cfg):
    torch.manual_seed(0)
    policy = make()
    m_ref, sd_ref = run_step(policy, False, **cfg)
    m, sd = run_step(policy, True, **cfg)
    for k in ("loss", "entropy", "clip_low", "clip_high", "ratio", "grad_norm"):
        assert m[k] == pytest.approx(m_ref[k], rel=1e-4, abs=1e-6), k
    for k in sd_ref:
        torch.testing.assert_close(sd[k], sd_ref[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(sd[k], policy.state_dict()[k]) for k in sd)   # it trained


def test_fused_linear_needs_the_hooks():
    policy = TinyCausalLM(TASK.vocab_size, max_len=12, d_model=16, n_layers=1, n_heads=2,
                          d_ff=32)
    config = HAPOConfig.from_kwargs(max_new_tokens=TASK.length, progress=False, group_size=4,
                        fused_linear=True)
    tr = HAPOTrainer(policy, torch.optim.SGD(policy.parameters(), lr=0.1), TASK.reward,
                     TASK.demo, config)
    with pytest.raises(ValueError, match="get_output_embeddings|hapo_hidden_states"):
        tr.step(TASK.sample_prompts(2, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("bad", [dict(fused_linear=1), dict(fused_linear_chunk_size=0)])
def test_config_validates_fused_linear(bad):
    with pytest.raises(ValueError):
        HAPOConfig.from_kwargs(**bad)
