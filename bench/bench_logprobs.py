"""selective_log_softmax, no grad and fwd+bwd: ours against TRL eager, torch.compile, Liger.

Shapes: ``HAPO_BENCH_TOKENS`` x ``HAPO_BENCH_VOCAB`` (defaults: CPU 512 x 32768 fp32; CUDA the
GPU sweep 4096/16384 x 32768/151936 bf16).
"""
import pytest
import torch

from bench.suite import device, env_list, impl_names, run_benchmark

GPU = device() == "cuda"
TOKENS = env_list("HAPO_BENCH_TOKENS", [4096, 16384] if GPU else [512])
VOCAB = env_list("HAPO_BENCH_VOCAB", [32768, 151936] if GPU else [32768])
DTYPE = torch.bfloat16 if GPU else torch.float32
SEQ = 512


def shapes():
    return [pytest.param(n, v, id=f"{n}x{v}") for n in TOKENS for v in VOCAB]


@pytest.mark.parametrize("tokens,V", shapes())
@pytest.mark.parametrize("impl", impl_names("sls_nograd"))
def test_selective_log_softmax_nograd(benchmark, impl, tokens, V):
    T = min(SEQ, tokens)
    run_benchmark(benchmark, "sls_nograd", impl, tokens // T, T, V, DTYPE)


@pytest.mark.parametrize("tokens,V", shapes())
@pytest.mark.parametrize("impl", impl_names("sls_grad"))
def test_selective_log_softmax_grad(benchmark, impl, tokens, V):
    T = min(SEQ, tokens)
    run_benchmark(benchmark, "sls_grad", impl, tokens // T, T, V, DTYPE)
