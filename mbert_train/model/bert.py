"""MegatronBERT (Shoeybi et al. 2019): pre-LayerNorm BERT, numerically the same as
`transformers.MegatronBertForPreTraining`, with attention and MLP sharded over a TP group.

With no tensor-parallel group (or a group of one) every layer is the plain dense layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mbert_train.arithmetic import padded_vocab_size
from mbert_train.batch import IGNORE_INDEX
from mbert_train.model.attention import Packing, dropout_attention
from mbert_train.model.config import ModelConfig
from mbert_train.parallel.cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy
from mbert_train.parallel.context import LayerNorm, TPContext
from mbert_train.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                         mark_sharded, normal_init)
from mbert_train.parallel.mappings import copy_to_tp, gather_from_tp, gather_seq_replicated, split_seq
from mbert_train.parallel.random import sharded_cuda_rng

# The shape-specialised graphs `MegatronBert.compile_layers` may keep per layer: one per padded
# batch length at data.pad_to_multiple_of 8 and seq 512, with room to spare.
MAX_COMPILED_SHAPES = 80


def _dense(n_in: int, n_out: int, std: float) -> nn.Linear:
    """A replicated linear layer with the reference's init (normal weight, zero bias)."""
    layer = nn.Linear(n_in, n_out)
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class SelfAttention(nn.Module):
    """Fused QKV split by whole heads: rank r owns heads [r*n/tp, (r+1)*n/tp) of Q, K and V."""

    def __init__(self, cfg: ModelConfig, tp: TPContext):
        super().__init__()
        group = tp.group
        self.group = group
        self.local_heads = cfg.num_heads // tp.size
        self.tp_size, self.tp_rank = tp.size, tp.rank
        self.head_dim = cfg.head_dim
        self.dropout = cfg.attention_dropout
        self.tp_invariant_dropout = cfg.tp_invariant_dropout
        init = normal_init(cfg.initializer_range)
        # The master weight is [Q; K; V] stacked (3h, h); stride 3 shards each block by heads.
        self.qkv = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, tp, stride=3, init=init)
        self.out = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, tp, init=init)
        # The attention-with-dropout paths manage RNG streams that torch.compile cannot trace;
        # `MegatronBert.compile_layers` wraps them in torch.compiler.disable (a graph break). Not
        # at import: the decorator imports torch._dynamo, 2 s of every start-up.
        self._dropout_attention, self._fused_attention = dropout_attention, _fused_attention_on_rank_stream

    def forward(self, x: torch.Tensor, mask: torch.Tensor | Packing | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(b, s, h) -> (b, s, h); with `rows` (b, m) only those query positions: (b, m, h).
        Under sequence parallelism x and the output are this rank's chunk (b, s/tp, h). With a
        `Packing` as the mask, x is the packed real tokens (1, T, h) and `rows` (1, M)."""
        qkv = self.qkv(x)  # (b, s, 3h/tp): the whole sequence, gathered under SP
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, 3, self.local_heads, self.head_dim)  # (b, s, 3, n/tp, d)
        if self.training and self.dropout > 0 and not (qkv.is_cuda and not self.tp_invariant_dropout):
            # CPU (and the TP-invariant mode): blockwise, no (s x s) tensor kept; see attention.py.
            ctx = self._dropout_attention(qkv, mask, self.dropout, rows, heads_total=self.local_heads * self.tp_size,
                                          head_offset=self.local_heads * self.tp_rank)  # (b, s|m, n/tp, d)
        elif isinstance(mask, Packing):
            # SDPA has no variable-length form: it runs on the padded layout, and the real
            # tokens' (or the read positions') rows of its output are kept.
            ctx = self._sdpa(mask.unpack(qkv[0]), mask.attention_mask, None).flatten(0, 1)
            ctx = ctx.index_select(0, mask.index if rows is None else mask.index[rows[0]])[None]
        else:
            ctx = self._sdpa(qkv, mask, rows)
        return self.out(ctx.reshape(b, ctx.shape[1], self.local_heads * self.head_dim))

    def _sdpa(self, qkv: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor:
        """(b, s, 3, n, d) -> context (b, s|m, n, d) by torch's SDPA."""
        b = qkv.shape[0]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, n/tp, s, d)
        if rows is not None:  # keys and values stay over all s positions
            q = q.gather(2, rows[:, None, :, None].expand(b, self.local_heads, rows.shape[1], self.head_dim))
        if self.training and self.dropout > 0:  # CUDA: fused SDPA with dropout on this rank's stream
            ctx = self._fused_attention(q, k, v, mask, self.dropout, self.group)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return ctx.transpose(1, 2)


