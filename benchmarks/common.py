"""What the benchmark scripts share: shapes, the models (same weights), and the batches users
train on (our data pipeline's, with its real padding) or synthetic ones padded the same way.

Not a test helper: scripts under benchmarks/ import it as `common` (their own directory is on
`sys.path` when run as `python benchmarks/bench_x.py`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch

WIKITEXT_HINT = ("prepare one with `mbert-prep ../shared/corpora/wikitext-2/valid.txt -o /tmp/wt2` "
                 "and pass --data /tmp/wt2")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seq: int
    batch: int
    vocab: int = 30522
    arch: str = "megatron_bert"
    """`model.arch`: which module builds the models and batches (common.py or modern.py)."""


SHAPES = {
    "tiny": Shape(hidden=64, layers=2, heads=2, intermediate=256, seq=64, batch=4),
    "small": Shape(hidden=256, layers=4, heads=4, intermediate=1024, seq=128, batch=8),
    "base128": Shape(hidden=768, layers=12, heads=12, intermediate=3072, seq=128, batch=8),
    "base512": Shape(hidden=768, layers=12, heads=12, intermediate=3072, seq=512, batch=2),
    "large128": Shape(hidden=1024, layers=24, heads=16, intermediate=4096, seq=128, batch=8),
    "large512": Shape(hidden=1024, layers=24, heads=16, intermediate=4096, seq=512, batch=2),
}
"""Batch sizes are the CPU defaults; `--batch` overrides them (gpu.sh uses GPU-sized ones)."""

DROPOUT = 0.1
"""The presets' hidden and attention dropout (conf/model/*.yaml leave ModelConfig's 0.1)."""


def with_overrides(shape: Shape, *, batch: int | None = None, vocab: int | None = None) -> Shape:
    return dataclasses.replace(shape, batch=batch or shape.batch, vocab=vocab or shape.vocab)


def max_predictions(seq: int) -> int:
    """BERT's MLM prediction cap: 20 at seq 128, 80 at seq 512 (15% rounded up to a multiple of 5)."""
    return max(1, seq * 5 // 32)


def model_config(shape: Shape, dropout: float):
    from mbert_train.model import ModelConfig
    return ModelConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers,
                       num_heads=shape.heads, intermediate_size=shape.intermediate,
                       max_position_embeddings=max(512, shape.seq), hidden_dropout=dropout,
                       attention_dropout=dropout)


def reference_model(cfg, attention: str = "auto"):
    """`MegatronBertForPreTraining` with its seeded init; `auto`: SDPA attention where transformers
    offers it for MegatronBERT, else eager (its default). Returns (model, attention implementation)."""
    from transformers import MegatronBertConfig, MegatronBertForPreTraining
    def hf_config():
        return MegatronBertConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})

    torch.manual_seed(0)
    if attention != "auto":
        return MegatronBertForPreTraining._from_config(hf_config(), attn_implementation=attention).float(), attention
    try:
        return MegatronBertForPreTraining._from_config(hf_config(), attn_implementation="sdpa").float(), "sdpa"
    except (ValueError, ImportError):  # transformers 5 refuses SDPA for MegatronBERT
        torch.manual_seed(0)
        return MegatronBertForPreTraining._from_config(hf_config(), attn_implementation="eager").float(), "eager"


def build(which: str, cfg, device: torch.device | str = "cpu", attention: str = "auto"):
    """(model, reference attention implementation): the reference, or ours (TP=1) holding its
    weights (`hf_to_full` + `shard_state_dict`), both on `device` (built there: a GPU draws
    BERT-large's init in a blink) and in train mode."""
    with torch.device(device):
        ref, attn = reference_model(cfg, attention)
        if which == "ref":
            return ref.train(), attn
        from mbert_train.model import MegatronBert
        from mbert_train.model.weights import hf_to_full, shard_state_dict
        ours = MegatronBert(cfg, mlm_masked_only=True)
        ours.load_state_dict(shard_state_dict(hf_to_full(ref.state_dict(), cfg), ours))
    return ours.train(), attn


def gemm_dims(shape: Shape) -> tuple[tuple[int, int], ...]:
    """(out, in) of each layer's dense GEMMs: QKV, attention-out, MLP-in, MLP-out."""
    h, i = shape.hidden, shape.intermediate
    return (3 * h, h), (h, h), (i, h), (h, i)


def floor_parameters(cfg) -> list[torch.nn.Parameter]:
    """Our model's parameters (for their count and shapes: the floor's AdamW step)."""
    from mbert_train.model import MegatronBert
    return list(MegatronBert(cfg).parameters())


def loss_of(which: str, model, batch) -> torch.Tensor:
    if which == "ours":
        return model(**batch).loss
    return model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                 attention_mask=batch["attention_mask"], labels=batch["mlm_labels"],
                 next_sentence_label=batch["nsp_labels"]).loss


