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
from mbert_train.batch import Packing
from mbert_train.model.attention import CoreAttention
from mbert_train.model.config import ModelConfig
from mbert_train.parallel.cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy
from mbert_train.parallel.context import LayerNorm, TPContext
from mbert_train.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                         mark_sharded, normal_init)
from mbert_train.parallel.mappings import copy_to_tp, gather_seq_replicated, split_seq

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
        self.local_heads = cfg.num_heads // tp.size
        self.head_dim = cfg.head_dim
        init = normal_init(cfg.initializer_range)
        # The master weight is [Q; K; V] stacked (3h, h); stride 3 shards each block by heads.
        self.qkv = ColumnParallelLinear(cfg.hidden_size, 3 * cfg.hidden_size, tp, stride=3, init=init)
        self.out = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, tp, init=init)
        self.core = CoreAttention(cfg.attention_dropout, tp)

    def forward(self, x: torch.Tensor, layout: torch.Tensor | Packing | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(b, s, h) -> (b, s, h); with `rows` (b, m) only those query positions: (b, m, h).
        Under sequence parallelism x and the output are this rank's chunk (b, s/tp, h). With a
        `Packing` as the layout, x is the packed real tokens (1, T, h) and `rows` (1, M)."""
        qkv = self.qkv(x)  # (b, s, 3h/tp): the whole sequence, gathered under SP
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, 3, self.local_heads, self.head_dim)  # (b, s, 3, n/tp, d)
        ctx = self.core(qkv, layout, rows, training=self.training)  # (b, s|m, n/tp, d)
        return self.out(ctx.reshape(b, ctx.shape[1], self.local_heads * self.head_dim))


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

    def forward(self, x: torch.Tensor, layout: torch.Tensor | Packing | None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        """(b, s, h) -> (b, s, h); with `rows` (b, m), the output at those positions only (b, m, h)."""
        attn = self.attn(self.attn_norm(x), layout, rows)
        if rows is not None:
            x = x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1]))  # (b, m, h)
        x = x + self.tp.hidden_dropout(attn, self.dropout, self.training)
        return x + self.tp.hidden_dropout(self.mlp(self.mlp_norm(x)), self.dropout, self.training)


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


def model_context(cfg: ModelConfig, tp) -> TPContext:
    """The `TPContext` a model of `cfg` runs in (`tp`: a TPContext, a bare group or None), once
    the config's vocabulary is known; for every family."""
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is unset; it is taken from the dataset's tokenizer "
                         "(mbert_train.data.resolve_vocab) before the model is built")
    return tp if isinstance(tp, TPContext) else TPContext(tp, invariant_dropout=cfg.tp_invariant_dropout)


