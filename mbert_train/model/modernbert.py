"""ModernBERT (Warner et al. 2024): numerically `transformers.ModernBertForMaskedLM`, built from
the same column-, row- and vocab-parallel layers as MegatronBERT (bert.py).

What differs from bert.py: no position table, rotary embeddings on queries and keys (one RoPE base
for global layers, another for local ones); layer i attends globally where i %
`global_attn_every_n_layers` == 0 and otherwise within +-`local_attention`/2 tokens (the window is
a mask on the local heads); a GeGLU MLP; LayerNorms without bias, one after the embedding and none
before the first layer's attention; no biases but the decoder's; the MLM head only.

With no tensor-parallel group (or a group of one) every layer is the plain dense layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mbert_train.arithmetic import padded_vocab_size
from mbert_train.batch import Packing
from mbert_train.model.bert import MAX_COMPILED_SHAPES, MegatronBert, PretrainOutput, model_context
from mbert_train.model.config import ModelConfig
from mbert_train.model.rotary import apply_rope, rope_tables
from mbert_train.model.window import sliding_window_attention
from mbert_train.parallel.context import LayerNorm, TPContext
from mbert_train.parallel.cross_entropy import (
    vocab_parallel_argmax,
    vocab_parallel_cross_entropy,
)
from mbert_train.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    mark_sharded,
)
from mbert_train.parallel.mappings import gather_seq_replicated
from mbert_train.parallel.random import (
    apply_keep,
    keep_bytes_from_seeds,
    replicated_seed,
    sharded_cuda_rng,
)

INIT_CUTOFF = 2.0
"""`ModernBertConfig.initializer_cutoff_factor`: weights are normal, truncated at 2 std."""


def trunc_init(std: float):
    return lambda w: nn.init.trunc_normal_(w, 0.0, std, -INIT_CUTOFF * std, INIT_CUTOFF * std)


def is_global(cfg: ModelConfig, layer: int) -> bool:
    return layer % cfg.global_attn_every_n_layers == 0


@dataclass(frozen=True)
class AttentionInputs:
    """What every layer's attention reads, built once per batch."""

    masks: dict[str, torch.Tensor | None]
    """Per layer kind ("global", "local") on the padded layout, True = attend: global (b, 1, 1, s)
    or None (no padding); local (b|1, 1, s, s)."""
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]
    """Per layer kind, cos and sin (1, s|T, d) of the positions of the tokens the layers hold."""
    packing: Packing | None = None
    """Set when the layers hold the packed real tokens (1, T, h)."""


def attention_inputs(cfg: ModelConfig, s: int, padding: torch.Tensor | None, positions: torch.Tensor,
                     packing: Packing | None) -> AttentionInputs:
    """The masks for a batch of length `s` (`padding`: its (b, s) attention mask, None when it has
    no padding) and the RoPE tables of `positions` (1, s|T). Device ops only."""
    device = positions.device
    real = None if padding is None else padding.bool()
    pos = torch.arange(s, device=device)
    window = (pos[:, None] - pos[None, :]).abs() <= cfg.local_attention // 2  # (s, s)
    if real is None:
        masks = {"global": None, "local": window[None, None]}
    else:
        # A padding query's window may hold padding only: it also sees itself, so that no row of
        # the softmax is empty (nobody reads its output; real queries never see a padding key).
        local = (window & real[:, None, None, :]) | torch.eye(s, dtype=torch.bool, device=device)
        masks = {"global": real[:, None, None, :], "local": local}
    rope = {"global": rope_tables(positions, cfg.head_dim, cfg.global_rope_theta),
            "local": rope_tables(positions, cfg.head_dim, cfg.local_rope_theta)}
    return AttentionInputs(masks, rope, packing)


