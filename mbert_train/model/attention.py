"""Attention after the QKV projection: one dispatch over devices and batch layouts.

`CoreAttention` computes softmax(q k^T / sqrt(d)) v with dropout, each sample attending to its
own real tokens, from the QKV projection of either layout the model runs a batch in: padded
(b, s, ...) with a padding mask, or packed (1, T, ...) with the batch's `Packing`. It picks:

- on CPU, for training with dropout and for every packed batch: the blockwise kernel
  (`blockwise.py`; no s x s tensor kept, per-head masks that do not depend on TP);
- with `model.tp_invariant_dropout` and dropout: the same kernel on any device;
- elsewhere (CUDA) on a packed batch: SDPA on nested jagged tensors (NJT) over the packed
  tokens, which torch sends to the variable-length flash or memory-efficient kernels, dropout
  fused: no per-layer re-pad. The sample bounds come from the packing (its offsets tensor, and
  its shortest and longest sample as Python ints: without them torch would read them back);
- otherwise: SDPA on the padded layout with its mask.

Why the CPU does not run NJT SDPA: torch (2.13) has only the math backend for NJTs there. It
splits the batch by lengths read back from the offsets, attends per sample with an explicit
(n, s, s) softmax and dropout, and keeps those for backward: slower and heavier than the
blockwise kernel, whose per-head masks also make CPU dropout independent of the TP degree.
The tests run this NJT path on CPU (math backend) against the blockwise kernel, and on the
meta device as torch's flash path, which reads nothing back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mbert_train.batch import Packing
from mbert_train.model.blockwise import dropout_attention
from mbert_train.parallel.context import TPContext
from mbert_train.parallel.random import sharded_cuda_rng


def sdpa_on_rank_stream(q, k, v, mask, p: float, group) -> torch.Tensor:
    """SDPA with dropout on this TP rank's stream: flash / memory-efficient kernels on CUDA."""
    with sharded_cuda_rng(q.device, group):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class CoreAttention:
    """The dispatch (see the module doc) for one layer: attention `dropout`, and `tp`, which says
    which global heads the layer's local heads are (the blockwise kernel's masks follow them) and
    whose CUDA stream fused SDPA draws from."""

    def __init__(self, dropout: float, tp: TPContext):
        self.dropout, self.tp = dropout, tp
        # Kernels that draw their dropout masks from their own generators, which torch.compile
        # cannot trace; `exclude_dropout_from_graphs` makes them graph breaks.
        self.blockwise, self.sdpa_dropout = dropout_attention, sdpa_on_rank_stream

    def exclude_dropout_from_graphs(self) -> None:
        """For torch.compile'd layers. Not at import: the decorator imports torch._dynamo, 2 s of
        every start-up."""
        self.blockwise = torch.compiler.disable(dropout_attention)
        self.sdpa_dropout = torch.compiler.disable(sdpa_on_rank_stream)

    def __call__(self, qkv: torch.Tensor, layout: torch.Tensor | Packing | None, rows: torch.Tensor | None = None,
                 *, training: bool) -> torch.Tensor:
        """Context (b, s|m, n, d) from `qkv` (b, s, 3, n, d), queries at `rows` (b, m) only when
        given. `layout` is the padding mask (b, 1, 1, s) bool (True = attend) or None; or a
        `Packing`, with `qkv` (1, T, 3, n, d) the packed tokens and `rows` (1, M) packed read
        positions."""
        p = self.dropout if training else 0.0
        packed = isinstance(layout, Packing)
        if (qkv.device.type == "cpu" and (p > 0 or packed)) or (p > 0 and self.tp.invariant_dropout):
            n = qkv.shape[3]
            return self.blockwise(qkv, layout, p, rows, heads_total=n * self.tp.size, head_offset=n * self.tp.rank)
        if packed:
            return self.packed_sdpa(qkv, layout, rows, p)
        return self.padded_sdpa(qkv, layout, rows, p)

    def _sdpa(self, q, k, v, mask, p: float) -> torch.Tensor:
        if p > 0:
            return self.sdpa_dropout(q, k, v, mask, p, self.tp.group)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def padded_sdpa(self, qkv: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None,
                    p: float) -> torch.Tensor:
        b, _, _, n, d = qkv.shape
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, n, s, d)
        if rows is not None:  # keys and values stay over all s positions
            q = q.gather(2, rows[:, None, :, None].expand(b, n, rows.shape[1], d))
        return self._sdpa(q, k, v, mask, p).transpose(1, 2)

    def packed_sdpa(self, qkv: torch.Tensor, packing: Packing, rows: torch.Tensor | None, p: float) -> torch.Tensor:
        """SDPA on NJTs (b, n, j, d) viewing the packed tokens; returns (1, T|M, n, d)."""
        # Each (T, n, d) contiguous: torch's math backend (CPU, or CUDA where no fused kernel
        # fits) takes only contiguous NJTs; the fused kernels save the same bytes either way.
        q, k, v = qkv[0].transpose(0, 1).contiguous().unbind(0)
        lengths = packing.lengths
        k, v = (_jagged(t, packing.offsets, lengths) for t in (k, v))
        if rows is None:
            q = _jagged(q, packing.offsets, lengths)
        else:  # the read tokens' queries, against all of their sample's keys
            q = _jagged(q.index_select(0, rows[0]), packing.read_offsets, packing.read_counts)
        return self._sdpa(q, k, v, None, p).transpose(1, 2).values()[None]


def _jagged(values: torch.Tensor, offsets: torch.Tensor, lengths: tuple[int, ...]) -> torch.Tensor:
    """(T, n, d) tokens, sample i in [offsets[i], offsets[i + 1]) -> NJT (b, n, j, d)."""
    nested = torch.nested.nested_tensor_from_jagged(values, offsets, min_seqlen=min(lengths),
                                                    max_seqlen=max(lengths))
    return nested.transpose(1, 2)
