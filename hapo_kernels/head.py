"""The LM head fused with the loss, chunk by chunk: the ``[N, V]`` logits never exist.

Device-neutral: torch matmuls (MKL on CPU, cuBLAS on CUDA) make one chunk of logits at a
time, ``[rows, V]`` or, where even one row chunk of the whole vocabulary is too large,
``[rows, vocab]`` blocks. The chunk's backend (``backends.Backend``) turns a full-width chunk
into its loss and its gradient, written over the chunk itself; the gradient then goes
straight into the hidden / weight / bias gradients (``Grads``) and the chunk is dropped.
Vocabulary blocks use the torch code below: an online logsumexp across blocks (the stats
pass), then the gradient block by block.

Three drivers, all over token chunks:

* ``fused_pass``: token-level loss, full-width chunks: one matmul per chunk, the backend
  loss kernel writes loss and gradient in one sweep, then the two gradient matmuls.
* ``stats_pass`` then ``grad_pass``: everything else (sequence-level ratios, which couple a
  sequence's tokens across chunks; vocabulary blocks; the selective log-softmax, whose
  backward only knows its upstream gradients later). Logits are made twice. For the loss,
  ``HeadOps`` wraps the two as a backend's ``row_stats`` / ``grad_logits``, so that
  ``twopass.two_pass_loss`` (the same objective step as on logits) drives them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .backends import Backend
from .inputs import LossInputs
from .options import LossOptions, positive_int
from .outputs import TokenResults, new_buffer

# Default size of one float32 [rows, vocab] slice (a chunk of logits and its temporaries).
# GPU: big enough for cuBLAS to run at full speed, small next to the 5 GB it replaces at
# 16k x 152k, and few enough chunks that the weight gradient's accumulator (read and
# written by every chunk) moves fewer bytes than the matmuls' operands (at 16k x 152k x
# 4096 bf16: 10 chunks, 47 GB against 50 GB; 256 MiB chunks took 19 and 92 GB;
# bench/kernel_report.py models it). CPU: a 256 x 512 x 32768 matmul already runs at full
# MKL speed.
CHUNK_BYTES = {"cuda": 512 << 20, "cpu": 32 << 20}
# Fewest rows worth a matmul; below that the vocabulary is split instead.
MIN_ROWS = {"cuda": 128, "cpu": 16}


@dataclass(frozen=True)
class Chunks:
    """How the fused LM head cuts the work: ``rows`` tokens per chunk, ``vocab`` columns per
    block."""
    rows: int           # tokens per chunk
    vocab: int          # vocabulary columns per block; == V when rows are not split

    def split(self, V: int) -> bool:
        """Whether the vocabulary is cut into blocks (an online logsumexp joins them)."""
        return self.vocab < V


def plan_chunks(N: int, V: int, device: torch.device, dtype: torch.dtype = torch.float32,
                chunk_size: Optional[int] = None,
                vocab_chunk_size: Optional[int] = None) -> Chunks:
    """Token rows per chunk and vocabulary columns per block.

    Default: ``rows = CHUNK_BYTES // (e V)`` (512 MiB on CUDA, 32 MiB on CPU) so that one
    ``[rows, V]`` slice fits the budget, with ``e`` the bytes per element of what a chunk
    costs: the logits' own dtype on CUDA (the Triton kernels keep no ``[rows, V]``
    temporaries), 4 on CPU (the torch path works in float32). If that is fewer than
    ``MIN_ROWS`` (128 on CUDA, 16 on CPU) rows, ``rows = MIN_ROWS`` and the vocabulary is
    split into blocks of ``CHUNK_BYTES // (e rows)`` columns. ``chunk_size`` /
    ``vocab_chunk_size`` override.
    """
    chunk_size = positive_int("chunk_size", chunk_size, allow_none=True)
    vocab_chunk_size = positive_int("vocab_chunk_size", vocab_chunk_size, allow_none=True)
    kind = "cuda" if device.type == "cuda" else "cpu"
    budget, min_rows = CHUNK_BYTES[kind], MIN_ROWS[kind]
    e = torch.empty((), dtype=dtype).element_size() if kind == "cuda" else 4
    rows = chunk_size or max(1, budget // (e * max(V, 1)))
    vocab = V
    if chunk_size is None and rows < min_rows:
        rows = min_rows
        vocab = max(1, budget // (e * rows))
    if vocab_chunk_size is not None:
        vocab = vocab_chunk_size
    return Chunks(rows=max(1, min(rows, N)), vocab=min(vocab, V))


def ranges(n: int, step: int) -> List[Tuple[int, int]]:
    """``(start, stop)`` pieces of ``range(n)`` of at most ``step`` each."""
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def logits_block(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], v0: int,
                 v1: int) -> torch.Tensor:
    """``h @ weight[v0:v1].T + bias[v0:v1]`` in the inputs' dtype (the GEMM accumulates in fp32)."""
    w = weight[v0:v1]
    if bias is None:
        return torch.mm(h, w.t())
    return torch.addmm(bias[v0:v1], h, w.t())


_MIXED_MM_OK = {"cuda": True}