def dropped_attention(q, k, v, mask: torch.Tensor | None, p: float, heads_total: int, head_offset: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) with dropout p, times v; q (b, n, sq, d), k and v (b, n, sk, d).
    Each (sample, global head) draws its mask from a generator seeded with one replicated draw +
    sample * heads_total + global head, as attention.py's blockwise path does: the masks do not
    depend on the TP degree, and recomputation under activation checkpointing redraws them. It keeps
    the (b, n, sq, sk) probabilities: the published models train without attention dropout."""
    b, n, sq, d = q.shape
    scores = torch.matmul(q, k.transpose(-1, -2)) * d ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
    base = replicated_seed()
    seeds = [base + i * heads_total + head_offset + h for i in range(b) for h in range(n)]
    keep = keep_bytes_from_seeds(seeds, (b * n, sq, k.shape[2]), p, q.device).view(b, n, sq, -1)
    return torch.matmul(apply_keep(probs, keep, p), v)


def fused_dropout_attention(q, k, v, mask: torch.Tensor | None, p: float, group) -> torch.Tensor:
    """SDPA with dropout on this TP rank's stream (CUDA: flash / memory-efficient kernels)."""
    with sharded_cuda_rng(q.device, group):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)


class Attention(nn.Module):
    """Fused QKV split by whole heads (stride 3, as bert.SelfAttention), RoPE on this rank's heads,
    global or sliding-window attention, then the row-parallel output projection. No biases."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, *, global_attention: bool):
        super().__init__()
        self.tp, self.kind = tp, "global" if global_attention else "local"
        self.local_heads = cfg.num_heads // tp.size
        self.heads_total, self.head_offset = cfg.num_heads, self.local_heads * tp.rank
        self.head_dim, self.dropout = cfg.head_dim, cfg.attention_dropout
        self.half_window = cfg.local_attention // 2
        std, h = cfg.initializer_range, cfg.hidden_size
        # The master weight is [Q; K; V] stacked (3h, h), as transformers' Wqkv.
        self.qkv = ColumnParallelLinear(h, 3 * h, tp, bias=False, stride=3, init=trunc_init(std))
        self.out = RowParallelLinear(h, h, tp, bias=False, init=trunc_init(std / math.sqrt(2 * cfg.num_layers)))
        # The dropout paths manage RNG streams that torch.compile cannot trace; `compile_layers`
        # wraps them in torch.compiler.disable (as bert.SelfAttention's).
        self._dropped_attention, self._fused_dropout_attention = dropped_attention, fused_dropout_attention

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(b, s, h) -> (b, s, h); with `rows` (b, m) only those queries: (b, m, h). Under sequence
        parallelism x and the output are this rank's chunk (b, s/tp, h). Packed (`inputs.packing`),
        x is the real tokens (1, T, h) and `rows` (1, M) packed positions."""
        qkv = self.qkv(x)  # (b, s, 3h/tp): the whole sequence, gathered under SP
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, 3, self.local_heads, self.head_dim)  # (b, s, 3, n/tp, d)
        cos, sin = inputs.rope[self.kind]
        q, k, v = qkv.unbind(2)  # one gradient buffer in backward (indexing would zero-fill three)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, packing = inputs.masks[self.kind], inputs.packing
        if packing is not None:
            # SDPA has no variable-length form: the padded layout, whose masks keep samples apart
            # (and windows inside them); then the real tokens' (or the read positions') rows.
            q, k, v = (unpack(t[0], packing) for t in (q, k, v))  # (b, s, n/tp, d)
        elif rows is not None:  # keys and values stay over all s positions
            q = q.gather(1, rows[:, :, None, None].expand(-1, -1, *q.shape[2:]))  # (b, m, n/tp, d)
            if mask is not None and mask.shape[2] > 1:
                mask = mask.expand(b, -1, -1, -1).gather(2, rows[:, None, :, None].expand(-1, 1, -1, mask.shape[3]))
        # v on its own: as a view it would keep the whole QKV output alive for backward.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2).contiguous()
        if self.kind == "local" and (packing is not None or rows is None) and not (self.training and self.dropout):
            # Every query, no dropout (the published models' setting): the band alone. Its
            # forward runs again in backward: a quarter of the score matrix at 1024 tokens,
            # against keeping the windows' copies of the keys and values.
            real = inputs.masks["global"]  # (b, 1, 1, s) or None
            real = None if real is None else real[:, 0, 0]
            if torch.is_grad_enabled():
                ctx = checkpoint(sliding_window_attention, q, k, v, self.half_window, real, use_reentrant=False)
            else:
                ctx = sliding_window_attention(q, k, v, self.half_window, real)
        else:
            ctx = self._attend(q, k, v, mask)
        ctx = ctx.transpose(1, 2)
        if packing is not None:
            keep = packing.index if rows is None else packing.index[rows[0]]
            ctx = ctx.flatten(0, 1).index_select(0, keep)[None]  # (1, T|M, n/tp, d)
        return self.out(ctx.reshape(*ctx.shape[:2], self.local_heads * self.head_dim))

    def _attend(self, q, k, v, mask: torch.Tensor | None) -> torch.Tensor:
        """(b, n/tp, sq, d) context of this rank's heads."""
        p = self.dropout if self.training else 0.0
        if p == 0:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if q.is_cuda and not self.tp.invariant_dropout:  # fused, on this TP rank's stream
            return self._fused_dropout_attention(q, k, v, mask, p, self.tp.group)
        return self._dropped_attention(q, k, v, mask, p, self.heads_total, self.head_offset)


