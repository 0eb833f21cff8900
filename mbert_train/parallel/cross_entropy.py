"""Cross-entropy over vocab-sharded logits: no rank ever holds full-vocab logits.

Each rank holds logits[:, start:start+V/tp]. The log-sum-exp and the target logit are
assembled with three all-reduces of (N,) tensors (max, target logit, sum of exp), as in
Megatron-LM's `vocab_parallel_cross_entropy`. Columns at or past `vocab_size` (TP padding)
are excluded, so padding never changes the loss or the gradients of real rows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from mbert_train.parallel.mappings import group_rank, group_size


def _reduce(x: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, group) -> torch.Tensor:
    """Set the logits of padded vocabulary columns to -inf (they then take no probability)."""
    per_rank = logits.shape[-1]
    start = group_rank(group) * per_rank
    n_real = min(max(vocab_size - start, 0), per_rank)
    if n_real == per_rank:
        return logits
    return logits.masked_fill(torch.arange(per_rank, device=logits.device) >= n_real, float("-inf"))


class _VocabParallelCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_size, group):
        # logits (n, V/tp) float, target (n,) in [0, vocab_size)
        ctx.dtype = logits.dtype
        logits = mask_padded_vocab(logits.float(), vocab_size, group)
        per_rank = logits.shape[-1]
        start = group_rank(group) * per_rank
        logits_max = _reduce(logits.max(dim=-1).values, group, dist.ReduceOp.MAX)
        shifted = logits - logits_max.unsqueeze(-1)
        outside = (target < start) | (target >= start + per_rank)
        local = (target - start).masked_fill(outside, 0)
        target_logit = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        target_logit = _reduce(target_logit, group)
        exp = shifted.exp_()
        sum_exp = _reduce(exp.sum(dim=-1), group)
        loss = sum_exp.log() - target_logit
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, local, outside)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, outside = ctx.saved_tensors
        grad = softmax
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local] -= (~outside).to(grad.dtype)
        return (grad * grad_loss.unsqueeze(-1)).to(ctx.dtype), None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                                 group=None) -> torch.Tensor:
    """Per-token fp32 loss (n,) from vocab-sharded `logits` (n, V/tp, any float dtype); `target`
    must be valid ids. The loss stays fp32 under bf16/fp16 so its mean does not lose digits."""
    return _VocabParallelCE.apply(logits, target, vocab_size, group)


def vocab_parallel_argmax(logits: torch.Tensor, vocab_size: int, group=None) -> torch.Tensor:
    """Global argmax ids (n,) of vocab-sharded logits, for accuracy without gathering."""
    logits = mask_padded_vocab(logits.float(), vocab_size, group)
    local_max, local_idx = logits.max(dim=-1)
    global_max = _reduce(local_max.clone(), group, dist.ReduceOp.MAX)
    start = group_rank(group) * logits.shape[-1]
    # Ties resolve to the lowest id, as torch.argmax does on full logits.
    candidate = torch.where(local_max == global_max, local_idx + start,
                            torch.full_like(local_idx, torch.iinfo(torch.long).max))
    return _reduce(candidate, group, dist.ReduceOp.MIN)
