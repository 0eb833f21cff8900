"""Model arithmetic, in one place: vocabulary padding, parameter counts, training FLOPs per
token as the trainer runs them, and device peak FLOP/s.

The trainer (MFU in metrics.jsonl), the planner (`mbert-plan`) and the benchmarks all call
these; nothing else in the project re-derives them. Imports only the standard library, so the
model, the parallel layers and the data pipeline can use it without import cycles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mbert_train.data.config import DataConfig
    from mbert_train.model.config import ModelConfig

VOCAB_MULTIPLE = 128
"""Megatron's `make_vocab_size_divisible_by`: the padded vocab is a multiple of this x TP."""


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Vocabulary rounded up to a multiple of `multiple * tensor_parallel` (Megatron-LM), so
    every vocab-parallel shard is equal and a multiple of `multiple` rows."""
    step = multiple * tensor_parallel
    return -(-vocab_size // step) * step


# ---- parameters ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ParamBreakdown:
    """Parameter counts held by one tensor-parallel rank (the whole model at TP=1)."""

    word_embeddings: int
    """Vocab-parallel word embedding, padded vocab x h / t (tied with the MLM decoder)."""
    position_embeddings: int
    """Learned position table, max_position_embeddings x h, replicated."""
    token_type_embeddings: int
    """Segment embedding, type_vocab_size x h, replicated."""
    layers: int
    """All transformer layers: two LayerNorms, QKV, attention-out and the two MLP linears."""
    final_layernorm: int
    """LayerNorm after the last layer (pre-LN models need one before the heads)."""
    pooler: int
    """[CLS] pooler dense layer, replicated; zero without the binary head."""
    mlm_head: int
    """MLM transform dense + LayerNorm (replicated) and the vocab-parallel decoder bias."""
    nsp_head: int
    """Next-sentence classifier h -> 2; zero without the binary head."""
    embedding_layernorm: int = 0
    """LayerNorm after the embedding (ModernBERT's), replicated."""

    @property
    def embeddings(self) -> int:
        return (self.word_embeddings + self.position_embeddings + self.token_type_embeddings
                + self.embedding_layernorm)

    @property
    def total(self) -> int:
        return (self.embeddings + self.layers + self.final_layernorm + self.pooler
                + self.mlm_head + self.nsp_head)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embeddings


def count_parameters(model: ModelConfig, *, tensor_parallel: int = 1,
                     vocab_multiple: int = VOCAB_MULTIPLE) -> ParamBreakdown:
    """Parameters on one TP rank; `vocab_multiple=1` with TP=1 gives the unpadded HF model."""
    t, h, i = tensor_parallel, model.hidden_size, model.intermediate_size
    if model.num_heads % t or i % t:
        raise ValueError(f"tensor_parallel={t} must divide model.num_heads={model.num_heads} and "
                         f"model.intermediate_size={i}")
    vocab = padded_vocab_size(model.vocab_size, t, vocab_multiple)
    if model.arch == "modernbert":  # no biases but the decoder's; no position or type table
        return ParamBreakdown(
            word_embeddings=vocab * h // t, position_embeddings=0, token_type_embeddings=0,
            layers=sum(_modernbert_layer_parameters(h, i, t, first=k == 0) for k in range(model.num_layers)),
            final_layernorm=h, pooler=0, mlm_head=h * h + h + vocab // t, nsp_head=0, embedding_layernorm=h)
    return ParamBreakdown(
        word_embeddings=vocab * h // t,
        position_embeddings=model.max_position_embeddings * h,
        token_type_embeddings=model.type_vocab_size * h,
        layers=model.num_layers * _layer_parameters(h, i, t),
        final_layernorm=2 * h,
        pooler=(h * h + h) if model.binary_head else 0,
        mlm_head=h * h + h + 2 * h + vocab // t,
        nsp_head=(2 * h + 2) if model.binary_head else 0,
    )


def _layer_parameters(h: int, i: int, t: int = 1) -> int:
    return (2 * 2 * h                      # two LayerNorms (weight + bias)
            + (3 * h * h + 3 * h) // t     # column-parallel QKV
            + h * h // t + h               # row-parallel out-proj, replicated bias
            + (h * i + i) // t             # column-parallel MLP in
            + i * h // t + h)              # row-parallel MLP out, replicated bias


def _modernbert_layer_parameters(h: int, i: int, t: int = 1, *, first: bool = False) -> int:
    return ((1 if first else 2) * h         # LayerNorms without bias (none before layer 0's attention)
            + 4 * h * h // t                # column-parallel QKV, row-parallel out-proj
            + 3 * h * i // t)               # GeGLU: column-parallel in (2I), row-parallel out


# ---- FLOPs --------------------------------------------------------------------------------

def masked_fraction(data: DataConfig) -> float:
    """Expected fraction of a sample's tokens the MLM head predicts: `masked_lm_prob`, capped
    by `max_predictions_per_seq` per sample (data/masking.py; 20 of 128 tokens for BERT)."""
    return min(data.masked_lm_prob, data.max_predictions_per_seq / data.max_seq_length)


def model_flops_per_token(model: ModelConfig, seq_len: int, *, masked_fraction: float = 1.0) -> float:
    """Training (forward + backward) model FLOPs per token of MegatronBERT pretraining.

    PaLM's MFU definition (Chowdhery et al. 2022, App. B) and Megatron-LM's (Narayanan et al.
    2021, Sec. 5.1): a multiply-add is 2 FLOPs, backward = 2 x forward, so every parameter a
    token passes through costs 6 FLOPs, and the attention score and context matmuls (QK^T and
    AV) cost 12 h s per token and layer (bidirectional: no causal halving). Recomputation is
    not counted. V is the real vocabulary: padding is overhead, not model FLOPs.

    `masked_fraction` is the share of tokens the MLM head runs on. 1.0 counts the full path
    (the head on every position, as the reference runs it). Below 1 it counts what
    `MegatronBert(mlm_masked_only=True)` runs, which is the trainer's default: the MLM head
    (transform, LayerNorm, tied decoder) on the masked tokens only, and the last layer's
    queries, attention output, MLP and LayerNorms, plus the final LayerNorm, on the positions
    the heads read (masked tokens + [CLS]; its fused QKV projection still runs on every
    token, and keys and values cover every token).
    Counted as averages: rows padded up to the batch's most-masked row are not counted.
    Pooler and NSP head run once per sequence, 1/seq_len per token.
    """
    if not 0.0 < masked_fraction <= 1.0:
        raise ValueError(f"masked_fraction={masked_fraction} must be in (0, 1]")
    if model.arch == "modernbert":
        return _modernbert_flops_per_token(model, seq_len, masked_fraction)
    h, i, n, v, s = model.hidden_size, model.intermediate_size, model.num_layers, model.vocab_size, seq_len
    p = count_parameters(model, vocab_multiple=1)
    # Per token, in multiply-adds (x6 below): QK^T and AV are s x h each for a full query row.
    layer, attention = _layer_parameters(h, i), 2 * h * s
    head = p.mlm_head + h * v  # transform + LayerNorm + decoder bias, and the tied decoder weight
    if masked_fraction == 1.0:
        forward = n * (layer + attention) + p.final_layernorm + head
    else:
        read = min(1.0, masked_fraction + 1.0 / s)  # masked positions and [CLS]
        qkv = 3 * h * h + 3 * h  # the last layer's fused QKV projection still runs on every token
        last = qkv + read * (layer - qkv + attention)
        forward = (n - 1) * (layer + attention) + last + read * p.final_layernorm + masked_fraction * head
    per_sequence = p.pooler + p.nsp_head
    return 6.0 * (forward + per_sequence / s)


def _modernbert_flops_per_token(model: ModelConfig, s: int, masked_fraction: float) -> float:
    """`model_flops_per_token` of ModernBERT: the same accounting, with each sliding-window layer's
    QK^T and AV over the keys of its window (at most `local_attention` + 1), as a windowed kernel
    runs them (SDPA with the window as a mask computes all s keys: that is overhead, not model
    FLOPs), and no pooler or NSP head."""
    h, i, n, v = model.hidden_size, model.intermediate_size, model.num_layers, model.vocab_size
    p = count_parameters(model, vocab_multiple=1)
    keys = [s if k % model.global_attn_every_n_layers == 0 else min(s, model.local_attention + 1) for k in range(n)]
    layers = [_modernbert_layer_parameters(h, i, first=k == 0) + 2 * h * keys[k] for k in range(n)]
    head = p.mlm_head + h * v
    if masked_fraction == 1.0:
        forward = sum(layers) + p.final_layernorm + head
    else:
        read = min(1.0, masked_fraction + 1.0 / s)  # masked positions and [CLS]
        qkv = 3 * h * h  # the last layer's fused QKV projection still runs on every token
        forward = sum(layers[:-1]) + qkv + read * (layers[-1] - qkv + p.final_layernorm) + masked_fraction * head
    return 6.0 * forward


# ---- device peaks -------------------------------------------------------------------------

@dataclass(frozen=True)
class PeakTflops:
    """Dense (no 2:4 sparsity) peak TFLOP/s of one device per matmul precision."""

    bf16: float
    """16-bit tensor cores (bf16; fp16 where the part has no bf16: V100, T4)."""
    tf32: float
    """fp32 matmuls with TF32 allowed (`torch.backends.cuda.matmul.allow_tf32`); parts
    without TF32 repeat their fp32 figure."""
    fp32: float
    """Full-precision fp32 (PyTorch's default for fp32 matmuls): CUDA cores, or the fp32
    matrix cores of AMD parts."""

    def for_precision(self, precision: str) -> float:
        """The figure for `bf16`/`fp16`, `tf32` or `fp32`."""
        return {"bf16": self.bf16, "fp16": self.bf16, "tf32": self.tf32, "fp32": self.fp32}[precision]


# From NVIDIA's and AMD's data sheets (sparse figures halved). Keys are the tokens of
# `torch.cuda.get_device_name()` that identify the part; the first entry whose tokens are all
# present wins, so variants come before the base name.
PEAK_TFLOPS: list[tuple[frozenset[str], PeakTflops]] = [
    (frozenset({"H100", "PCIE"}), PeakTflops(756.0, 378.0, 51.2)),
    (frozenset({"H100", "NVL"}), PeakTflops(835.0, 417.5, 60.0)),
    (frozenset({"H200", "NVL"}), PeakTflops(835.0, 417.5, 60.0)),
    (frozenset({"GH200"}), PeakTflops(989.0, 494.5, 67.0)),
    (frozenset({"H100"}), PeakTflops(989.0, 494.5, 67.0)),
    (frozenset({"H200"}), PeakTflops(989.0, 494.5, 67.0)),
    (frozenset({"H800"}), PeakTflops(989.0, 494.5, 67.0)),
    (frozenset({"B200"}), PeakTflops(2250.0, 1100.0, 75.0)),
    (frozenset({"A100"}), PeakTflops(312.0, 156.0, 19.5)),
    (frozenset({"A800"}), PeakTflops(312.0, 156.0, 19.5)),
    (frozenset({"A10G"}), PeakTflops(125.0, 62.5, 31.2)),
    (frozenset({"A10"}), PeakTflops(125.0, 62.5, 31.2)),
    (frozenset({"L40S"}), PeakTflops(362.0, 183.0, 91.6)),
    (frozenset({"L40"}), PeakTflops(181.0, 90.5, 90.5)),
    (frozenset({"L4"}), PeakTflops(121.0, 60.0, 30.3)),
    (frozenset({"A40"}), PeakTflops(150.0, 74.8, 37.4)),
    (frozenset({"A6000"}), PeakTflops(155.0, 77.4, 38.7)),
    (frozenset({"V100"}), PeakTflops(125.0, 15.7, 15.7)),
    (frozenset({"T4"}), PeakTflops(65.0, 8.1, 8.1)),
    (frozenset({"MI300X"}), PeakTflops(1307.0, 653.7, 163.4)),
    (frozenset({"MI250X"}), PeakTflops(383.0, 95.7, 95.7)),
]


def peak_tflops(device_name: str, precision: str = "bf16") -> float | None:
    """Peak dense TFLOP/s of a GPU from its name for `precision` (bf16, fp16, tf32, fp32),
    or None when the part is not in `PEAK_TFLOPS`."""
    if precision not in ("bf16", "fp16", "tf32", "fp32"):
        raise ValueError(f"precision={precision!r} is not one of bf16, fp16, tf32, fp32")
    tokens = set(re.findall(r"[A-Z0-9]+", device_name.upper()))
    for needed, peaks in PEAK_TFLOPS:
        if needed <= tokens:
            return peaks.for_precision(precision)
    return None
