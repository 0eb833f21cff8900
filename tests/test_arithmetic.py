"""Model arithmetic (mbert_train/arithmetic.py): FLOPs per token as the trainer runs the model,
the masked fraction, the peak table, and that the trainer, planner and metrics use this one home."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mbert_train import arithmetic, metrics, plan
from mbert_train.arithmetic import masked_fraction, model_flops_per_token, peak_tflops
from mbert_train.batch import IGNORE_INDEX
from mbert_train.config import TrainConfig
from mbert_train.data.config import DataConfig
from mbert_train.model import MegatronBert, ModelConfig


def _counted_flops_per_token(cfg: ModelConfig, b: int, s: int, masked_per_row: int, *, masked_only: bool) -> float:
    """Matmul FLOPs of one forward+backward of our model, per token (torch's FLOP counter)."""
    torch.manual_seed(0)
    model = MegatronBert(cfg, mlm_masked_only=masked_only).train()
    ids = torch.randint(5, cfg.vocab_size, (b, s))
    labels = torch.full((b, s), IGNORE_INDEX)
    for row in range(b):  # the same count on every row: no padded read rows
        picked = torch.randperm(s - 1)[:masked_per_row] + 1
        labels[row, picked] = ids[row, picked]
    with FlopCounterMode(display=False) as counter:
        out = model(ids, mlm_labels=labels, nsp_labels=torch.zeros(b, dtype=torch.long))
        out.loss.backward()
    # The blockwise attention recomputes its scores (q k^T) in backward: recomputation, not model
    # FLOPs. Every layer's queries cover the sequence but the last one's (read rows, with [CLS]).
    last_rows = masked_per_row + 1 if masked_only else s
    recomputed = 2 * cfg.hidden_size * s * ((cfg.num_layers - 1) * s + last_rows) * b
    return (counter.get_total_flops() - recomputed) / (b * s)


# Attention dropout > 0 in train mode takes the blockwise path on CPU, whose score and context
# matmuls the counter sees (it does not count CPU flash attention). A vocabulary that is a
# multiple of 128 has no padding, so the counted decoder has the real width.
FLOP_MODEL = ModelConfig(vocab_size=1024, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256,
                         max_position_embeddings=128, attention_dropout=0.1, hidden_dropout=0.1)


@pytest.mark.parametrize("masked_per_row", [1, 19])
def test_flops_per_token_count_what_the_masked_only_model_runs(masked_per_row):
    b, s = 2, 128
    counted = _counted_flops_per_token(FLOP_MODEL, b, s, masked_per_row, masked_only=True)
    formula = model_flops_per_token(FLOP_MODEL, s, masked_fraction=masked_per_row / s)
    # The formula also charges bias and LayerNorm parameters, which the counter (matmuls only)
    # skips: about 2% at this width.
    assert formula == pytest.approx(counted, rel=0.03) and formula > counted
    full = _counted_flops_per_token(FLOP_MODEL, b, s, masked_per_row, masked_only=False)
    assert model_flops_per_token(FLOP_MODEL, s) == pytest.approx(full, rel=0.03)
    assert counted < 0.75 * full  # the head and last layer on ~all tokens would be counted here


def test_masked_fraction_follows_the_prediction_cap():
    assert masked_fraction(DataConfig()) == 0.15  # 0.15 * 128 = 19.2 <= 20 predictions
    assert masked_fraction(DataConfig(max_seq_length=512)) == 20 / 512
    assert masked_fraction(DataConfig(max_seq_length=512, max_predictions_per_seq=80)) == 0.15
    with pytest.raises(ValueError, match="masked_fraction=0"):
        model_flops_per_token(ModelConfig(vocab_size=30522), 128, masked_fraction=0.0)


def test_trainer_charges_what_it_runs(tmp_path):
    from mbert_train.trainer import Trainer

    def flops(**trainer):
        cfg = TrainConfig()
        cfg.model.vocab_size = 8192  # what the run takes from its dataset
        for key, value in trainer.items():
            setattr(cfg.trainer, key, value)
        t = Trainer(cfg, SimpleNamespace(rank=0), None, None, None, tmp_path, torch.device("cpu"))
        return cfg, t._flops_per_token

    cfg, masked = flops()
    assert cfg.trainer.mlm_masked_only
    assert masked == model_flops_per_token(cfg.model, cfg.data.max_seq_length,
                                           masked_fraction=masked_fraction(cfg.data))
    cfg, full = flops(mlm_masked_only=False)
    assert full == model_flops_per_token(cfg.model, cfg.data.max_seq_length) > masked


def test_bert_base_flops_per_token():
    # BERT-base at S=128: 669M FLOPs per token with the head on every token; what the trainer
    # runs (head on 15%, last layer on the read positions) is 518M.
    assert model_flops_per_token(ModelConfig(vocab_size=30522), 128) == pytest.approx(668.9e6, rel=1e-3)
    assert model_flops_per_token(ModelConfig(vocab_size=30522), 128, masked_fraction=0.15) == pytest.approx(518.3e6, rel=1e-3)


@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.0), ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
    ("NVIDIA H100 80GB HBM3", "fp32", 67.0), ("NVIDIA H200", "fp16", 989.0), ("NVIDIA H200 NVL", "bf16", 835.0),
    ("NVIDIA A100-SXM4-80GB", "fp32", 19.5), ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
    ("NVIDIA L40S", "fp32", 91.6), ("NVIDIA A10", "fp32", 31.2), ("Tesla V100-SXM2-32GB", "tf32", 15.7),
    ("NVIDIA GeForce RTX 3050", "bf16", None)])
def test_one_peak_table_with_a_column_per_precision(name, precision, tflops):
    assert peak_tflops(name, precision) == tflops


def test_peak_table_rejects_unknown_precision():
    with pytest.raises(ValueError, match="precision='int8'"):
        peak_tflops("NVIDIA H100", "int8")


def test_one_home():
    assert metrics.model_flops_per_token is arithmetic.model_flops_per_token
    assert metrics.peak_tflops is arithmetic.peak_tflops
    assert plan.count_parameters is arithmetic.count_parameters
    assert not hasattr(metrics, "PEAK_TFLOPS") and not hasattr(plan, "pad_vocab_size")
    from mbert_train.parallel import layout
    assert not hasattr(layout, "padded_vocab_size")
