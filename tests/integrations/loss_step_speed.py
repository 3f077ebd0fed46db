"""Loss-step speed: HAPOGRPOTrainer vs TRL's own GRPOTrainer on the same batch (CPU or GPU).

Times ``compute_loss`` forward + backward of each trainer, same weights, same batch, same
GRPOConfig. The backbone is one small layer so the step is dominated by what differs: the
LM head, the log-probs/entropies and the loss (TRL: its chunked fused LM head and eager loss
formula; ours: the LM head, then one ``hk.fused_hapo_loss`` call). Not a test (no timing
assertions): run it from the TRL environment,

    HF_HUB_OFFLINE=1 .venv-trl/bin/python tests/integrations/loss_step_speed.py [--device cuda]
"""
import argparse
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from hapo.integrations.trl import HAPOGRPOTrainer


def build(path, vocab, hidden):
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "w": 3}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                        eos_token="<eos>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=4096, tie_word_embeddings=False,
                         pad_token_id=0, eos_token_id=1, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--completion", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--loss-type", default="dapo")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    path = tempfile.mkdtemp()
    tokenizer = build(path, a.vocab, a.hidden)
    data = Dataset.from_dict({"prompt": ["w"]})
    B, Lp, K = a.batch, a.prompt, a.completion
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(K)[None] < torch.randint(K // 2, K + 1, (B, 1), generator=g)).long()
    inputs = {"prompt_ids": torch.randint(3, a.vocab, (B, Lp), generator=g),
              "prompt_mask": torch.ones(B, Lp, dtype=torch.long),
              "completion_ids": torch.randint(3, a.vocab, (B, K), generator=g) * mask,
              "completion_mask": mask, "advantages": torch.randn(B, generator=g),
              "num_items_in_batch": mask.sum()}
    inputs["old_per_token_logps"] = (-5 + 0.3 * torch.randn(B, K, generator=g)) * mask
    inputs = {k: v.to(a.device) for k, v in inputs.items()}
    results = {}
    for cls in (GRPOTrainer, HAPOGRPOTrainer):
        args = GRPOConfig(output_dir=path, per_device_train_batch_size=2, num_generations=2,
                          max_completion_length=K, report_to=[], bf16=False,
                          use_cpu=a.device == "cpu", loss_type=a.loss_type)
        trainer = cls(model=path, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                      args=args, train_dataset=data, processing_class=tokenizer)
        trainer.current_gradient_accumulation_steps = 1
        model = trainer.model.to(a.device).train()
        times = []
        for i in range(a.repeats + 1):
            model.zero_grad(set_to_none=True)
            if a.device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = trainer.compute_loss(model, dict(inputs))
            loss.backward()
            if a.device != "cpu":
                torch.cuda.synchronize()
            if i:                                   # the first call warms up
                times.append(time.perf_counter() - t0)
        results[cls.__name__] = (statistics.median(times), loss.item())
    (t_trl, l_trl), (t_ours, l_ours) = results["GRPOTrainer"], results["HAPOGRPOTrainer"]
    print(f"batch {B}x{K} completion tokens, vocab {a.vocab}, hidden {a.hidden}, "
          f"loss_type {a.loss_type}, device {a.device}, threads {torch.get_num_threads()}")
    print(f"TRL GRPOTrainer   compute_loss fwd+bwd: {t_trl * 1e3:8.1f} ms  (loss {l_trl:.6f})")
    print(f"HAPOGRPOTrainer   compute_loss fwd+bwd: {t_ours * 1e3:8.1f} ms  (loss {l_ours:.6f})")
    print(f"speed-up: {t_trl / t_ours:.2f}x")


if __name__ == "__main__":
    main()