def unpack(x: torch.Tensor, packing: Packing) -> torch.Tensor:
    """(T, ...) packed tokens -> (b, s, ...) padded, zeros at padding."""
    out = x.new_zeros(packing.batch * packing.seq, *x.shape[1:])
    return out.index_copy_(0, packing.index, x).view(packing.batch, packing.seq, *x.shape[1:])


class GeGLU(nn.Module):
    """out(drop(gelu(x W_in) * x W_gate)), transformers' ModernBertMLP. Its input projection's
    master weight is [W_in; W_gate] (2I, h) and stride 2 splits each half alike: rank r holds
    the matching slices r of both, so it pairs them without communication."""

    def __init__(self, cfg: ModelConfig, tp: TPContext):
        super().__init__()
        self.tp, self.dropout = tp, cfg.hidden_dropout
        std, h, inter = cfg.initializer_range, cfg.hidden_size, cfg.intermediate_size
        self.fc1 = ColumnParallelLinear(h, 2 * inter, tp, bias=False, stride=2, init=trunc_init(std))
        self.fc2 = RowParallelLinear(inter, h, tp, bias=False, init=trunc_init(std / math.sqrt(2 * cfg.num_layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (b, s, 2I/tp): [act, gate]
        if self.training and self.dropout:
            act, gate = h.chunk(2, dim=-1)
            return self.fc2(self.tp.sharded_dropout(F.gelu(act) * gate, self.dropout, self.training))
        return self.fc2.reduce(GatedDown.apply(h, self.fc2.weight))


class GatedDown(torch.autograd.Function):
    """(gelu(act) * gate) W^T of h = [act, gate] (..., 2I): GeGLU's product and this rank's part of
    the down projection, with the gradients autograd computes for them, op for op, but keeping
    only h (and W) for backward and computing the product again there. Autograd would also keep
    gelu(act) and the product, two (..., I) tensors per layer, a sixth of a layer's activations."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # Backward runs under the forward's autocast state, as autograd runs an autocast op's
        # backward in the dtypes of its forward (torch.amp.custom_bwd, for any device type).
        device = h.device.type
        ctx.autocast = device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device)
        act, gate = h.chunk(2, dim=-1)
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(act) * gate, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, weight = ctx.saved_tensors
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype, enabled=enabled):
            act, gate = h.chunk(2, dim=-1)
            gelu = F.gelu(act)
            product = gelu * gate
            grad_weight = grad.reshape(-1, grad.shape[-1]).T @ product.reshape(-1, product.shape[-1])
            grad_product = (grad @ weight).to(h.dtype)
            grad_h = torch.cat((torch.ops.aten.gelu_backward(grad_product * gate, act), grad_product * gelu), dim=-1)
        return grad_h.to(h.dtype), grad_weight.to(weight.dtype)


class Layer(nn.Module):
    """Pre-LN: x + Drop(Attn(LN(x))), then x + MLP(LN(x)) (transformers' ModernBertEncoderLayer:
    the attention dropout also drops the output projection's; the MLP's is inside it). Layer 0
    reads the embedding's LayerNorm directly. Under sequence parallelism the LayerNorms, dropout and
    residuals run on this rank's chunk of the sequence."""

    def __init__(self, cfg: ModelConfig, tp: TPContext, index: int):
        super().__init__()
        self.tp, self.dropout = tp, cfg.attention_dropout
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attn_norm = LayerNorm(h, eps, tp, bias=False) if index > 0 else nn.Identity()
        self.attn = Attention(cfg, tp, global_attention=is_global(cfg, index))
        self.mlp_norm = LayerNorm(h, eps, tp, bias=False)
        self.mlp = GeGLU(cfg, tp)

    def forward(self, x: torch.Tensor, inputs: AttentionInputs, rows: torch.Tensor | None = None) -> torch.Tensor:
        attn = self.attn(self.attn_norm(x), inputs, rows)
        if rows is not None:
            x = x.gather(1, rows[..., None].expand(*rows.shape, x.shape[-1]))  # (b, m, h)
        x = x + self.tp.hidden_dropout(attn, self.dropout, self.training)
        return x + self.mlp(self.mlp_norm(x))


class ModernBert(nn.Module):
    """Encoder + MLM head (decoder tied to the word embeddings, with a bias). The interface of
    `MegatronBert`: `tp` a `TPContext` (or a bare group, or None); `mlm_masked_only` runs the head,
    and the last layer, on [CLS] and the masked positions only (the loss is the same); `unpad` runs
    batches with padding packed. Under sequence parallelism every layer but the last runs on this
    rank's chunk of the sequence; the chunks are gathered before the last."""

    def __init__(self, cfg: ModelConfig, tp=None, *, activation_checkpointing: bool = False,
                 mlm_masked_only: bool = True, unpad: bool = True):
        super().__init__()
        if cfg.arch != "modernbert":
            raise ValueError(f"ModernBert needs model.arch=modernbert, not {cfg.arch!r}")
        tp = model_context(cfg, tp)
        self.cfg, self.tp, self.group = cfg, tp, tp.group
        self.activation_checkpointing, self.mlm_masked_only, self.unpad = activation_checkpointing, mlm_masked_only, unpad
        self.padded_vocab = padded_vocab_size(cfg.vocab_size, tp.size)
        h, eps, std, n = cfg.hidden_size, cfg.layer_norm_eps, cfg.initializer_range, cfg.num_layers
        self.word_embeddings = VocabParallelEmbedding(self.padded_vocab, h, tp, real_vocab=cfg.vocab_size,
                                                      padding_idx=cfg.pad_token_id, init=trunc_init(std))
        self.embedding_norm = LayerNorm(h, eps, tp, bias=False)
        self.layers = nn.ModuleList(Layer(cfg, tp if i < n - 1 else tp.without_sp(), i) for i in range(n))
        self.final_norm = nn.LayerNorm(h, eps=eps, bias=False)
        self.mlm_dense = nn.Linear(h, h, bias=False)
        trunc_init(std / math.sqrt(2 * n))(self.mlm_dense.weight)
        self.mlm_norm = nn.LayerNorm(h, eps=eps, bias=False)
        self.mlm_bias = mark_sharded(nn.Parameter(torch.zeros(self.padded_vocab // tp.size)), 0)
        self._compiled_layers: list | None = None

    def compile_layers(self) -> None:
        """torch.compile each layer for training, as `MegatronBert.compile_layers` does (inductor,
        static shapes, one graph per padded length shared by the layers of a kind); evaluation,
        packed batches and the last layer on the read positions stay eager."""
        import torch._dynamo.config

        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, MAX_COMPILED_SHAPES)
        for layer in self.layers:
            layer.attn._dropped_attention = torch.compiler.disable(dropped_attention)
            layer.attn._fused_dropout_attention = torch.compiler.disable(fused_dropout_attention)
        self._compiled_layers = [torch.compile(layer, dynamic=False) for layer in self.layers]

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               packing: Packing | None = None, *, reads_only: bool = False) -> torch.Tensor:
        """Final hidden states (b, s, h); with `reads_only`, those of the batch's read tokens alone
        (M, h), in `packing.read_rows`' order, the last layer then running its queries, MLP and
        LayerNorms there alone (as in bert.py). When the batch runs packed (`packs`) the layers run
        on its real tokens (1, T, h) and RoPE positions restart with every sample. The layout comes
        from `packing`'s host-side ints: nothing is read back from the device."""
        b, s = input_ids.shape
        tp = self.tp
        packed = reads_only and self.packs(packing)
        rows, slots = None, None
        if packed:
            rows = packing.read_rows[None]  # (1, M) packed read positions
            input_ids = input_ids.reshape(-1)[packing.index][None]
            positions = (packing.index % s)[None]  # (1, T): a sample's tokens sit at [0, length) of its row
        else:
            positions = torch.arange(s, device=input_ids.device)[None]
            if reads_only:
                rows, slots = packing.padded_read_positions()  # (b, m), (M,)
            if tp.sp and s % tp.size:
                raise ValueError(f"sequence length {s} is not divisible by TP={tp.size}, which sequence "
                                 f"parallelism needs; pad batches to a multiple of it (data.pad_to_multiple_of)")
        padding = attention_mask if attention_mask is not None and (packing is None or packing.padded) else None
        x = self.word_embeddings(input_ids)  # (b, s, h); (b, s/tp, h) under SP; (1, T, h) packed
        x = tp.hidden_dropout(self.embedding_norm(x), self.cfg.hidden_dropout, self.training)
        inputs = attention_inputs(self.cfg, s, padding, positions, packing if packed else None)
        compiled = self._compiled_layers if self.training and not packed else None
        for i, layer in enumerate(self.layers):
            last = i == len(self.layers) - 1
            if tp.sp and last:
                x = gather_seq_replicated(x, tp.group)  # (b, s, h) on every rank
            if compiled is not None and not (last and rows is not None):
                layer = compiled[i]
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, inputs, rows if last else None, use_reentrant=False)
            else:
                x = layer(x, inputs, rows if last else None)
        if reads_only:
            x = x[0] if packed else x.flatten(0, 1)[slots]  # (M, h)
        return self.final_norm(x)

    # Which batches run packed, and the tied MLM head: MegatronBert's, on attributes of the
    # same names (`unpad`, `tp`, `_compiled_layers`; `mlm_dense`, `mlm_norm`, `word_embeddings`,
    # `mlm_bias`, `group`).
    packs = MegatronBert.packs
    mlm_head = MegatronBert.mlm_head

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, mlm_labels: torch.Tensor | None = None,
                nsp_labels: torch.Tensor | None = None, packing: Packing | None = None) -> PretrainOutput:
        """The batch of `mbert_train.batch`, as `MegatronBert.forward` reads it; `token_type_ids`
        are ignored (ModernBERT has none); there is no NSP head."""
        if nsp_labels is not None:
            raise ValueError("model.arch=modernbert has no NSP/SOP head; use data.objective=none")
        out = PretrainOutput()
        if mlm_labels is None:
            out.mlm_logits = self.mlm_head(self.encode(input_ids, attention_mask))  # (b, s, V_pad/tp)
            return out
        if packing is None:  # a batch not built by the collator: one read-back, here
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            packing = Packing.from_masks(mask, mlm_labels).to(input_ids.device)
        predicted = packing.predicted_positions()  # (K,) flat, in the order of the labels
        targets = mlm_labels.reshape(-1)[predicted]
        if self.mlm_masked_only:
            reads = self.encode(input_ids, attention_mask, packing, reads_only=True)  # (M, h)
            out.mlm_logits = logits = self.mlm_head(reads[packing.predicted])  # (K, V_pad/tp)
        else:
            out.mlm_logits = self.mlm_head(self.encode(input_ids, attention_mask, packing))  # (b, s, V_pad/tp)
            logits = out.mlm_logits.flatten(0, 1)[predicted]
        count = targets.numel()
        per_token = vocab_parallel_cross_entropy(logits, targets, self.cfg.vocab_size, self.group)
        out.loss = out.mlm_loss = per_token.sum() / max(count, 1)
        with torch.no_grad():
            pred = vocab_parallel_argmax(logits.detach(), self.cfg.vocab_size, self.group)
            out.mlm_correct = (pred == targets).sum()
            out.mlm_count = torch.full((), count, dtype=torch.long, device=targets.device)
        return out
