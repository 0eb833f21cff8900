"""`dropout_attention` (blockwise CPU attention with dropout) is plain attention with the same
masks, forward and backward; its masks are TP-invariant; `keep_mask` drops at the stated rate.
The dispatch's CUDA path for packed batches (SDPA on nested jagged tensors) is the blockwise
kernel's attention, run on CPU through torch's math backend."""

import math

import pytest
import torch
import torch.nn.functional as F

from mbert_train.batch import Packing
from mbert_train.model import MegatronBert, blockwise
from mbert_train.model.attention import CoreAttention
from mbert_train.model.bert import SelfAttention
from mbert_train.model.blockwise import dropout_attention
from mbert_train.parallel.context import TPContext
from mbert_train.parallel.random import apply_keep, keep_bytes_from_seeds, keep_mask, keep_scale, replicated_seed
from tests.test_model_reference import make_batch, small_config

def drop_mask_from_seeds(seeds, shape, p, device) -> torch.Tensor:
    """Boolean drop-mask (True with probability p) whose slab i comes from a generator seeded seeds[i]."""
    return keep_bytes_from_seeds(seeds, shape, p, device) == 0


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def reference_attention(qkv, mask, p, rows, base, heads_total=None, head_offset=0):
    """Plain torch ops: scores, padding, softmax, the slabs' masks from their seeds, times v."""
    b, s, _, n, d = qkv.shape
    heads_total = heads_total or n
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (b, n, s, d)
    if rows is not None:
        q = q.gather(2, rows[:, None, :, None].expand(b, n, rows.shape[1], d))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (b, n, sq, s)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(qkv.dtype).min)
    probs = scores.softmax(-1)
    first = [base + i * heads_total + head_offset for i in range(b)]
    keep = ~torch.stack([drop_mask_from_seeds(range(f, f + n), probs.shape[1:], p, qkv.device) for f in first])
    ctx = (probs * keep * keep_scale(p)) @ v  # (b, n, sq, d)
    return ctx.transpose(1, 2)  # (b, sq, n, d)