class MegatronBert(nn.Module):
    """Encoder + pooler + MLM/NSP heads; `cfg.binary_head=False` gives the MLM-only model.

    `tp` is the tensor-parallel context (`TPContext`; a bare process group or None also works:
    no sequence parallelism). Under sequence parallelism every layer but the last runs on this
    rank's chunk of the sequence; the last layer and the heads read positions anywhere in the
    sequence, so the chunks are gathered before it and they run replicated, as without SP."""

    def __init__(self, cfg: ModelConfig, tp=None, *, activation_checkpointing: bool = False,
                 mlm_masked_only: bool = True, unpad: bool = True):
        super().__init__()
        tp = model_context(cfg, tp)
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
            layer.attn.core.exclude_dropout_from_graphs()
        self._compiled_layers = [torch.compile(layer, dynamic=False) for layer in self.layers]

    def encode(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, packing: Packing | None = None, *,
               reads_only: bool = False) -> torch.Tensor:
        """Final hidden states (b, s, h); with `reads_only`, those of the batch's read tokens
        alone (M, h), in `packing.read_rows`' order.

        Only the heads read the last layer's output, so with `reads_only` the last layer runs its
        attention queries, output projection, MLP and LayerNorms on the read positions alone (keys
        and values still cover the whole sequence), as MosaicBERT does: the same values there.
        When the batch runs packed (`packs`), every layer runs on its real tokens only, (1, T, h).
        The layout comes from `packing`'s host-side ints: nothing is read back from the device."""
        b, s = input_ids.shape
        tp = self.tp
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        packed = reads_only and self.packs(packing)
        layout, rows, slots = None, None, None
        if packed:
            layout, rows = packing, packing.read_rows[None]  # (1, M) packed read positions
            input_ids, token_type_ids = (t.reshape(-1)[packing.index][None] for t in (input_ids, token_type_ids))
            positions = (packing.index % s)[None]
        else:
            positions = torch.arange(s, device=input_ids.device)
            if attention_mask is not None and (packing is None or packing.padded):
                layout = attention_mask.bool().view(b, 1, 1, s)  # True = attend
            if reads_only:
                rows, slots = packing.padded_read_positions()  # (b, m), (M,)
        if tp.sp:
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
        x = self._layers(x, layout, rows)  # (b, s|m, h) or packed (1, T|M, h)
        if reads_only:
            x = x[0] if packed else x.flatten(0, 1)[slots]  # (M, h)
        return self.final_norm(x)

    def _layers(self, x: torch.Tensor, layout: torch.Tensor | Packing | None, rows: torch.Tensor | None):
        tp = self.tp
        compiled = self._compiled_layers if self.training else None
        for i, layer in enumerate(self.layers):
            last_rows = rows if i == len(self.layers) - 1 else None
            if tp.sp and i == len(self.layers) - 1:
                x = gather_seq_replicated(x, tp.group)  # (b, s, h) on every rank
            if compiled is not None and last_rows is None:
                layer = compiled[i]
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, layout, last_rows, use_reentrant=False)
            else:
                x = layer(x, layout, last_rows)
        return x

    def packs(self, packing: Packing | None) -> bool:
        """Whether a batch runs packed: it has padding, and none of these is in the way:
        sequence parallelism, compiled layers (static shapes: a packed length would compile for
        nearly every batch), TP-invariant dropout (its masks are those of the padded tensors,
        so they stay the same with SP on or off)."""
        tp = self.tp
        return (self.unpad and packing is not None and packing.padded and not tp.sp and not tp.invariant_dropout
                and not (self.training and self._compiled_layers is not None))

    def mlm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocab-shard logits (..., V_pad/tp); the decoder is tied to the word embeddings."""
        hidden = self.mlm_norm(F.gelu(self.mlm_dense(hidden)))
        return F.linear(copy_to_tp(hidden, self.group), self.word_embeddings.weight, self.mlm_bias)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                nsp_labels: torch.Tensor | None = None, packing: Packing | None = None) -> PretrainOutput:
        """The batch of `mbert_train.batch`. With `mlm_labels` but no `packing` (a batch not built
        by the collator), the packing is worked out here, from masks read back from the device."""
        out = PretrainOutput()
        if mlm_labels is None:
            hidden = self.encode(input_ids, token_type_ids, attention_mask)  # (b, s, h)
            out.mlm_logits = self.mlm_head(hidden)  # (b, s, V_pad/tp)
            out.nsp_logits = self._nsp_logits(hidden[:, 0])
            return out
        if packing is None:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            packing = Packing.from_masks(mask, mlm_labels).to(input_ids.device)
        predicted = packing.predicted_positions()  # (K,) flat, in the order of the labels
        targets = mlm_labels.reshape(-1)[predicted]
        if self.mlm_masked_only:
            reads = self.encode(input_ids, token_type_ids, attention_mask, packing, reads_only=True)  # (M, h)
            cls = reads[packing.read_offsets[:-1]]  # each sample's first read token is its [CLS]
            out.mlm_logits = logits = self.mlm_head(reads[packing.predicted])  # (K, V_pad/tp)
        else:
            hidden = self.encode(input_ids, token_type_ids, attention_mask, packing)  # (b, s, h)
            cls = hidden[:, 0]
            out.mlm_logits = self.mlm_head(hidden)  # (b, s, V_pad/tp)
            logits = out.mlm_logits.flatten(0, 1)[predicted]
        out.nsp_logits = self._nsp_logits(cls)
        count = targets.numel()
        per_token = vocab_parallel_cross_entropy(logits, targets, self.cfg.vocab_size, self.group)
        out.mlm_loss = per_token.sum() / max(count, 1)
        out.loss = out.mlm_loss
        with torch.no_grad():
            pred = vocab_parallel_argmax(logits.detach(), self.cfg.vocab_size, self.group)
            out.mlm_correct = (pred == targets).sum()
            out.mlm_count = torch.full((), count, dtype=torch.long, device=targets.device)
        if nsp_labels is not None and out.nsp_logits is not None:
            out.nsp_loss = F.cross_entropy(out.nsp_logits.float(), nsp_labels)
            out.loss = out.loss + out.nsp_loss
            out.nsp_correct = (out.nsp_logits.argmax(-1) == nsp_labels).sum()
        return out

    def _nsp_logits(self, cls: torch.Tensor) -> torch.Tensor | None:
        """(b, 2) from the [CLS] hidden states (b, h); None for the MLM-only model."""
        return None if self.nsp is None else self.nsp(torch.tanh(self.pooler(cls)))
