"""Column-, row- and vocab-parallel layers (Megatron-LM, Shoeybi et al. 2019, section 3).

Every layer draws its *full* master weight from the default generator and keeps its shard,
so the TP=N model built with seed s is exactly the TP=1 model built with seed s, sharded.
Sharded parameters carry `tensor_model_parallel=True` (and DeepSpeed's older `model_parallel`)
so gradient-norm code counts replicated parameters once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mbert_train.parallel.context import TPContext
from mbert_train.parallel.mappings import (copy_to_tp, gather_from_tp, linear_with_seq_gather, reduce_from_tp,
                                           reduce_scatter_to_seq, scatter_to_tp)

InitFn = Callable[[torch.Tensor], None]


def normal_init(std: float) -> InitFn:
    return lambda w: nn.init.normal_(w, mean=0.0, std=std)


def shard(full: torch.Tensor, dim: int, tp: int, rank: int, *, stride: int = 1) -> torch.Tensor:
    """Rank's shard of `full` along `dim`. With stride k the dim holds k stacked blocks (e.g.
    fused [Q; K; V]) and each block is split separately, so a rank owns whole heads of each."""
    blocks = full.chunk(stride, dim=dim)
    return torch.cat([b.chunk(tp, dim=dim)[rank] for b in blocks], dim=dim).clone()


def unshard(shards: list[torch.Tensor], dim: int, *, stride: int = 1) -> torch.Tensor:
    """Inverse of `shard` over all ranks' shards."""
    per_rank = [s.chunk(stride, dim=dim) for s in shards]
    return torch.cat([torch.cat([p[k] for p in per_rank], dim=dim) for k in range(stride)], dim=dim)


def mark_sharded(p: nn.Parameter, dim: int, stride: int = 1) -> nn.Parameter:
    """Mark `p` as this rank's shard along `dim` (stride: stacked blocks each split, e.g. QKV).
    `model_parallel` is the name DeepSpeed's gradient-norm code reads."""
    p.tensor_model_parallel = True
    p.model_parallel = True
    p.partition_dim = dim
    p.partition_stride = stride
    return p


@dataclass(frozen=True)
class Sharding:
    """How a parameter lies over the TP group; the one reading of the markers, used by the
    gradient norm, the checkpoint (`checkpoint.dcp`) and the weight converters (`weights`)."""

    sharded: bool
    """A shard per rank (along `dim`); otherwise the same tensor on every rank."""
    dim: int = 0
    stride: int = 1
    sequence_parallel: bool = False
    """Replicated, but used on a sequence chunk: its gradient is summed over TP in backward."""


def sharding(p: torch.Tensor) -> Sharding:
    if getattr(p, "tensor_model_parallel", False):
        return Sharding(True, p.partition_dim, p.partition_stride)
    return Sharding(False, sequence_parallel=bool(getattr(p, "sequence_parallel", False)))


class ColumnParallelLinear(nn.Module):
    """y = x A^T + b with A split by output rows: rank r computes y[..., r-th slice]. Under
    sequence parallelism the input arrives split along the sequence and is all-gathered."""

    def __init__(self, in_features: int, out_features: int, group=None, *, bias: bool = True,
                 gather_output: bool = False, stride: int = 1, init: InitFn = normal_init(0.02)):
        super().__init__()
        self.tp = ctx = TPContext.of(group)
        tp = ctx.size
        if out_features % (tp * stride):
            raise ValueError(f"output size {out_features} is not divisible by TP={tp} x stride={stride}")
        self.group, self.gather_output = ctx.group, gather_output
        full = torch.empty(out_features, in_features)
        init(full)
        self.weight = mark_sharded(nn.Parameter(shard(full, 0, tp, ctx.rank, stride=stride)), 0, stride)
        self.bias = mark_sharded(nn.Parameter(torch.zeros(out_features // tp)), 0, stride) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.sp:  # all-gathered along the sequence; only this rank's chunk is kept for backward
            y = linear_with_seq_gather(x, self.weight, self.bias, self.group, self.tp.sp_keep_gathered)
        else:
            y = F.linear(copy_to_tp(x, self.group), self.weight, self.bias)  # (..., out/tp)
        return gather_from_tp(y, self.group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x A^T + b with A split by input columns; partial products are all-reduced."""

    def __init__(self, in_features: int, out_features: int, group=None, *, bias: bool = True,
                 input_is_parallel: bool = True, init: InitFn = normal_init(0.02)):
        super().__init__()
        self.tp = ctx = TPContext.of(group)
        tp = ctx.size
        if in_features % tp:
            raise ValueError(f"input size {in_features} is not divisible by TP={tp}")
        self.group, self.input_is_parallel = ctx.group, input_is_parallel
        full = torch.empty(out_features, in_features)
        init(full)
        self.weight = mark_sharded(nn.Parameter(shard(full, 1, tp, ctx.rank)), 1)
        # The bias is added once, after the reduction: it is replicated, not sharded (under
        # sequence parallelism, to this rank's chunk of the sequence).
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if self.bias is not None and ctx.sp:
            self.bias.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp(x, self.group)
        return self.reduce(F.linear(x, self.weight))

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's partial product (..., out) -> the layer's output: reduced over the group
        (scattered along the sequence under SP), plus the bias. For a caller that computes the
        product its own way (`modernbert.GeGLU`)."""
        y = reduce_scatter_to_seq(y, self.group) if self.tp.sp else reduce_from_tp(y, self.group)  # (..., out)
        return y if self.bias is None else y + self.tp.replicated_param(self.bias)


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (vocabulary) are split across TP ranks; lookups outside a rank's
    range give zeros and one all-reduce assembles the result.

    `num_embeddings` is the padded size; rows >= `real_vocab` start (and stay) at zero.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, group=None, *, real_vocab: int | None = None,
                 padding_idx: int | None = None, init: InitFn = normal_init(0.02)):
        super().__init__()
        self.tp = ctx = TPContext.of(group)
        group, tp, rank = ctx.group, ctx.size, ctx.rank
        if num_embeddings % tp:
            raise ValueError(f"padded vocab {num_embeddings} is not divisible by TP={tp}")
        real_vocab = num_embeddings if real_vocab is None else real_vocab
        self.group = group
        self.per_rank = num_embeddings // tp
        self.vocab_start = rank * self.per_rank
        master = torch.empty(real_vocab, embedding_dim)
        init(master)
        if padding_idx is not None:
            master[padding_idx].zero_()
        full = torch.zeros(num_embeddings, embedding_dim)
        full[:real_vocab] = master
        self.weight = mark_sharded(nn.Parameter(full[self.vocab_start:self.vocab_start + self.per_rank].clone()), 0)
        local_pad = None if padding_idx is None else padding_idx - self.vocab_start
        self.local_padding_idx = local_pad if local_pad is not None and 0 <= local_pad < self.per_rank else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(b, s) -> (b, s, h); under sequence parallelism this rank's chunk (b, s/tp, h)."""
        if self.tp.size == 1:
            return F.embedding(ids, self.weight, self.local_padding_idx)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_start + self.per_rank)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, self.local_padding_idx)  # (..., h), partial
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_seq(out, self.group) if self.tp.sp else reduce_from_tp(out, self.group)
