"""The ModernBERT pieces of bench_model.py: its shapes, its preset's model and data settings, the
reference (`transformers.ModernBertForMaskedLM`) and ours holding its weights, and its batches.

Each function has the signature of its MegatronBERT counterpart in common.py, so bench_model.py
picks one module or the other by the shape's `arch`. The preset is conf/model/modernbert-base.yaml,
composed by Hydra as a run composes it: its dropouts (0, as published), MLM only
(data.objective=none: contiguous segments packed to full length), 30 % of the tokens masked with
no cap per sample.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from common import Shape

PRESET = "modernbert-base"

SHAPES = {
    # 3 layers: one global, two sliding-window ones; seq 128 > the 64-token half window.
    "moderntiny": Shape(hidden=64, layers=3, heads=2, intermediate=96, seq=128, batch=2, arch="modernbert"),
    "modern1024": Shape(hidden=768, layers=22, heads=12, intermediate=1152, seq=1024, batch=4, arch="modernbert"),
}
"""modern1024 is modernbert-base (22 x 768, GeGLU 1152) at S=1024, a CPU-sized micro-batch."""

REF_ATTENTION = "sdpa"
"""transformers' fastest CPU attention for ModernBERT, of the two that run without compilation:
SDPA (torch's CPU flash kernel) steps ~2.4x faster than eager at S=1024 (3 layers, batch 2,
2 cores: 1.8-2.1 s against 4.5 s) and holds less. `--ref-attention eager` runs the other."""


@functools.lru_cache(maxsize=None)
def preset(shape: Shape, *, vocab: int | None = None, data_dir: str | None = None):
    """The preset composed at this shape: (ModelConfig, DataConfig)."""
    from mbert_train.config import compose_config
    overrides = [f"model={PRESET}", f"model.hidden_size={shape.hidden}", f"model.num_layers={shape.layers}",
                 f"model.num_heads={shape.heads}", f"model.intermediate_size={shape.intermediate}",
                 f"model.vocab_size={vocab or shape.vocab}", "model.pad_token_id=0",
                 f"data.max_seq_length={shape.seq}", "data.num_workers=0"]
    if data_dir:
        overrides.append(f"data.path={data_dir}")
    cfg = compose_config(overrides)
    return cfg.model, cfg.data


def preset_dropout() -> float:
    model, _ = preset(SHAPES["moderntiny"])
    if model.hidden_dropout != model.attention_dropout:
        raise SystemExit(f"{PRESET}: hidden_dropout {model.hidden_dropout} != attention_dropout "
                         f"{model.attention_dropout}; bench_model.py's --dropout sets both")
    return model.hidden_dropout


def model_config(shape: Shape, dropout: float):
    import dataclasses
    model, _ = preset(shape)
    return dataclasses.replace(model, hidden_dropout=dropout, attention_dropout=dropout,
                               max_position_embeddings=max(model.max_position_embeddings, shape.seq))


def reference_model(cfg, attention: str = "auto"):
    """`ModernBertForMaskedLM` with its seeded init, the dense MLM head (`sparse_prediction` off, the
    default: logits at every position, the loss over the masked ones). Returns (model, attention)."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    from mbert_train.model.modernbert_hf import hf_config
    attention = REF_ATTENTION if attention == "auto" else attention
    torch.manual_seed(0)
    hf = ModernBertConfig(**{k: v for k, v in hf_config(cfg).items() if k != "architectures"})
    model = ModernBertForMaskedLM._from_config(hf, attn_implementation=attention).float()
    return model, model.config._attn_implementation


def build(which: str, cfg, device: torch.device | str = "cpu", attention: str = "auto"):
    """(model, reference attention): the reference, or ours (TP=1, the trainer's defaults: packed
    batches, MLM head on the masked tokens) holding its weights (`load_hf_state_dict`)."""
    with torch.device(device):
        ref, attn = reference_model(cfg, attention)
        if which == "ref":
            return ref.train(), attn
        from mbert_train.model.factory import build_model
        from mbert_train.model.modernbert_hf import load_hf_state_dict
        ours = build_model(cfg, mlm_masked_only=True)
        load_hf_state_dict(ours, ref.state_dict())
    return ours.train(), attn


def loss_of(which: str, model, batch) -> torch.Tensor:
    """Ours: its training forward on the batch as the collator built it. The reference: what
    ModernBertForMaskedLM takes (no token types, no sentence-pair label)."""
    if which == "ours":
        return model(**batch).loss
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["mlm_labels"]).loss


def gemm_dims(shape: Shape) -> tuple[tuple[int, int], ...]:
    """(out, in) of each layer's dense GEMMs: QKV, attention-out, GeGLU in (both halves), MLP-out."""
    h, i = shape.hidden, shape.intermediate
    return (3 * h, h), (h, h), (2 * i, h), (h, i)


def floor_parameters(cfg) -> list[torch.nn.Parameter]:
    from mbert_train.model.factory import build_model
    return list(build_model(cfg).parameters())


def pipeline_batches(data_dir: str, shape: Shape, count: int, seed: int = 0) -> list[dict]:
    """The first `count` training micro-batches our loader yields with the preset's data settings,
    each padded to its longest sample rounded up to 8 by our collator."""
    from mbert_train.data import build_loaders
    _, data = preset(shape, data_dir=data_dir)
    train, _ = build_loaders(data, data_dir, seed=seed, micro_batch_size=shape.batch, dp_rank=0, dp_size=1)
    return [next(train) for _ in range(count)]


def synthetic_batches(shape: Shape, count: int, seed: int = 1234) -> list[dict]:
    """Batches shaped like the pipeline's with the preset: [CLS] tokens [SEP], full length but
    for short_seq_prob of the samples (a uniform shorter target), the preset's share of the tokens
    between [CLS] and [SEP] masked, padded by our collator."""
    from mbert_train.data.collate import PadCollator
    from mbert_train.data.masking import IGNORE_INDEX
    _, data = preset(shape)
    rng = np.random.default_rng(seed)
    collate = PadCollator(pad_id=0, pad_to_multiple_of=data.pad_to_multiple_of, max_length=shape.seq)
    cls, sep, first_real = 2, 3, 5
    batches = []
    for _ in range(count):
        samples = []
        for _ in range(shape.batch):
            n = int(rng.integers(8, shape.seq + 1)) if rng.random() < data.short_seq_prob else shape.seq
            ids = rng.integers(first_real, shape.vocab, n)
            ids[0], ids[n - 1] = cls, sep
            budget = min(data.max_predictions_per_seq, max(1, round(data.masked_lm_prob * (n - 2))))
            picked = rng.choice(np.arange(1, n - 1), budget, replace=False)
            labels = np.full(n, IGNORE_INDEX, dtype=np.int64)
            labels[picked] = ids[picked]
            samples.append(dict(input_ids=ids, token_type_ids=np.zeros(n, dtype=np.int64), mlm_labels=labels))
        batches.append(collate(samples))
    return batches


def batches_for(data_dir: str | None, shape: Shape, count: int) -> list[dict]:
    return pipeline_batches(data_dir, shape, count) if data_dir else synthetic_batches(shape, count)


def batches_label(data_dir: str | None) -> str:
    _, data = preset(SHAPES["moderntiny"])
    settings = (f"{PRESET} preset: objective={data.objective}, masked_lm_prob={data.masked_lm_prob}, "
                f"no prediction cap")
    if data_dir:
        return f"batches ({PRESET}): our data pipeline on {data_dir} ({settings}, real padding)"
    return f"batches ({PRESET}): SYNTHETIC (no --data): {settings}, padded by our collator"
