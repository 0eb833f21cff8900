"""Sequence parallelism: the model with SP is the reference model (and the model without SP) at
TP=2 and 4, forward and backward; TP-invariant dropout drops the same elements with SP on and
off; recomputation under activation checkpointing redraws the same masks."""

import pytest
import torch
import torch.distributed as dist

from mbert_train.model import MegatronBert
from mbert_train.parallel.context import TPContext
from tests.dist import spawn
from tests.test_model_reference import TOL, check_against_reference, dropout_loss, make_batch, small_config


def _sp_main():
    group = dist.group.WORLD
    # Against transformers' MegatronBertForPreTraining, both head paths, forward and backward.
    check_against_reference(TPContext(group, sequence_parallel=True))
    # TP-invariant masks: with SP each rank keeps its chunk of the whole-tensor mask, so SP on
    # and off drop exactly the same elements.
    loss_off, grads_off = dropout_loss(TPContext(group, invariant_dropout=True))
    loss_on, grads_on = dropout_loss(TPContext(group, sequence_parallel=True, invariant_dropout=True))
    torch.testing.assert_close(loss_on, loss_off, **TOL)
    for name, g in grads_off.items():
        torch.testing.assert_close(grads_on[name], g, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # Per-rank streams (the default) and invariant masks: recomputation redraws the same masks.
    for invariant in (False, True):
        tp = TPContext(group, sequence_parallel=True, invariant_dropout=invariant)
        loss, grads = dropout_loss(tp, tp_invariant=invariant)
        loss_ckpt, grads_ckpt = dropout_loss(tp, checkpointing=True, tp_invariant=invariant)
        assert torch.equal(loss_ckpt, loss)
        for name, g in grads.items():
            torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    # SP really splits: a LayerNorm of an SP layer sees this rank's chunk only.
    model = MegatronBert(small_config(), TPContext(group, sequence_parallel=True))
    seen = []
    model.layers[0].attn_norm.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    model(**make_batch(small_config()))
    assert seen == [12 // dist.get_world_size()]
    assert getattr(model.layers[0].attn_norm.weight, "sequence_parallel", False)
    assert not getattr(model.layers[-1].attn_norm.weight, "sequence_parallel", False)  # the last layer is replicated


@pytest.mark.parametrize("tp", [2, 4])
def test_sequence_parallel_matches_reference_and_no_sp(tp):
    spawn(_sp_main, tp)


def _keep_gathered_main():
    """`sp_keep_gathered`: the same numbers, and backward no longer all-gathers the column-parallel
    linears' inputs again (two per SP layer: QKV and MLP-in)."""
    import mbert_train.parallel.mappings as mappings

    group = dist.group.WORLD
    gathers = []
    real = mappings.dist.all_gather

    def counting(parts, x, group=None):
        gathers.append(x.numel())
        return real(parts, x, group=group)

    results = {}
    mappings.dist.all_gather = counting
    try:
        for keep in (False, True):
            gathers.clear()
            tp = TPContext(group, sequence_parallel=True, sp_keep_gathered=keep, invariant_dropout=True)
            results[keep] = (dropout_loss(tp), len(gathers))
    finally:
        mappings.dist.all_gather = real
    (loss, grads), n_default = results[False]
    (loss_keep, grads_keep), n_keep = results[True]
    assert torch.equal(loss_keep, loss)
    for name, g in grads.items():
        assert torch.equal(grads_keep[name], g), name
    sp_layers = small_config().num_layers - 1  # the last layer runs replicated
    assert n_default - n_keep == 2 * sp_layers, (n_default, n_keep)


def test_sp_keep_gathered_saves_the_backward_gathers():
    spawn(_keep_gathered_main, 2)


def test_tp1_context_is_the_dense_model():
    cfg = small_config()
    torch.manual_seed(0)
    plain = MegatronBert(cfg)
    torch.manual_seed(0)
    ctx = MegatronBert(cfg, TPContext(None, sequence_parallel=True))
    assert not ctx.tp.sp
    batch = make_batch(cfg)
    assert torch.equal(plain(**batch).loss, ctx(**batch).loss)
