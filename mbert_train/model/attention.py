"""Attention with dropout that keeps no (s x s) float tensor: the CPU training path.

SDPA's CPU kernels have no fused dropout, and the explicit path (scores, softmax, mask, dropped
probabilities) keeps three (b, n, s, s) tensors per layer for backward, 9 bytes per score in
fp32: at BERT-base seq 512 that is most of the step's activation memory, and streaming them
through DRAM is much of attention's time. `dropout_attention` follows flash attention's scheme,
in blocks (one sample, a few heads) sized to stay in cache:

- forward: scores, softmax, dropout and the product with V, block by block; it saves the QKV
  projection (kept anyway), the padding bias, the read rows and the 1-byte keep-mask;
- backward: recomputes each block's scores and softmax and forms the gradients of Q, K and V,
  written straight into the gradient of the QKV projection.

Keeping the mask (1 byte per score) rather than redrawing it in backward is about 10% faster
for 1/9 of the explicit path's memory. Q, K and V are read from the QKV projection's
(b, s, 3, n, d) layout and the context is written in (b, s, n, d), so no head transposes are
copied either way.

Each (sample, global head) slab draws its mask from its own generator seeded `base + sample *
heads + global head`, where `base` is one draw from the replicated default generator. So the
masks differ across heads, TP ranks, layers, steps and DP ranks; a head's mask does not depend
on which TP rank holds it (TP-invariant at no cost); and activation checkpointing, which
restores the default generator before recomputing, redraws them exactly.
"""

from __future__ import annotations

import torch

from mbert_train.parallel.random import keep_bytes_from_seeds, keep_scale, replicated_seed

# Elements of one block's (heads x sq x sk) scores: 2^18 floats = 1 MiB, about an L2 cache.
_BLOCK_ELEMENTS = 1 << 18


def _heads_per_block(sq: int, sk: int, n: int) -> int:
    return max(1, min(n, _BLOCK_ELEMENTS // max(1, sq * sk)))


def _queries(qkv: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """(b, sq, n, d): every position's queries, or only those at `rows` (b, m)."""
    q = qkv[:, :, 0]
    if rows is None:
        return q
    b, _, n, d = q.shape
    return q.gather(1, rows[:, :, None, None].expand(b, rows.shape[1], n, d))


def _block_probs(qb, kb, bias_row, scale: float) -> torch.Tensor:
    """Softmax of one block's scores (heads, sq, sk); fp32 for low-precision inputs."""
    if bias_row is None:
        scores = torch.bmm(qb, kb.transpose(1, 2)).mul_(scale)
    else:
        scores = torch.baddbmm(bias_row, qb, kb.transpose(1, 2), alpha=scale)
    return scores.softmax(-1, dtype=None if scores.dtype in (torch.float32, torch.float64) else torch.float32)


class _DropoutAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, rows, bias, p: float, base: int, heads_total: int, head_offset: int):
        b, sk, _, n, d = qkv.shape
        q, k, v = _queries(qkv, rows), qkv[:, :, 1], qkv[:, :, 2]
        sq = q.shape[1]
        scale, drop_scale = d ** -0.5, keep_scale(p)
        hn = _heads_per_block(sq, sk, n)
        out = torch.empty(b, sq, n, d, dtype=qkv.dtype, device=qkv.device)
        keeps = torch.empty(b, n, sq, sk, dtype=torch.uint8, device=qkv.device)
        for i in range(b):
            bias_row = None if bias is None else bias[i]
            for h0 in range(0, n, hn):
                h1 = min(h0 + hn, n)
                qb, kb, vb = (t[i, :, h0:h1].transpose(0, 1) for t in (q, k, v))  # (hn, s, d)
                probs = _block_probs(qb, kb, bias_row, scale)
                keep = keep_bytes_from_seeds(_seeds(base, i, h0, h1, heads_total, head_offset), probs.shape, p,
                                             qkv.device)
                keeps[i, h0:h1] = keep
                # The 1/(1-p) scale goes on the (s, d) product rather than the (s, s) probabilities.
                out[i, :, h0:h1] = torch.bmm(probs.mul_(keep).to(qkv.dtype), vb).mul_(drop_scale).transpose(0, 1)
        ctx.save_for_backward(qkv, rows, bias, keeps)
        ctx.args = (p, base, heads_total, head_offset)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, rows, bias, keeps = ctx.saved_tensors
        p, base, heads_total, head_offset = ctx.args
        b, sk, _, n, d = qkv.shape
        q, k, v = _queries(qkv, rows), qkv[:, :, 1], qkv[:, :, 2]
        sq = q.shape[1]
        scale, drop_scale = d ** -0.5, keep_scale(p)
        hn = _heads_per_block(sq, sk, n)
        d_qkv = torch.empty_like(qkv) if rows is None else torch.zeros_like(qkv)
        dq = d_qkv[:, :, 0] if rows is None else torch.empty_like(q)
        for i in range(b):
            bias_row = None if bias is None else bias[i]
            for h0 in range(0, n, hn):
                h1 = min(h0 + hn, n)
                qb, kb, vb, gb = (t[i, :, h0:h1].transpose(0, 1) for t in (q, k, v, grad_out))
                probs = _block_probs(qb, kb, bias_row, scale)
                keep = keeps[i, h0:h1]
                dropped = (probs * keep).to(qkv.dtype)  # the scale is applied to the (s, d) results
                d_qkv[i, :, 2, h0:h1] = torch.bmm(dropped.transpose(1, 2), gb).mul_(drop_scale).transpose(0, 1)
                d_probs = torch.bmm(gb, vb.transpose(1, 2)).to(probs.dtype).mul_(keep)
                d_scores = torch._softmax_backward_data(d_probs, probs, -1, probs.dtype).to(qkv.dtype) \
                    .mul_(scale * drop_scale)
                dq[i, :, h0:h1] = torch.bmm(d_scores, kb).transpose(0, 1)
                d_qkv[i, :, 1, h0:h1] = torch.bmm(d_scores.transpose(1, 2), qb).transpose(0, 1)
        if rows is not None:
            index = rows[:, :, None, None].expand(b, rows.shape[1], n, d)
            d_qkv[:, :, 0].scatter_add_(1, index, dq)
        return d_qkv, None, None, None, None, None, None


def _seeds(base: int, i: int, h0: int, h1: int, heads_total: int, head_offset: int) -> range:
    """Seeds of sample i's local heads [h0, h1): base + i * heads_total + global head."""
    first = base + i * heads_total + head_offset
    return range(first + h0, first + h1)


def dropout_attention(qkv: torch.Tensor, mask: torch.Tensor | None, p: float, rows: torch.Tensor | None = None,
                      *, heads_total: int | None = None, head_offset: int = 0) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + padding) with dropout p, times v, from the QKV projection
    `qkv` (b, s, 3, n, d); queries at `rows` (b, m) only when given. `mask` (b, 1, 1, s) bool,
    True = attend. This rank's heads are global heads [head_offset, head_offset + n) of
    `heads_total` (default n). Returns the context (b, s|m, n, d)."""
    b, s, _, n, _ = qkv.shape
    bias = None
    if mask is not None:
        bias = torch.zeros(b, 1, s, dtype=qkv.dtype, device=qkv.device)
        bias.masked_fill_(~mask.view(b, 1, s), torch.finfo(qkv.dtype).min)
    return _DropoutAttention.apply(qkv, rows, bias, p, replicated_seed(), heads_total or n, head_offset)