def _fused_attention_on_rank_stream(q, k, v, mask, p: float, group) -> torch.Tensor:
    """SDPA with dropout on this TP rank's stream: flash / memory-efficient kernels on CUDA."""
    with sharded_cuda_rng(q.device, group):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPContext):
        super().__init__()
        init = normal_init(cfg.initializer_range)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, tp, init=init)
        self.fc2 = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, tp, init=init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # (b, s, I/tp) inside


class Layer(nn.Module):
    """Pre-LN: x + Drop(Attn(LN(x))), then x + Drop(MLP(LN(x))). Under sequence parallelism the
    LayerNorms, dropouts and residuals run on this rank's chunk of the sequence."""

    def __init__(self, cfg: ModelConfig, tp: TPContext):
        super().__init__()
        self.tp = tp
        self.attn_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, tp)
        self.attn = SelfAttention(cfg, tp)
        self.mlp_norm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, tp)
        self.mlp = MLP(cfg, tp)
        self.dropout = cfg.hidden_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(b, s, h) -> (b, s, h); with `rows` (b, m), the output at those positions only (b, m, h)."""
        attn = self.attn(self.attn_norm(x), mask, rows)
        if rows is not None:
            x = x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1]))  # (b, m, h)
        x = x + self.tp.hidden_dropout(attn, self.dropout, self.training)
        return x + self.tp.hidden_dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)


def read_mask(mlm_labels: torch.Tensor) -> torch.Tensor:
    """(b, s) bool: the positions the heads read, 0 ([CLS], for the pooler) and every masked one."""
    read = mlm_labels != IGNORE_INDEX
    read[:, 0] = True
    return read


def read_positions(mlm_labels: torch.Tensor) -> torch.Tensor:
    """(b, m) positions the heads read, ascending per row: 0 ([CLS], for the pooler) and every
    masked position; rows with fewer are padded with unread positions (their labels are ignored)."""
    read = read_mask(mlm_labels)
    m = int(read.sum(1).max())
    # A stable sort of "not read" puts each row's read positions first, in ascending order.
    return torch.argsort((~read).to(torch.int8), dim=1, stable=True)[:, :m]


@dataclass
class PretrainOutput:
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    nsp_loss: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    """Vocab shard (..., V_pad/tp); over all positions, or over the masked ones only."""
    nsp_logits: torch.Tensor | None = None
    mlm_correct: torch.Tensor | None = None
    mlm_count: torch.Tensor | None = None
    nsp_correct: torch.Tensor | None = None


class MegatronBert(nn.Module):
    """Encoder + pooler + MLM/NSP heads; `cfg.binary_head=False` gives the MLM-only model.

    `tp` is the tensor-parallel context (`TPContext`; a bare process group or None also works:
    no sequence parallelism). Under sequence parallelism every layer but the last runs on this
    rank's chunk of the sequence; the last layer and the heads read positions anywhere in the
    sequence, so the chunks are gathered before it and they run replicated, as without SP."""

    def __init__(self, cfg: ModelConfig, tp=None, *, activation_checkpointing: bool = False,
                 mlm_masked_only: bool = True, unpad: bool = True):
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is unset; it is taken from the dataset's tokenizer "
                             "(mbert_train.data.resolve_vocab) before the model is built")
        if not isinstance(tp, TPContext):
            tp = TPContext(tp, invariant_dropout=cfg.tp_invariant_dropout)
        self.cfg, self.tp, self.group = cfg, tp, tp.group
        self.activation_checkpointing = activation_checkpointing
        self.mlm_masked_only = mlm_masked_only
        self.unpad = unpad
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, tp.size)
        std, h = cfg.initializer_range, cfg.hidden_size
        init = normal_init(std)
        self.word_embeddings = VocabParallelEmbedding(self.padded_vocab, h, tp, real_vocab=cfg.vocab_size,
                                                      padding_idx=cfg.pad_token_id, init=init)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        nn.init.normal_(self.position_embeddings.weight, std=std)
        nn.init.normal_(self.token_type_embeddings.weight, std=std)
        if tp.sp:
            self.position_embeddings.weight.sequence_parallel = True
            self.token_type_embeddings.weight.sequence_parallel = True
        n = cfg.num_layers
        self.layers = nn.ModuleList(Layer(cfg, tp if i < n - 1 else tp.without_sp()) for i in range(n))
        self.final_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.pooler = _dense(h, h, std) if cfg.binary_head else None
        self.mlm_dense = _dense(h, h, std)
        self.mlm_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.mlm_bias = mark_sharded(nn.Parameter(torch.zeros(self.padded_vocab // tp.size)), 0)
        self.nsp = _dense(h, 2, std) if cfg.binary_head else None
        self._compiled_layers: list | None = None

    def compile_layers(self) -> None:
        """torch.compile each transformer layer for training (inductor, static shapes).

        Per layer, not the whole model: the graphs hold a layer's TP collectives (our autograd
        mappings trace as functional collectives), activation checkpointing wraps a compiled
        layer like an eager one, and the parameters keep their names (checkpoints, DeepSpeed and
        exports see the same module). The layers share their graphs; each new padded batch
        length compiles once (up to MAX_COMPILED_SHAPES). Static shapes keep the numerics a
        function of the batch alone, so a resumed run stays bit-identical. Evaluation, and the
        last layer when it runs on the read positions only (a length that changes with every
        batch), stay eager."""
        import torch._dynamo.config

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_COMPILED_SHAPES)
        for layer in self.layers:
            layer.attn._dropout_attention = torch.compiler.disable(dropout_attention)
            layer.attn._fused_attention = torch.compiler.disable(_fused_attention_on_rank_stream)
        self._compiled_layers = [torch.compile(layer, dynamic=False) for layer in self.layers]

    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, rows: torch.Tensor | None = None,
               packing: Packing | None = None) -> torch.Tensor:
        """Final hidden states (b, s, h); with `rows` (b, m), only at those positions (b, m, h).

        Only the heads read the last layer's output, so with `rows` the last layer runs its
        attention queries, output projection, MLP and LayerNorms on those positions alone (keys
        and values still cover the whole sequence), as MosaicBERT does: the same values there.
        With a `packing` (no sequence parallelism) the layers run on the real tokens only,
        (1, T, h), `rows` (1, M) are packed positions, and the result is (1, T|M, h)."""
        b, s = input_ids.shape
        tp = self.tp
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(s, device=input_ids.device)
        if packing is not None:
            if tp.sp:
                raise ValueError("packed batches do not combine with sequence parallelism")
            input_ids, token_type_ids = (t.reshape(-1)[packing.index][None] for t in (input_ids, token_type_ids))
            positions = (packing.index % s)[None]
        elif tp.sp:
            if s % tp.size:
                raise ValueError(f"sequence length {s} is not divisible by TP={tp.size}, which sequence "
                                 f"parallelism needs; pad batches to a multiple of it (data.pad_to_multiple_of)")
            token_type_ids, positions = split_seq(token_type_ids, tp.group), split_seq(positions[None], tp.group)[0]
        # Under SP each rank embeds its chunk of the sequence; the replicated tables then get
        # that chunk's gradient only, summed over the group by `replicated_param`.
        x = (self.word_embeddings(input_ids)
             + F.embedding(token_type_ids, tp.replicated_param(self.token_type_embeddings.weight))
             + F.embedding(positions, tp.replicated_param(self.position_embeddings.weight)))
        x = tp.hidden_dropout(x, self.cfg.hidden_dropout, self.training)
        mask = packing
        if packing is None and attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool().view(b, 1, 1, s)  # True = attend
        compiled = self._compiled_layers if self.training else None
        for i, layer in enumerate(self.layers):
            last_rows = rows if i == len(self.layers) - 1 else None
            if tp.sp and i == len(self.layers) - 1:
                x = gather_seq_replicated(x, tp.group)  # (b, s, h) on every rank
            if compiled is not None and last_rows is None:
                layer = compiled[i]
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, mask, last_rows, use_reentrant=False)
            else:
                x = layer(x, mask, last_rows)
        return self.final_norm(x)

    def _packs(self, attention_mask: torch.Tensor | None) -> bool:
        """Whether this batch runs packed: it has padding, and none of these is in the way:
        sequence parallelism, compiled layers (static shapes: a packed length would compile for
        nearly every batch), TP-invariant dropout (its masks are those of the padded tensors,
        so they stay the same with SP on or off)."""
        tp = self.tp
        return (self.unpad and attention_mask is not None and not tp.sp and not tp.invariant_dropout
                and not (self.training and self._compiled_layers is not None) and not bool(attention_mask.all()))

    def mlm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-shard logits (..., V_pad/tp); the decoder is tied to the word embeddings."""
        hidden = self.mlm_norm(F.gelu(self.mlm_dense(hidden)))
        return F.linear(copy_to_tp(hidden, self.group), self.word_embeddings.weight, self.mlm_bias)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Full-vocab logits (..., V) from shards; for tests and export, not the training path."""
        return gather_from_tp(logits, self.group)[..., : self.cfg.vocab_size]

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                nsp_labels: torch.Tensor | None = None) -> PretrainOutput:
        out = PretrainOutput()
        if mlm_labels is not None and self.mlm_masked_only:
            if self._packs(attention_mask):  # the layers run on the real tokens only
                read = read_mask(mlm_labels)
                packing, rows = Packing.from_masks(attention_mask, read)  # rows (1, M): packed read positions
                hidden = self.encode(input_ids, token_type_ids, attention_mask, rows, packing)[0]  # (M, h)
                labels = mlm_labels[read & attention_mask.bool()]  # (M,) sample after sample
                cls = hidden[list(packing.read_starts[:-1])]  # each sample's first read position is 0
            else:
                rows = read_positions(mlm_labels)  # (b, m): [CLS] first, then the masked positions
                hidden = self.encode(input_ids, token_type_ids, attention_mask, rows)  # (b, m, h)
                labels = mlm_labels.gather(1, rows)
                cls = hidden[:, 0]
            selected = labels != IGNORE_INDEX  # the masked positions, in the full path's order
            out.mlm_logits = self.mlm_head(hidden[selected])  # (n_masked, V_pad/tp)
            targets = labels[selected]
            logits_flat = out.mlm_logits
        else:
            hidden = self.encode(input_ids, token_type_ids, attention_mask)  # (b, s, h)
            cls = hidden[:, 0]
            out.mlm_logits = self.mlm_head(hidden)  # (b, s, V_pad/tp)
            if mlm_labels is not None:
                selected = (mlm_labels != IGNORE_INDEX).view(-1)
                logits_flat = out.mlm_logits.view(-1, out.mlm_logits.shape[-1])[selected]
                targets = mlm_labels.view(-1)[selected]
        if self.nsp is not None:
            out.nsp_logits = self.nsp(torch.tanh(self.pooler(cls)))  # (b, 2)
        if mlm_labels is None:
            return out
        count = targets.numel()
        per_token = vocab_parallel_cross_entropy(logits_flat, targets, self.cfg.vocab_size, self.group)
        out.mlm_loss = per_token.sum() / max(count, 1)
        out.loss = out.mlm_loss
        with torch.no_grad():
            pred = vocab_parallel_argmax(logits_flat.detach(), self.cfg.vocab_size, self.group)
            out.mlm_correct = (pred == targets).sum()
            out.mlm_count = torch.tensor(count, device=hidden.device)
        if nsp_labels is not None and out.nsp_logits is not None:
            out.nsp_loss = F.cross_entropy(out.nsp_logits.float(), nsp_labels)
            out.loss = out.loss + out.nsp_loss
            out.nsp_correct = (out.nsp_logits.argmax(-1) == nsp_labels).sum()
        return out