def make_inputs(b, s, n, d, dtype, *, padded: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, s, 3, n, d, generator=g, dtype=dtype)
    mask = None
    if padded:
        lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
        lengths[0] = s  # one full row, the others padded
        lengths[-1] = max(1, s // 3)
        mask = (torch.arange(s)[None] < lengths[:, None]).view(b, 1, 1, s)
    return qkv, mask


def model_rows(b, s, seed: int = 0) -> torch.Tensor:
    """(b, m) query rows as the model's last layer gets them: [CLS] plus the masked positions;
    shorter rows repeat [CLS]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.where(torch.rand(b, s, generator=g) < 0.3, 5, -100)
    labels[-1] = -100  # a row that reads [CLS] only
    return Packing.from_masks(torch.ones(b, s), labels).padded_read_positions()[0]


def run_both(qkv, mask, p, rows, seed=11):
    """Ours and the reference, output and d(qkv) for one random upstream gradient."""
    grad_out = None
    results = []
    for fn in ("ours", "ref"):
        x = qkv.clone().requires_grad_()
        torch.manual_seed(seed)
        if fn == "ours":
            out = dropout_attention(x, mask, p, rows)
        else:
            out = reference_attention(x, mask, p, rows, replicated_seed())  # the draw ours made
        if grad_out is None:
            grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
        out.backward(grad_out)
        results.append((out.detach(), x.grad))
    return results


# (b, s, n, d, block elements): several heads per block with a partial last block, one head per
# block (many blocks), all heads in one block.
SHAPES = [(3, 16, 3, 8, 2 * 16 * 16), (2, 24, 4, 4, 1), (2, 12, 6, 8, 1 << 30), (1, 40, 2, 16, None)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-blk{s[4]}")
@pytest.mark.parametrize("padded", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("with_rows", [False, True], ids=["all", "rows"])
def test_matches_reference_with_the_same_masks(monkeypatch, dtype, shape, padded, with_rows):
    b, s, n, d, block = shape
    if block is not None:
        monkeypatch.setattr(blockwise, "_BLOCK_ELEMENTS", block)
    qkv, mask = make_inputs(b, s, n, d, dtype, padded=padded)
    rows = model_rows(b, s) if with_rows else None
    (out, grad), (out_ref, grad_ref) = run_both(qkv, mask, 0.3, rows)
    assert out.shape == (b, s if rows is None else rows.shape[1], n, d)
    torch.testing.assert_close(out, out_ref, **TOL[dtype])
    torch.testing.assert_close(grad, grad_ref, **TOL[dtype])
    if padded:  # padded keys get no gradient through K or V
        padding = ~mask.view(b, s)
        assert padding.any() and grad[:, :, 1:][padding].abs().max() == 0


def test_rows_with_repeats_and_any_order():
    """The backward sums the queries' gradients into Q even for repeated, unordered rows."""
    qkv, mask = make_inputs(2, 10, 2, 4, torch.float64, padded=True)
    rows = torch.tensor([[3, 0, 3, 9], [7, 7, 1, 2]])
    (out, grad), (out_ref, grad_ref) = run_both(qkv, mask, 0.2, rows)
    torch.testing.assert_close(out, out_ref, **TOL[torch.float64])
    torch.testing.assert_close(grad, grad_ref, **TOL[torch.float64])


def test_dropout_zero_is_sdpa():
    qkv, mask = make_inputs(2, 12, 3, 8, torch.float64, padded=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
    torch.testing.assert_close(dropout_attention(qkv, mask, 0.0), expected, **TOL[torch.float64])


def test_bfloat16_close_to_fp32_reference():
    """Low-precision inputs: softmax in fp32, result within bf16 rounding of the fp32 math."""
    qkv, mask = make_inputs(2, 16, 2, 8, torch.float32, padded=True)
    torch.manual_seed(4)
    out = dropout_attention(qkv.bfloat16(), mask, 0.1)
    torch.manual_seed(4)
    ref = reference_attention(qkv.bfloat16().float(), mask, 0.1, None, replicated_seed())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("with_rows", [False, True], ids=["all", "rows"])
def test_gradcheck(monkeypatch, with_rows):
    monkeypatch.setattr(blockwise, "replicated_seed", lambda: 12345)  # every call: the same masks
    qkv, mask = make_inputs(2, 6, 3, 4, torch.float64, padded=True, seed=3)
    rows = torch.tensor([[0, 2, 5], [0, 1, 3]]) if with_rows else None
    sq = 6 if rows is None else rows.shape[1]
    monkeypatch.setattr(blockwise, "_BLOCK_ELEMENTS", 2 * sq * 6)  # 3 heads: blocks of 2 and 1
    x = qkv.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: dropout_attention(t, mask, 0.4, rows), (x,), eps=1e-6, atol=1e-7)


def test_heads_draw_the_same_masks_on_any_tp_rank():
    """A head's mask depends on its global index, not on which rank holds it: the two halves,
    computed separately with their head offsets, give the all-heads result head by head."""
    n = 6
    qkv, mask = make_inputs(3, 14, n, 4, torch.float64, padded=True)
    rows = model_rows(3, 14, seed=1)
    for r in (None, rows):
        torch.manual_seed(7)
        full = dropout_attention(qkv, mask, 0.5, r, heads_total=n, head_offset=0)
        halves = []
        for offset in (0, n // 2):
            torch.manual_seed(7)
            halves.append(dropout_attention(qkv[:, :, :, offset:offset + n // 2].contiguous(), mask, 0.5, r,
                                            heads_total=n, head_offset=offset))
        torch.testing.assert_close(torch.cat(halves, dim=2), full, rtol=1e-12, atol=1e-12)
        # The offset matters: the second half drawn as heads 0..n/2 gets other masks.
        torch.manual_seed(7)
        wrong = dropout_attention(qkv[:, :, :, n // 2:].contiguous(), mask, 0.5, r, heads_total=n, head_offset=0)
        assert not torch.allclose(wrong, halves[1])


def test_masks_differ_across_heads_samples_and_calls():
    qkv = torch.ones(2, 16, 3, 3, 4, dtype=torch.float64)  # every sample and head alike
    qkv[:, :, 2] = torch.randn(16, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = dropout_attention(qkv, None, 0.5)
    assert not torch.allclose(out[:, :, 0], out[:, :, 1])  # heads
    assert not torch.allclose(out[0], out[1])  # samples (identical inputs)
    assert not torch.allclose(dropout_attention(qkv, None, 0.5), out)  # the next call (step / layer)
    torch.manual_seed(1)
    assert torch.equal(dropout_attention(qkv, None, 0.5), out)  # the same seed


# Statistics and the mask primitives.

@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_mask_rate(p):
    numel = 1 << 22  # the kept fraction's std is < 2.5e-4: a 3e-3 tolerance is > 12 sigma
    keep = keep_mask((numel,), p, generator=torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool and keep.shape == (numel,)
    assert abs(keep.float().mean().item() - (1 - p)) < 3e-3
    for lane in range(4):  # the four 15-bit lanes of each random word are each fair
        assert abs(keep[lane::4].float().mean().item() - (1 - p)) < 6e-3
    drop = drop_mask_from_seeds([5], (1, numel), p, "cpu")
    assert abs(drop.float().mean().item() - p) < 3e-3


def test_keep_mask_seeds():
    def draw(seed):
        return keep_mask((64, 64), 0.3, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    torch.manual_seed(3)
    first = keep_mask((64, 64), 0.3)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((64, 64), 0.3), first)  # the default generator
    assert not torch.equal(keep_mask((64, 64), 0.3), first)  # which advances
    # A slab seeded s is exactly the complement of keep_mask from a generator seeded s.
    drops = drop_mask_from_seeds([1, 2], (2, 64, 64), 0.3, "cpu")
    assert torch.equal(drops[0], ~draw(1)) and torch.equal(drops[1], ~draw(2))
    # Shapes that are not a multiple of four lanes.
    odd = drop_mask_from_seeds([1, 2, 3], (3, 5, 7), 0.3, "cpu")
    assert torch.equal(odd[1], ~keep_mask((5, 7), 0.3, generator=torch.Generator().manual_seed(2)))


def test_keep_scale_and_apply_keep():
    assert keep_scale(0.1) == 32768 / (32768 - 3277)
    assert keep_scale(0.5) == 2.0 and keep_scale(0.0) == 1.0
    keep = keep_mask((1 << 22,), 0.1, generator=torch.Generator().manual_seed(4))
    x = torch.ones(1 << 22, requires_grad=True)
    y = apply_keep(x, keep, 0.1)
    assert abs(y.mean().item() - 1) < 3e-3  # the std of the mean is < 2e-4
    assert torch.equal(y.detach(), torch.where(keep, keep_scale(0.1), 0.0))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())


# The model uses it.

def test_self_attention_trains_through_dropout_attention(monkeypatch):
    """SelfAttention in train mode on CPU is the reference attention with the slabs' masks."""
    cfg = small_config(dropout=0.1)
    torch.manual_seed(0)
    layer = SelfAttention(cfg, TPContext()).train().double()
    monkeypatch.setattr(blockwise, "replicated_seed", lambda: 99)
    b, s, n, d = 2, 10, cfg.num_heads, cfg.head_dim
    x = torch.randn(b, s, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(s)[None] < torch.tensor([[s], [6]])).view(b, 1, 1, s)
    rows = torch.tensor([[0, 3, 4], [0, 5, 9]])
    for r in (None, rows):
        out = layer(x, mask, r)
        ctx = reference_attention(layer.qkv(x).view(b, s, 3, n, d), mask, 0.1, r, 99)
        expected = layer.out(ctx.reshape(b, ctx.shape[1], n * d))
        torch.testing.assert_close(out, expected, **TOL[torch.float64])


def model_loss(seed: int):
    cfg = small_config(dropout=0.1)
    torch.manual_seed(5)
    model = MegatronBert(cfg).train()
    torch.manual_seed(seed)
    out = model(**make_batch(cfg))
    out.loss.backward()
    return out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def test_model_dropout_is_a_function_of_the_seed():
    loss, grads = model_loss(9)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    again, grads_again = model_loss(9)
    assert torch.equal(again, loss)
    for name, g in grads.items():
        assert torch.equal(grads_again[name], g), name
    other, _ = model_loss(10)
    assert not torch.equal(other, loss)


@pytest.mark.parametrize("with_rows", [False, True], ids=["all", "rows"])
def test_packed_samples_are_each_their_own_attention(monkeypatch, with_rows):
    """On a packed batch (padding removed, samples end to end) each sample attends to its own
    tokens only, with the masks it would draw alone as sample i (seed base + i * heads + head):
    output and d(qkv) equal per-sample calls on the unpadded samples."""
    monkeypatch.setattr(blockwise, "_BLOCK_ELEMENTS", 2 * 9 * 9)  # several blocks per sample
    monkeypatch.setattr(blockwise, "replicated_seed", lambda: 77)
    b, s, n, d, p = 3, 9, 3, 4, 0.3
    packing, read = packed_batch(b, s, lengths=[9, 4, 7])
    lengths = torch.tensor(packing.lengths)
    rows = packing.read_rows[None]
    assert packing.starts == (0, 9, 13, 20) and packing.read_starts[-1] == rows.shape[1] == int(read.sum())
    qkv = torch.randn(b, s, 3, n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    packed = qkv.reshape(b * s, 3, n, d)[packing.index][None].requires_grad_()
    out = dropout_attention(packed, packing, p, rows if with_rows else None)
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(6))
    out.backward(grad_out)
    outs, grads, g0 = [], [], 0
    for i in range(b):
        x = qkv[i: i + 1, : lengths[i]].clone().requires_grad_()
        sample_rows = read[i, : lengths[i]].nonzero().view(1, -1) if with_rows else None
        o = dropout_attention(x, None, p, sample_rows, heads_total=n, head_offset=i * n)
        g1 = g0 + o.shape[1]
        o.backward(grad_out[:, g0:g1])
        g0 = g1
        outs.append(o.detach()[0])
        grads.append(x.grad[0])
    assert g0 == out.shape[1]
    torch.testing.assert_close(out.detach()[0], torch.cat(outs), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(packed.grad[0], torch.cat(grads), rtol=1e-12, atol=1e-12)


def packed_batch(b: int, s: int, lengths: list[int], seed: int = 4) -> tuple[Packing, torch.Tensor]:
    """The packing of a batch of these lengths, 40% of the tokens masked, the last sample with
    none (it reads [CLS] only); and its (b, s) read mask."""
    real = torch.arange(s)[None] < torch.tensor(lengths)[:, None]
    labels = torch.where(torch.rand(b, s, generator=torch.Generator().manual_seed(seed)) < 0.4, 5, -100)
    labels[~real] = -100
    labels[-1] = -100
    read = labels != -100
    read[:, 0] = True
    return Packing.from_masks(real.long(), labels), read


@pytest.mark.parametrize("with_rows", [False, True], ids=["all", "rows"])
def test_packed_sdpa_on_nested_tensors_is_the_blockwise_attention(with_rows):
    """What CUDA runs on a packed batch, SDPA on nested jagged tensors, run on CPU (torch's math
    backend) without dropout: the blockwise kernel's output and d(qkv), so each sample attends to
    its own tokens only, and the read rows' queries to all of their sample's keys."""
    b, s, n, d = 4, 11, 2, 8
    packing, _ = packed_batch(b, s, lengths=[11, 3, 7, 1])
    qkv = torch.randn(1, packing.starts[-1], 3, n, d, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(1))
    rows = packing.read_rows[None] if with_rows else None
    core = CoreAttention(0.0, TPContext())
    results = []
    for run in (lambda x: core.packed_sdpa(x, packing, rows, 0.0), lambda x: dropout_attention(x, packing, 0.0, rows)):
        x = qkv.clone().requires_grad_()
        out = run(x)
        out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(2)))
        results.append((out.detach(), x.grad))
    (out, grad), (expected, expected_grad) = results
    assert out.shape == (1, packing.read_starts[-1] if with_rows else packing.starts[-1], n, d)
    torch.testing.assert_close(out, expected, **TOL[torch.float64])
    torch.testing.assert_close(grad, expected_grad, **TOL[torch.float64])


def test_packed_sdpa_with_dropout_drops_at_the_rate():
    """NJT SDPA with dropout on CPU (the math backend draws its own masks): an all-ones V makes
    each output the kept part of a row's probabilities, scaled back: 1 without dropout, about 1
    on average with it."""
    packing, _ = packed_batch(3, 64, lengths=[64, 40, 17])
    qkv = torch.ones(1, packing.starts[-1], 3, 4, 8)
    qkv[:, :, :2] = torch.randn(1, packing.starts[-1], 2, 4, 8, generator=torch.Generator().manual_seed(3))
    core = CoreAttention(0.5, TPContext())
    # CUDA runs it on the TP rank's CUDA stream; the CPU has none.
    core.sdpa_dropout = lambda q, k, v, mask, p, group: F.scaled_dot_product_attention(q, k, v, dropout_p=p)
    torch.manual_seed(0)
    out = core.packed_sdpa(qkv, packing, None, 0.5)
    assert out.shape == (1, packing.starts[-1], 4, 8)
    assert abs(out.mean().item() - 1) < 0.08 and (out - 1).abs().max() > 0.2
