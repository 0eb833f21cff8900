"""The pieces around the DeepSpeed engine, checked directly: the LR schedule's values, the exact
no-decay parameter set, the TP gradient norm against TP=1, and evaluation at DP=2 against DP=1."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from mbert_train.config import DataConfig, OptimConfig, TrainConfig, TrainerConfig
from mbert_train.engine import build_optimizer, lr_lambda, param_groups, tp_grad_norm
from mbert_train.model import MegatronBert, ModelConfig
from mbert_train.parallel.layout import ParallelDims, ParallelState
from tests.dist import spawn
from tests.test_data_corpus import embedded_corpus
from tests.test_model_reference import make_batch, small_config


# ---- learning-rate schedule ----------------------------------------------------------------

@pytest.mark.parametrize("decay, min_ratio, expected", [
    # warmup 4 of 12 steps: lr/4 at the first step (never 0), peak at the end of warmup.
    ("linear", 0.0, {0: 0.25, 1: 0.5, 3: 1.0, 4: 1.0, 6: 0.75, 8: 0.5, 11: 0.125, 12: 0.0, 20: 0.0}),
    ("linear", 0.1, {0: 0.25, 3: 1.0, 4: 1.0, 8: 0.55, 12: 0.1, 20: 0.1}),
    ("cosine", 0.0, {0: 0.25, 3: 1.0, 4: 1.0, 6: 0.5 * (1 + math.cos(math.pi / 4)), 8: 0.5,
                     10: 0.5 * (1 + math.cos(3 * math.pi / 4)), 12: 0.0, 20: 0.0}),
    ("cosine", 0.2, {0: 0.25, 4: 1.0, 8: 0.6, 12: 0.2}),
    ("constant", 0.0, {0: 0.25, 2: 0.75, 3: 1.0, 4: 1.0, 12: 1.0, 100: 1.0}),
])
def test_lr_lambda_values(decay, min_ratio, expected):
    scale = lr_lambda(OptimConfig(warmup_steps=4, decay=decay, min_lr_ratio=min_ratio), max_steps=12)
    for step, value in expected.items():
        assert math.isclose(scale(step), value, rel_tol=1e-12, abs_tol=1e-12), (step, scale(step), value)


def test_lr_schedule_steps_the_optimizer_from_lr_over_warmup():
    """What the optimizer sees, through LambdaLR as build_engine wires it: lr/warmup at the first
    step, lr at the last warmup step, no warmup = full lr at once."""
    p = torch.nn.Parameter(torch.zeros(2))
    for warmup, first in ((5, 0.2), (0, 1.0)):
        opt = torch.optim.SGD([p], lr=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(OptimConfig(warmup_steps=warmup), max_steps=10))
        seen = []
        for _ in range(10):
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert math.isclose(seen[0], 0.5 * first)
        if warmup:
            assert math.isclose(seen[warmup - 1], 0.5) and seen[:warmup] == sorted(seen[:warmup])
        assert seen[-1] > 0 and seen[warmup:] == sorted(seen[warmup:], reverse=True)


# ---- weight decay --------------------------------------------------------------------------

# Megatron's split: biases and LayerNorms are not decayed; weight matrices and the three
# embedding tables (word, position, token type) are. Spelled out so a change shows here.
NO_DECAY = {"mlm_bias", "final_norm.weight", "final_norm.bias", "pooler.bias", "mlm_dense.bias",
            "mlm_norm.weight", "mlm_norm.bias", "nsp.bias"} | {
    f"layers.{i}.{name}" for i in range(2)
    for name in ("attn_norm.weight", "attn_norm.bias", "attn.qkv.bias", "attn.out.bias", "mlp_norm.weight",
                 "mlp_norm.bias", "mlp.fc1.bias", "mlp.fc2.bias")}
DECAY = {"word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
         "pooler.weight", "mlm_dense.weight", "nsp.weight"} | {
    f"layers.{i}.{name}" for i in range(2)
    for name in ("attn.qkv.weight", "attn.out.weight", "mlp.fc1.weight", "mlp.fc2.weight")}


def test_no_weight_decay_on_biases_and_layer_norms():
    model = MegatronBert(small_config())
    names = {id(p): n for n, p in model.named_parameters()}
    assert set(names.values()) == DECAY | NO_DECAY, "a new parameter: classify it here"
    decay, no_decay = param_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == DECAY
    assert {names[id(p)] for p in no_decay["params"]} == NO_DECAY
    # The optimizer the engine gets keeps that split.
    cfg = TrainConfig(model=small_config(), data=DataConfig(max_seq_length=32), optim=OptimConfig(weight_decay=0.01))
    opt = build_optimizer(model, cfg, ParallelState(ParallelDims(world_size=1), 0, None, None))
    per_param = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert per_param == {**{n: 0.01 for n in DECAY}, **{n: 0.0 for n in NO_DECAY}}


# ---- gradient norm under TP ----------------------------------------------------------------

def _grad_norm_main():
    cfg = small_config()
    batch = make_batch(cfg)
    norms = {}
    for tp, group in ((1, None), (2, dist.group.WORLD)):
        torch.manual_seed(0)  # one master weight: the TP=2 model is the TP=1 model, sharded
        model = MegatronBert(cfg, group)
        model(**batch).loss.backward()
        params = list(model.parameters())
        norms[tp] = tp_grad_norm(params, group)
        if tp == 1:
            dense = torch.cat([p.grad.flatten() for p in params]).norm()
            torch.testing.assert_close(norms[1], dense, rtol=1e-6, atol=0)
    # Replicated parameters (LayerNorms, row-parallel biases, position embeddings, heads) are
    # a large share of the norm: counting them twice would be far outside 1e-5.
    torch.testing.assert_close(norms[2], norms[1], rtol=1e-5, atol=0)


def test_tp2_grad_norm_equals_tp1():
    spawn(_grad_norm_main, 2)


# ---- evaluation over DP --------------------------------------------------------------------

def _eval_config() -> TrainConfig:
    # 30 held-out samples in micro-batches of 4: DP=1 reads 8 batches, each DP=2 rank 4 of
    # another make-up (the last ones shorter), so equality needs the sums, not the means.
    model = ModelConfig(vocab_size=DataConfig().default_vocab_size, hidden_size=32, num_layers=1, num_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return TrainConfig(model=model, data=DataConfig(max_seq_length=64, num_workers=0, eval_max_samples=30),
                       trainer=TrainerConfig(micro_batch_size=4, eval_batches=8))


def _eval_main(dataset_dir: str, run_dir: str):
    from mbert_train.data import build_loaders
    from mbert_train.trainer import Trainer

    cfg = _eval_config()
    rank = dist.get_rank()
    singles = [dist.new_group([r]) for r in range(2)]  # every rank creates every group
    torch.manual_seed(0)
    model = MegatronBert(cfg.model)
    results, keys = {}, {}
    for dp, dp_rank, group in ((1, 0, singles[rank]), (2, rank, dist.group.WORLD)):
        _, evals = build_loaders(cfg.data, dataset_dir, seed=0, micro_batch_size=cfg.trainer.micro_batch_size,
                                 dp_rank=dp_rank, dp_size=dp)
        keys[dp] = [k for b in evals.batches for k in b]
        state = ParallelState(ParallelDims(world_size=dp), dp_rank, None, group)
        trainer = Trainer(cfg, state, model, None, evals, f"{run_dir}/dp{dp}-rank{rank}", torch.device("cpu"))
        results[dp] = trainer.evaluate()
    shares = [None, None]
    dist.all_gather_object(shares, keys[2])
    assert len(keys[1]) == 30 and sorted(shares[0] + shares[1]) == sorted(keys[1]), "same samples at DP=1 and 2"
    assert results[1].keys() == results[2].keys() == {"eval_mlm_loss", "eval_mlm_accuracy", "eval_nsp_accuracy"}
    for key, value in results[1].items():
        assert math.isclose(results[2][key], value, rel_tol=1e-5), (key, results[2][key], value)


def test_eval_at_dp2_equals_dp1(corpus_cache, tmp_path):
    spawn(_eval_main, 2, embedded_corpus(corpus_cache), str(tmp_path))
