"""Each parallel layer at TP=2 and TP=4 equals its dense counterpart, forward and backward."""

import pytest
import torch
import torch.distributed as dist

from mbert_train.parallel import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                  copy_to_tp, shard, unshard, vocab_parallel_argmax,
                                  vocab_parallel_cross_entropy)
from mbert_train.parallel.cross_entropy import mask_padded_vocab
from tests.dist import spawn

TOL = dict(rtol=1e-5, atol=1e-5)


def _gathered(t: torch.Tensor, dim: int, stride: int = 1) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return unshard(parts, dim, stride=stride)


def _pair(make):
    torch.manual_seed(7)
    dense = make(None)
    torch.manual_seed(7)
    par = make(dist.group.WORLD)
    return dense, par


def _nonzero_biases(dense, par, weight_dim: int, stride: int) -> None:
    """Both layers start with zero biases, which would hide a bias added on every rank: give them
    the same non-zero bias (sharded for column-parallel layers)."""
    full = torch.randn(dense.bias.shape, generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        dense.bias.copy_(full)
        par.bias.copy_(shard(full, 0, dist.get_world_size(), dist.get_rank(), stride=stride) if weight_dim == 0
                       else full)


def _check_linear(make, x_shape, *, parallel_input: bool, weight_dim: int, stride: int = 1):
    dense, par = _pair(make)
    _nonzero_biases(dense, par, weight_dim, stride)
    torch.manual_seed(11)
    x = torch.randn(*x_shape)
    x_par = x.chunk(dist.get_world_size(), -1)[dist.get_rank()].clone() if parallel_input else x.clone()
    x.requires_grad_(True)
    x_par.requires_grad_(True)
    y_dense = dense(x)
    y_par = par(x_par)
    grad = torch.randn_like(y_dense)
    y_dense.backward(grad)
    sharded_out = y_par.shape != y_dense.shape
    y_full = _gathered(y_par, -1, stride) if sharded_out else y_par
    grad_par = shard(grad, -1, dist.get_world_size(), dist.get_rank(), stride=stride) if sharded_out else grad
    y_par.backward(grad_par)
    torch.testing.assert_close(y_full, y_dense, **TOL)
    dx = _gathered(x_par.grad, -1) if parallel_input else x_par.grad
    torch.testing.assert_close(dx, x.grad, **TOL)
    torch.testing.assert_close(_gathered(par.weight.data, weight_dim, stride), dense.weight.data, rtol=0, atol=0)
    torch.testing.assert_close(_gathered(par.weight.grad, weight_dim, stride), dense.weight.grad, **TOL)
    if weight_dim == 0:
        torch.testing.assert_close(_gathered(par.bias.grad, 0, stride), dense.bias.grad, **TOL)
    else:
        torch.testing.assert_close(par.bias.grad, dense.bias.grad, **TOL)


def _check_embedding(tp: int):
    vocab, padded, h = 250, 256 * tp, 12
    make = lambda g: VocabParallelEmbedding(padded, h, g, real_vocab=vocab, padding_idx=0)
    dense, par = _pair(make)
    ids = torch.randint(0, vocab, (3, 9))
    ids[0, -3:] = 0
    y_dense, y_par = dense(ids), par(ids)
    grad = torch.randn_like(y_dense)
    y_dense.backward(grad)
    y_par.backward(grad)
    torch.testing.assert_close(y_par, y_dense, **TOL)
    torch.testing.assert_close(_gathered(par.weight.grad, 0), dense.weight.grad, **TOL)
    assert dense.weight.grad[0].abs().max() == 0, "the padding row must get no gradient from lookups"
    assert dense.weight.data[vocab:].abs().max() == 0, "padded rows must start at zero"


def _check_cross_entropy(tp: int):
    vocab, padded, n = 300, 128 * tp * 3, 10
    torch.manual_seed(3)
    logits = torch.randn(n, padded) * 3
    target = torch.randint(0, vocab, (n,))
    ref_logits = logits[:, :vocab].clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_logits, target, reduction="none")
    shard = logits.chunk(tp, -1)[dist.get_rank()].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(shard, target, vocab, dist.group.WORLD)
    weights = torch.rand(n)
    (ref * weights).sum().backward()
    (loss * weights).sum().backward()
    torch.testing.assert_close(loss, ref, **TOL)
    full_grad = _gathered(shard.grad, -1)
    torch.testing.assert_close(full_grad[:, :vocab], ref_logits.grad, **TOL)
    assert full_grad[:, vocab:].abs().max() == 0, "padded columns must get no gradient"
    pred = vocab_parallel_argmax(shard.detach(), vocab, dist.group.WORLD)
    assert torch.equal(pred, logits[:, :vocab].argmax(-1))
    masked = mask_padded_vocab(shard.detach(), vocab, dist.group.WORLD)
    assert torch.isinf(_gathered(masked, -1)[:, vocab:]).all()
    for offset, spread in LARGE_LOGITS:
        _check_large_logits(tp, offset, spread)


