"""The tensor-parallel context: created once from the layout and passed to the model, which
reads from it what each layer needs (the group, sequence parallelism, the dropout streams).

`TPContext()` (no group) is the plain dense model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mbert_train.parallel.mappings import copy_to_tp, group_rank, group_size
from mbert_train.parallel.random import (apply_keep, keep_mask, local_dropout_keep, sharded_cuda_rng,
                                         sharded_keep_mask)


@dataclass(frozen=True)
class TPContext:
    group: Any = None
    """The tensor-parallel process group (None: TP=1)."""
    sequence_parallel: bool = False
    """Activations outside attention and MLP (LayerNorms, dropout, residuals) split along the
    sequence over the group (Korthikanti et al. 2022)."""
    sp_keep_gathered: bool = False
    """Under SP, column-parallel linears keep their gathered input for backward instead of
    gathering it again there (`parallel.sp_keep_gathered`): TP's traffic, more memory."""
    invariant_dropout: bool = False
    """Masks drawn for the whole tensor and sliced (`model.tp_invariant_dropout`), so TP and SP
    degrees do not change which elements are dropped."""

    @classmethod
    def of(cls, tp: "TPContext | Any") -> "TPContext":
        """A context from a context or a bare process group (or None)."""
        return tp if isinstance(tp, TPContext) else cls(group=tp)

    @property
    def size(self) -> int:
        return group_size(self.group)

    @property
    def rank(self) -> int:
        return group_rank(self.group)

    @property
    def sp(self) -> bool:
        """Sequence parallelism in effect (a group of one has nothing to split)."""
        return self.sequence_parallel and self.size > 1

    def without_sp(self) -> "TPContext":
        return dataclasses.replace(self, sequence_parallel=False)

    def replicated_param(self, p: torch.Tensor) -> torch.Tensor:
        """A TP-replicated parameter used on this rank's sequence chunk: its gradient is only
        this chunk's part, so the backward sums it over the group (identity forward)."""
        return copy_to_tp(p, self.group) if self.sp else p

    def hidden_dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        """Dropout on the residual stream: replicated without SP (the default stream, the same
        mask on every TP rank); per rank with SP (its own stream, or the sliced whole-tensor mask
        in the invariant mode, which is then exactly the mask without SP)."""
        if not training or p == 0:
            return x
        if self.invariant_dropout:
            keep = sharded_keep_mask(tuple(x.shape), p, 1, self.group if self.sp else None, x.device)
            return apply_keep(x, keep, p)
        if not self.sp:
            if x.is_cuda:
                return F.dropout(x, p, True)
            return apply_keep(x, keep_mask(x.shape, p, x.device), p)
        if x.is_cuda:
            with sharded_cuda_rng(x.device, self.group):
                return F.dropout(x, p, True)
        return apply_keep(x, local_dropout_keep(tuple(x.shape), p, self.group, x.device), p)

    def sharded_dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        """Dropout on an activation split along its last dim over the group (a column-parallel
        output): each rank draws its own mask from its stream, or in the invariant mode keeps its
        slice of the whole tensor's mask, which is then the mask at any TP degree."""
        if not training or p == 0:
            return x
        if self.invariant_dropout:
            return apply_keep(x, sharded_keep_mask(tuple(x.shape), p, x.dim() - 1, self.group, x.device), p)
        if x.is_cuda:
            with sharded_cuda_rng(x.device, self.group):
                return F.dropout(x, p, True)
        return apply_keep(x, local_dropout_keep(tuple(x.shape), p, self.group, x.device), p)


class LayerNorm(torch.nn.LayerNorm):
    """nn.LayerNorm (same parameter names) that, under sequence parallelism, sums its gradients
    over the TP group: each rank normalises only its chunk of the sequence."""

    def __init__(self, hidden: int, eps: float, tp: TPContext, *, bias: bool = True):
        super().__init__(hidden, eps=eps, bias=bias)
        self.tp = tp
        if tp.sp:
            for p in self.parameters():
                p.sequence_parallel = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.tp.replicated_param(self.bias)
        return F.layer_norm(x, self.normalized_shape, self.tp.replicated_param(self.weight), bias, self.eps)