def addmm_into(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` where ``acc`` may be float32 and ``a``, ``b`` bf16 / fp16.

    CUDA: cuBLAS writes the float32 sum itself (``out_dtype``), no temporary. Elsewhere
    (and on a torch without it) the product is made in the inputs' dtype, then added.
    """
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
        return
    if acc.is_cuda and _MIXED_MM_OK["cuda"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _MIXED_MM_OK["cuda"] = False
    acc.add_(torch.mm(a, b))


class Grads:
    """The gradients of hidden ``[N, H]``, weight ``[V, H]`` and bias ``[V]``, as asked for.

    ``hidden``'s rows are written once each (token chunks are disjoint), straight in its
    dtype. Weight and bias sum over every chunk: in float32 where they are lower precision
    and ``fp32_accumulate`` (the default), else in their own dtype.
    """

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 need_hidden: bool, need_weight: bool, need_bias: bool,
                 fp32_accumulate: bool) -> None:
        acc = torch.float32 if fp32_accumulate else weight.dtype
        self.dtype = weight.dtype
        self.h = new_buffer(hidden.shape, hidden.dtype, hidden.device) if need_hidden else None
        self.w = (torch.zeros(weight.shape, dtype=acc, device=weight.device)
                  if need_weight else None)
        self.b = (torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
                  if need_bias and bias is not None else None)

    @property
    def any(self) -> bool:
        """Whether any gradient (hidden, weight or bias) is wanted."""
        return self.h is not None or self.w is not None or self.b is not None

    def add(self, r0: int, r1: int, h: torch.Tensor, g: torch.Tensor, weight: torch.Tensor,
            v0: int, v1: int, h_acc: Optional[torch.Tensor] = None) -> None:
        """Add the gradient block ``g = dL/dlogits[r0:r1, v0:v1]`` (inputs' dtype)."""
        if self.h is not None:
            if h_acc is None:                        # full-width chunk: rows done here
                torch.mm(g, weight[v0:v1], out=self.h[r0:r1])
            else:                                    # vocabulary blocks: sum in float32
                addmm_into(h_acc, g, weight[v0:v1])
        if self.w is not None:
            addmm_into(self.w[v0:v1], g.t(), h)
        if self.b is not None:
            self.b[v0:v1] += g.sum(0, dtype=torch.float32)

    def finish(self) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor],
                              Optional[torch.Tensor]]:
        """``(hidden, weight, bias)`` gradients, the last two in the weight's dtype; None
        where not asked for."""
        def cast(t):
            return None if t is None else t.to(self.dtype)
        return self.h, cast(self.w), cast(self.b)


def fused_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               inputs: LossInputs, opts: LossOptions, out: TokenResults,
               grads: Optional[Grads], chunks: Chunks, backend: Backend) -> None:
    """Token-level loss over full-width chunks: logits, loss + gradient in place, matmuls."""
    V = weight.shape[0]
    want = grads is not None and grads.any
    for r0, r1 in ranges(hidden.shape[0], chunks.rows):
        h = hidden[r0:r1]
        z = logits_block(h, weight, bias, 0, V)
        # The gradient overwrites the chunk's logits (each block is read before written).
        backend.token_loss(z, inputs.slice_rows(r0, r1), opts, out.slice_rows(r0, r1),
                           z if want else None)
        if want:
            grads.add(r0, r1, h, z, weight, 0, V)


# --------------------------------------------------------------------------- two passes
def _block_stats(z, y, v0, inv_t, state):
    """Fold one vocabulary block into the running ``(m, s, w, z_y)`` of each row.

    ``s = sum exp(z - m)`` and ``w = sum exp(z - m) (z - m)`` relative to the running max,
    so ``entropy = log s - w / s`` never subtracts two large numbers.
    """
    z = z.float()
    z = z * inv_t if inv_t != 1.0 else z
    Vb = z.shape[1]
    here = (y >= v0) & (y < v0 + Vb)
    z_y = z.gather(1, (y - v0).clamp(0, Vb - 1)[:, None]).squeeze(1)
    m_b = z.amax(dim=1)
    d = z.sub_(m_b[:, None])            # z is ours (a fresh block or its float copy)
    e = d.exp()
    s_b = e.sum(dim=1)
    w_b = (e * d).sum(dim=1)
    if state is None:
        return [m_b, s_b, w_b, torch.where(here, z_y, 0.0)]
    m, s, w, zy = state
    m_new = torch.maximum(m, m_b)
    a, a_b = torch.exp(m - m_new), torch.exp(m_b - m_new)
    w = a * (w + s * (m - m_new)) + a_b * (w_b + s_b * (m_b - m_new))
    s = a * s + a_b * s_b
    return [m_new, s, w, torch.where(here, z_y, zy)]


def stats_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               targets: torch.Tensor, temperature: float, ignore_index: int, chunks: Chunks,
               backend: Backend, out: tuple) -> None:
    """float32 ``(logp, entropy, lse, sum_pz)`` of every row into ``out`` (0 on ignored rows)."""
    V = weight.shape[0]
    inv_t = 1.0 / float(temperature)
    for r0, r1 in ranges(hidden.shape[0], chunks.rows):
        h, y = hidden[r0:r1], targets[r0:r1]
        dst = tuple(o[r0:r1] for o in out)
        if not chunks.split(V):
            z = logits_block(h, weight, bias, 0, V)
            backend.row_stats(z, y, temperature, ignore_index, out=dst)
            continue
        valid = y != ignore_index
        yl = torch.where(valid, y, torch.zeros_like(y)).long()
        state = None
        for v0, v1 in ranges(V, chunks.vocab):
            state = _block_stats(logits_block(h, weight, bias, v0, v1), yl, v0, inv_t, state)
        m, s, w, z_y = state
        log_s = s.log()
        for o, val in zip(dst, (z_y - m - log_s, log_s - w / s, m + log_s, m + w / s)):
            o.copy_(torch.where(valid, val, 0.0))


class HeadOps:
    """A backend's ``row_stats`` / ``grad_logits`` over the logits
    ``hidden @ weight.T + bias``, made chunk by chunk: ``twopass.two_pass_loss`` runs on it
    unchanged, given the hidden states for the logits and a ``Grads`` for their gradient."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], chunks: Chunks,
                 backend: Backend) -> None:
        self.weight, self.bias, self.chunks, self.backend = weight, bias, chunks, backend

    def row_stats(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float,
                  ignore_index: int, *, out: tuple) -> tuple:
        """``Backend.row_stats`` over the head's logits, chunk by chunk, into ``out``."""
        stats_pass(hidden, self.weight, self.bias, targets, temperature, ignore_index,
                   self.chunks, self.backend, out)
        return out

    def grad_logits(self, hidden: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                    spz: torch.Tensor, g_logp: Optional[torch.Tensor],
                    g_ent: Optional[torch.Tensor], temperature: float, ignore_index: int,
                    *, out: Grads) -> None:
        """``Backend.grad_logits`` through the head: accumulates the hidden, weight and bias
        gradients."""
        def flat(t):
            return None if t is None else t.reshape(-1)
        grad_pass(hidden, self.weight, self.bias, targets, lse, spz, flat(g_logp), flat(g_ent),
                  temperature, ignore_index, self.chunks, self.backend, out)


def _block_grad(z, y, valid, v0, lse, spz, gl, ge, inv_t):
    """``dL/dz`` of one vocabulary block, written over ``z`` (in its dtype)."""
    zf = z.float()                      # z itself when float32: it is overwritten anyway
    zf = zf * inv_t if inv_t != 1.0 else zf
    p = zf.sub_(lse[:, None]).exp_() if ge is None else (zf - lse[:, None]).exp()
    if ge is not None:
        # d entropy / dz = -p * (z - sum_pz)
        dz = p * (zf - spz[:, None]) * (-ge[:, None])
        if gl is not None:
            dz.sub_(p * gl[:, None])
    else:
        dz = p.mul_(-gl[:, None]) if gl is not None else torch.zeros_like(p)
    if gl is not None:
        Vb = z.shape[1]
        here = valid & (y >= v0) & (y < v0 + Vb)
        idx = (y - v0).clamp(0, Vb - 1)[:, None]
        dz.scatter_add_(1, idx, torch.where(here, gl, 0.0)[:, None])
    dz.mul_(inv_t)
    dz.masked_fill_(~valid[:, None], 0.0)
    z.copy_(dz)
    return z


def grad_pass(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
              targets: torch.Tensor, lse: torch.Tensor, spz: torch.Tensor,
              g_logp: Optional[torch.Tensor], g_ent: Optional[torch.Tensor],
              temperature: float, ignore_index: int, chunks: Chunks, backend: Backend,
              grads: Grads) -> None:
    """Make the logits again and push ``dL/dlogits`` (from per-row ``g_logp``, ``g_ent``)
    into ``grads``. ``g_logp`` / ``g_ent`` may be ``None`` (that term is absent)."""
    V, H = weight.shape
    inv_t = 1.0 / float(temperature)

    def cut(t, r0, r1):
        return None if t is None else t[r0:r1]

    for r0, r1 in ranges(hidden.shape[0], chunks.rows):
        h, y = hidden[r0:r1], targets[r0:r1]
        gl, ge = cut(g_logp, r0, r1), cut(g_ent, r0, r1)
        if not chunks.split(V):
            z = logits_block(h, weight, bias, 0, V)
            backend.grad_logits(z, y, lse[r0:r1], spz[r0:r1], gl, ge, temperature,
                                ignore_index, out=z)
            grads.add(r0, r1, h, z, weight, 0, V)
            continue
        valid = y != ignore_index
        yl = torch.where(valid, y, torch.zeros_like(y)).long()
        h_acc = (torch.zeros(r1 - r0, H, dtype=torch.float32, device=h.device)
                 if grads.h is not None else None)
        for v0, v1 in ranges(V, chunks.vocab):
            z = logits_block(h, weight, bias, v0, v1)
            _block_grad(z, yl, valid, v0, lse[r0:r1], spz[r0:r1], gl, ge, inv_t)
            grads.add(r0, r1, h, z, weight, v0, v1, h_acc=h_acc)
        if h_acc is not None:
            grads.h[r0:r1].copy_(h_acc)