def dataset_vocab(data_dir: str) -> int:
    from mbert_train.data import open_dataset
    return open_dataset(data_dir).vocab_size


def pipeline_batches(data_dir: str, shape: Shape, count: int, seed: int = 0) -> list[dict]:
    """The first `count` training micro-batches our loader yields (NSP, BERT's masking and
    prediction cap, each batch padded to its longest sample rounded up to 8)."""
    from mbert_train.data import DataConfig, build_loaders
    cfg = DataConfig(path=data_dir, objective="nsp", max_seq_length=shape.seq,
                     max_predictions_per_seq=max_predictions(shape.seq), num_workers=0)
    train, _ = build_loaders(cfg, data_dir, seed=seed, micro_batch_size=shape.batch, dp_rank=0, dp_size=1)
    return [next(train) for _ in range(count)]


def synthetic_batches(shape: Shape, count: int, seed: int = 1234) -> list[dict]:
    """Batches shaped like the pipeline's: [CLS] A [SEP] B [SEP] samples, 15% of the real tokens
    masked (capped as BERT caps them), padded by the pipeline's own collator. Lengths: 10% draw a
    short target (short_seq_prob), and of the rest 55% fill the sequence while 45% end early
    (documents run out), uniformly in [s/4, s]: about 80% real tokens, what our pipeline gives
    on WikiText-2 at seq 128 (70% at seq 512)."""
    from mbert_train.data.collate import PadCollator
    from mbert_train.data.masking import IGNORE_INDEX
    rng = np.random.default_rng(seed)
    collate = PadCollator(pad_id=0, pad_to_multiple_of=8, max_length=shape.seq)
    cls, sep, first_real = 2, 3, 5
    batches = []
    for _ in range(count):
        samples = []
        for _ in range(shape.batch):
            if rng.random() < 0.1:
                n = int(rng.integers(8, shape.seq + 1))
            else:
                n = shape.seq if rng.random() < 0.55 else int(rng.integers(max(8, shape.seq // 4), shape.seq + 1))
            split = int(rng.integers(2, n - 2))  # second [SEP] at n-1, first at split
            ids = rng.integers(first_real, shape.vocab, n)
            ids[0], ids[split], ids[n - 1] = cls, sep, sep
            types = np.zeros(n, dtype=np.int64)
            types[split + 1:] = 1
            candidates = np.setdiff1d(np.arange(1, n - 1), [split])
            budget = min(max_predictions(shape.seq), max(1, round(0.15 * len(candidates))))
            picked = rng.choice(candidates, budget, replace=False)
            labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
            labels[picked] = ids[picked]
            samples.append(dict(input_ids=ids, token_type_ids=types, mlm_labels=labels,
                                nsp_label=int(rng.integers(0, 2))))
        batches.append(collate(samples))
    return batches


def batches_for(data_dir: str | None, shape: Shape, count: int) -> list[dict]:
    """The first `count` batches of the pipeline on `data_dir`, or synthetic ones without it."""
    return pipeline_batches(data_dir, shape, count) if data_dir else synthetic_batches(shape, count)


def batches_label(data_dir: str | None) -> str:
    """One line saying where the batches come from."""
    if data_dir:
        return f"batches: our data pipeline on {data_dir} (NSP, real padding)"
    return ("batches: SYNTHETIC (no --data): NSP-like lengths (~80% real tokens) and BERT masking, padded by our "
            "collator; for real batches " + WIKITEXT_HINT)


def batch_stats(batch: dict) -> dict:
    """Real tokens, masked tokens, padded width and sum of squared lengths of one batch."""
    lengths = batch["attention_mask"].sum(1).double()
    return dict(real=int(lengths.sum()), masked=int((batch["mlm_labels"] != -100).sum()),
                width=int(batch["input_ids"].shape[1]), rows=int(batch["input_ids"].shape[0]),
                sq=float((lengths ** 2).sum()))


def step_model_flops(cfg, stats: dict) -> float:
    """Model FLOPs of one training step on this batch, counted on its real tokens by the one
    home (`mbert_train.arithmetic`), with the MLM head on the masked tokens: the same credit for
    both models, what the loss needs."""
    from mbert_train.arithmetic import model_flops_per_token
    seq = stats["sq"] / stats["real"]  # keys per query, averaged over real tokens
    fraction = min(1.0, stats["masked"] / stats["real"])
    return model_flops_per_token(cfg, max(seq, 1.0), masked_fraction=fraction) * stats["real"]


def data_dir_or_none(path: str | None) -> str | None:
    if path and not os.path.isdir(path):
        raise SystemExit(f"--data {path}: no such directory; {WIKITEXT_HINT}")
    return path