# Shifted far past exp's float32 range (88) both ways, and spread wide within a row: a
# log-sum-exp without the max subtraction gives inf or nan on all of these.
LARGE_LOGITS = [(1000.0, 3.0), (-1000.0, 3.0), (0.0, 100.0), (500.0, 100.0)]


def _check_large_logits(tp: int, offset: float, spread: float):
    vocab, padded, n = 300, 128 * tp * 3, 12
    gen = torch.Generator().manual_seed(17)
    logits = torch.randn(n, padded, generator=gen) * spread + offset
    target = torch.randint(0, vocab, (n,), generator=gen)
    target[0] = logits[0, :vocab].argmax()  # one near-zero loss, one typical, the rest large
    ref_logits = logits[:, :vocab].clone().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(ref_logits, target, reduction="none")
    group, rank = (dist.group.WORLD, dist.get_rank()) if tp > 1 else (None, 0)
    part = logits.chunk(tp, -1)[rank].clone().requires_grad_(True)
    loss = vocab_parallel_cross_entropy(part, target, vocab, group)
    loss.sum().backward()
    ref.sum().backward()
    assert torch.isfinite(loss).all(), f"offset {offset}, spread {spread}: loss {loss}"
    torch.testing.assert_close(loss, ref, **TOL, msg=lambda m: f"offset {offset}, spread {spread}: {m}")
    full_grad = _gathered(part.grad, -1) if tp > 1 else part.grad
    torch.testing.assert_close(full_grad[:, :vocab], ref_logits.grad, **TOL)


def _check_mappings():
    x = torch.randn(4, 6, requires_grad=True)
    y = copy_to_tp(x, dist.group.WORLD)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, dist.get_world_size()))


def _run(tp: int):
    h, inter, heads = 16, 32, 4
    _check_linear(lambda g: ColumnParallelLinear(h, inter, g), (3, 5, h), parallel_input=False, weight_dim=0)
    _check_linear(lambda g: ColumnParallelLinear(h, 3 * h, g, stride=3), (3, 5, h), parallel_input=False,
                  weight_dim=0, stride=3)
    _check_linear(lambda g: ColumnParallelLinear(h, inter, g, gather_output=True), (2, 4, h),
                  parallel_input=False, weight_dim=0)
    _check_linear(lambda g: RowParallelLinear(inter, h, g), (3, 5, inter), parallel_input=True, weight_dim=1)
    _check_linear(lambda g: RowParallelLinear(inter, h, g, input_is_parallel=False), (3, 5, inter),
                  parallel_input=False, weight_dim=1)
    _check_embedding(tp)
    _check_cross_entropy(tp)
    _check_mappings()
    assert heads % tp == 0


@pytest.mark.parametrize("tp", [2, 4])
def test_parallel_layers_match_dense(tp):
    spawn(_run, tp, tp)


@pytest.mark.parametrize("offset, spread", LARGE_LOGITS)
def test_cross_entropy_is_stable_for_large_logits_at_tp1(offset, spread):
    _check_large_logits(1, offset, spread)
