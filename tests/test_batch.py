"""The batch contract (`mbert_train.batch`): the packing says where the real and the read tokens
are; with the collator's packing the model reads nothing back from the device, on the CPU's
path and on the path CUDA runs (SDPA on nested jagged tensors, torch's flash kernel); a plain
padded batch without a packing gives the same results."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import (
    DynamicOutputShapeException,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode

from mbert_train.batch import IGNORE_INDEX, Packing
from mbert_train.model import MegatronBert, blockwise
from mbert_train.parallel.random import replicated_seed
from tests.test_model_reference import TOL, make_batch, small_config


def padded_batch(cfg, lengths=(16, 9, 12, 5), s: int = 16) -> dict:
    """A batch as the collator makes it (packing included): these lengths, the last sample with
    nothing masked."""
    batch = make_batch(cfg, b=len(lengths), s=s)
    real = torch.arange(s)[None] < torch.tensor(lengths)[:, None]
    batch["attention_mask"] = real.long()
    batch["input_ids"][~real] = cfg.pad_token_id
    batch["mlm_labels"][~real] = IGNORE_INDEX
    batch["mlm_labels"][-1] = IGNORE_INDEX
    batch["nsp_labels"] = torch.arange(len(lengths)) % 2
    batch["packing"] = Packing.from_masks(batch["attention_mask"], batch["mlm_labels"])
    return batch


def test_packing_of_a_small_batch():
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    labels = torch.full((3, 4), IGNORE_INDEX)
    labels[0, 0], labels[0, 2], labels[2, 1], labels[2, 2] = 7, 8, 9, 10
    labels[1, 3] = 11  # on padding: never predicted
    p = Packing.from_masks(mask, labels)
    assert p.index.tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 10]
    assert p.starts == (0, 4, 6, 9) and p.offsets.tolist() == list(p.starts)
    assert p.read_rows.tolist() == [0, 2, 4, 6, 7, 8]  # [CLS] (predicted too in sample 0) and the predicted
    assert p.read_starts == (0, 2, 3, 6) and p.read_offsets.tolist() == list(p.read_starts)
    assert p.predicted.tolist() == [0, 1, 4, 5]
    assert p.predicted_positions().tolist() == [0, 2, 9, 10]
    assert labels.view(-1)[p.predicted_positions()].tolist() == [7, 8, 9, 10]
    assert p.padded and p.lengths == (4, 2, 3) and p.read_counts == (2, 1, 3) and p.seq == 4
    rows, slots = p.padded_read_positions()
    assert rows.tolist() == [[0, 2, 0], [0, 0, 0], [0, 1, 2]] and slots.tolist() == [0, 1, 3, 6, 7, 8]
    assert not Packing.from_masks(torch.ones(2, 3), torch.full((2, 3), IGNORE_INDEX)).padded


def fake(mode: FakeTensorMode, value):
    """A batch value as a fake tensor (a packing: its tensors; its ints stay what they are)."""
    if isinstance(value, Packing):
        return dataclasses.replace(value, **{f.name: mode.from_tensor(getattr(value, f.name))
                                             for f in dataclasses.fields(value)
                                             if isinstance(getattr(value, f.name), torch.Tensor)})
    return mode.from_tensor(value)


@pytest.mark.parametrize("unpad,masked_only,checkpointing", [(True, True, False), (True, True, True),
                                                              (False, True, False), (True, False, False)],
                         ids=["packed", "packed-checkpointed", "padded", "full-decoder"])
def test_training_step_reads_nothing_back_from_the_device(monkeypatch, unpad, masked_only, checkpointing):
    """Fake tensors have no data: any read-back (`.item()`, `.tolist()`, `nonzero`, a boolean
    index, `bool(t)`) raises. With the collator's packing a training forward and backward, dropout
    on, needs none. The blockwise kernel's seed is one draw of the CPU generator, a host value
    that is no read-back of a device; it is drawn outside the fake mode."""
    def host_draw() -> int:
        with unset_fake_temporarily():
            return replicated_seed()

    monkeypatch.setattr(blockwise, "replicated_seed", host_draw)
    cfg = small_config(dropout=0.1)
    batch = padded_batch(cfg)
    with FakeTensorMode() as mode:
        model = MegatronBert(cfg, activation_checkpointing=checkpointing, mlm_masked_only=masked_only,
                             unpad=unpad).train()
        out = model(**{k: fake(mode, v) for k, v in batch.items()})
        out.loss.backward()
    assert model.packs(batch["packing"]) == unpad
    assert out.mlm_count.shape == () and all(p.grad is not None for p in model.parameters())
    with pytest.raises(DynamicOutputShapeException), FakeTensorMode() as mode:  # the probe: a read-back fails
        mode.from_tensor(batch["attention_mask"]).nonzero()


class FlashCalls(TorchDispatchMode):
    """Records (query tokens, key tokens, longest query run, longest key run) of each call of
    torch's flash attention kernel."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._flash_attention_forward.default:
            self.calls.append((args[0].shape[0], args[1].shape[0], args[5], args[6]))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointed"])
def test_cuda_path_runs_packed_through_flash_attention(checkpointing):
    """The dispatch on an accelerator, traced on the meta device (no data, so no read-back can
    pass) under torch's FLOP counter, for which torch picks its flash kernel as on a GPU: each
    layer's attention is one varlen flash call over the T packed tokens (the last layer's
    queries: the M read tokens), forward and backward; nothing is padded again. Activation
    checkpointing recomputes them, last layer first."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = small_config(dropout=0.1)
    batch = padded_batch(cfg)
    packing = batch["packing"]
    with torch.device("meta"):
        model = MegatronBert(cfg, activation_checkpointing=checkpointing).train()
    for layer in model.layers:  # CUDA draws it on the TP rank's CUDA stream; meta has none
        layer.attn.core.sdpa_dropout = lambda q, k, v, mask, p, group: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p)
    with FlopCounterMode(display=False) as counter, FlashCalls() as flash:
        out = model(**{k: v.to("meta") for k, v in batch.items()})
        out.loss.backward()
    t, m = packing.starts[-1], packing.read_starts[-1]
    longest = max(packing.lengths)
    forward = [(t, t, longest, longest)] * (cfg.num_layers - 1) + [(m, t, max(packing.read_counts), longest)]
    assert flash.calls == forward + (forward[::-1] if checkpointing else [])
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert "aten._flash_attention_backward" in ops and "aten.bmm" not in ops
    assert out.loss.device.type == "meta"


@pytest.mark.parametrize("masked_only", [True, False], ids=["masked-only", "full-decoder"])
def test_a_batch_without_packing_gives_the_same_results(masked_only):
    """Users, exports and evaluations may pass input_ids, attention_mask and labels alone: the
    model then works the packing out itself, to the same losses, logits and gradients."""
    cfg = small_config()
    batch = padded_batch(cfg)
    results = []
    for with_packing in (True, False):
        torch.manual_seed(0)
        model = MegatronBert(cfg, mlm_masked_only=masked_only).train()
        out = model(**(batch if with_packing else {k: v for k, v in batch.items() if k != "packing"}))
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (out, grads), (plain, plain_grads) = results
    for field in ("loss", "mlm_loss", "nsp_loss", "mlm_logits", "nsp_logits", "mlm_count", "mlm_correct"):
        torch.testing.assert_close(getattr(plain, field), getattr(out, field), **TOL, msg=field)
    for name, g in grads.items():
        torch.testing.assert_close(plain_grads[name], g, **TOL, msg=name)
