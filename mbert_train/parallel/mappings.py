"""Autograd collectives at the boundaries of a tensor-parallel region (Megatron-LM, Shoeybi
et al. 2019, fig. 3: `f` = copy-to, `g` = reduce-from). Each is one forward/backward pair;
with `group=None` or a group of one they are the identity."""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _split_last(x: torch.Tensor, group) -> torch.Tensor:
    n = group_size(group)
    return x.chunk(n, dim=-1)[group_rank(group)].contiguous()


def _gather_last(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Identity forward; all-reduce of the gradient backward (input of a column-parallel layer)."""
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-reduce forward; identity backward (output of a row-parallel layer)."""
    return x if group_size(group) == 1 else _ReduceFromTP.apply(x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the last dim forward; all-gather the gradient backward."""
    return x if group_size(group) == 1 else _ScatterToTP.apply(x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """All-gather along the last dim forward; keep this rank's slice of the gradient backward."""
    return x if group_size(group) == 1 else _GatherFromTP.apply(x, group)


# ---- sequence parallelism (Korthikanti et al. 2022): activations outside the TP regions are
# split along the sequence (dim 1 of our (b, s, h) tensors) over the TP group. An all-reduce
# becomes a reduce-scatter + all-gather of the same total size.

SEQ_DIM = 1


def _split_seq(x: torch.Tensor, group) -> torch.Tensor:
    # A copy even where the chunk is already contiguous (b=1): a view would keep the whole
    # sequence's storage alive for as long as the chunk lives.
    return x.chunk(group_size(group), dim=SEQ_DIM)[group_rank(group)].clone(memory_format=torch.contiguous_format)


def _gather_seq(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(group_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=SEQ_DIM)


def _reduce_scatter_seq(x: torch.Tensor, group) -> torch.Tensor:
    if dist.get_backend(group) == "nccl":
        x = x.transpose(0, SEQ_DIM).contiguous()  # the sequence first: contiguous per-rank chunks
        out = x.new_empty((x.shape[0] // group_size(group), *x.shape[1:]))
        dist.reduce_scatter_tensor(out, x, group=group)
        return out.transpose(0, SEQ_DIM).contiguous()
    # gloo has no reduce-scatter: the same sum through an all-reduce, then this rank's chunk.
    return _split_seq(_all_reduce(x, group), group)


class _ReduceScatterToSeq(torch.autograd.Function):
    """Out of a row-parallel layer: reduce-scatter forward, all-gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_seq(grad, ctx.group), None


class _GatherSeqReplicated(torch.autograd.Function):
    """To a replicated computation (the last layer, the heads): all-gather forward; every rank's
    gradient is the whole gradient, so backward keeps this rank's chunk."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _gather_seq(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_seq(grad, ctx.group), None


def reduce_scatter_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterToSeq.apply(x, group)


def gather_seq_replicated(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherSeqReplicated.apply(x, group)


def split_seq(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's chunk of the sequence (no autograd pairing: for inputs without gradients)."""
    return x if group_size(group) == 1 else _split_seq(x, group)


class _LinearWithSeqGather(torch.autograd.Function):
    """y = gather_seq(x) W^T + b. By default it saves only this rank's chunk x and backward
    gathers it again for the weight gradient (Megatron-LM's sequence-parallel column linear:
    one more all-gather per linear). `keep_gathered` saves the gathered input instead: the
    traffic of TP without SP, for a full-sequence copy per linear."""

    @staticmethod
    def forward(ctx, x, weight, bias, group, keep_gathered):
        ctx.group, ctx.has_bias, ctx.keep_gathered = group, bias is not None, keep_gathered
        total = _gather_seq(x, group)
        ctx.save_for_backward(total if keep_gathered else x, weight)
        return torch.nn.functional.linear(total, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        saved, weight = ctx.saved_tensors
        total = saved if ctx.keep_gathered else _gather_seq(saved, ctx.group)
        grad_input = _reduce_scatter_seq(grad.matmul(weight), ctx.group)
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_weight = g2.t().matmul(total.reshape(-1, total.shape[-1]))
        grad_bias = g2.sum(0) if ctx.has_bias else None
        return grad_input, grad_weight, grad_bias, None, None


def linear_with_seq_gather(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, group,
                           keep_gathered: bool = False) -> torch.Tensor:
    """Column-parallel linear on a sequence-split input (see `_LinearWithSeqGather`)."""
    if group_size(group) == 1:
        return torch.nn.functional.linear(x, weight, bias)
    return _LinearWithSeqGather.apply(x, weight, bias, group, keep_gathered)
