"""Our MegatronBert at TP=1, 2, 4 is `transformers.MegatronBertForPreTraining`, forward and backward."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from transformers import MegatronBertConfig, MegatronBertForPreTraining

from mbert_train.batch import Packing
from mbert_train.model import MegatronBert, ModelConfig
from mbert_train.model.attention import CoreAttention
from mbert_train.model.weights import full_state_dict, full_to_hf, hf_to_full, shard_state_dict
from mbert_train.parallel.mappings import gather_from_tp
from tests.dist import spawn

VOCAB = 301  # not a multiple of 128 x TP: exercises vocab padding
TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)


def small_config(dropout: float = 0.0) -> ModelConfig:
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                       max_position_embeddings=32, layer_norm_eps=1e-5, initializer_range=0.2, hidden_dropout=dropout,
                       attention_dropout=dropout)


def perturb_(model: torch.nn.Module) -> torch.nn.Module:
    """Add noise to every parameter. At init every bias is zero and every LayerNorm the identity,
    which hides a layer that adds its bias on every TP rank or drops a LayerNorm's affine part."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def reference_model(cfg: ModelConfig) -> MegatronBertForPreTraining:
    torch.manual_seed(0)
    hf_cfg = MegatronBertConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures",)})
    return perturb_(MegatronBertForPreTraining(hf_cfg).float())


def make_batch(cfg: ModelConfig, b: int = 3, s: int = 12) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, cfg.vocab_size, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 8:] = 0
    ids[1, 8:] = cfg.pad_token_id
    labels = torch.full((b, s), -100)
    pick = (torch.rand(b, s, generator=g) < 0.3) & mask.bool()
    pick[:, 1] = True
    labels[pick] = torch.randint(0, cfg.vocab_size, (int(pick.sum()),), generator=g)
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, s // 2:] = 1
    return dict(input_ids=ids, token_type_ids=types, attention_mask=mask, mlm_labels=labels,
                nsp_labels=torch.tensor([0, 1, 1])[:b])


def full_vocab_logits(model, logits: torch.Tensor) -> torch.Tensor:
    """(..., V) logits from the vocab shards (..., V_pad/tp) every TP rank holds (a MegatronBert or
    a ModernBert)."""
    return gather_from_tp(logits, model.group)[..., : model.cfg.vocab_size]


def ours_from_reference(ref, cfg, group, **kw) -> MegatronBert:
    model = MegatronBert(cfg, group, **kw)
    model.load_state_dict(shard_state_dict(hf_to_full(ref.state_dict(), cfg), model))
    return model


def full_grads_as_hf(model: MegatronBert) -> dict:
    grads = {n: p.grad for n, p in model.named_parameters()}
    return full_to_hf(full_state_dict(model, grads), model.cfg)


def check_against_reference(group) -> None:
    cfg = small_config()
    ref = reference_model(cfg)
    batch = make_batch(cfg)
    out_ref = ref(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                  attention_mask=batch["attention_mask"], labels=batch["mlm_labels"],
                  next_sentence_label=batch["nsp_labels"])
    out_ref.loss.backward()
    labels = batch["mlm_labels"].view(-1)
    ref_mlm = torch.nn.functional.cross_entropy(out_ref.prediction_logits.view(-1, VOCAB), labels)
    ref_nsp = torch.nn.functional.cross_entropy(out_ref.seq_relationship_logits, batch["nsp_labels"])

    full_decoder = ours_from_reference(ref, cfg, group, mlm_masked_only=False)
    out = full_decoder(**batch)
    out.loss.backward()
    torch.testing.assert_close(full_vocab_logits(full_decoder, out.mlm_logits), out_ref.prediction_logits, **TOL)
    torch.testing.assert_close(out.nsp_logits, out_ref.seq_relationship_logits, **TOL)
    torch.testing.assert_close(out.loss, out_ref.loss, **TOL)
    torch.testing.assert_close(out.mlm_loss, ref_mlm, **TOL)
    torch.testing.assert_close(out.nsp_loss, ref_nsp, **TOL)
    grads = full_grads_as_hf(full_decoder)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    assert set(grads) == set(ref_grads) - {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **GRAD_TOL, msg=lambda m: f"{name}: {m}")

    masked_only = ours_from_reference(ref, cfg, group, mlm_masked_only=True)
    out_m = masked_only(**batch)
    out_m.loss.backward()
    torch.testing.assert_close(out_m.loss, out.loss, **TOL)
    selected = batch["mlm_labels"] != -100
    torch.testing.assert_close(full_vocab_logits(masked_only, out_m.mlm_logits),
                               full_vocab_logits(full_decoder, out.mlm_logits)[selected], **TOL)
    for name, g in full_grads_as_hf(masked_only).items():
        torch.testing.assert_close(g, grads[name], **GRAD_TOL, msg=lambda m: f"masked-only {name}: {m}")


def dropout_loss(group, *, checkpointing: bool = False, tp_invariant: bool = True):
    cfg = dataclasses.replace(small_config(dropout=0.1), tp_invariant_dropout=tp_invariant)
    torch.manual_seed(5)
    model = MegatronBert(cfg, group, activation_checkpointing=checkpointing).train()
    torch.manual_seed(9)
    out = model(**make_batch(cfg))
    out.loss.backward()
    return out.loss.detach(), full_state_dict(model, {n: p.grad for n, p in model.named_parameters()})


def check_dropout(group) -> None:
    # TP-invariant masks: TP=N drops exactly what TP=1 drops.
    loss_tp1, _ = dropout_loss(None)
    loss_tp, grads = dropout_loss(group)
    torch.testing.assert_close(loss_tp, loss_tp1, **TOL)
    # Both modes: recomputation under activation checkpointing redraws the same masks.
    for tp_invariant in (True, False):
        loss, grads = dropout_loss(group, tp_invariant=tp_invariant)
        loss_ckpt, grads_ckpt = dropout_loss(group, checkpointing=True, tp_invariant=tp_invariant)
        assert torch.equal(loss_ckpt, loss)
        for name, g in grads.items():
            torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


def per_rank_streams_main():
    """Default dropout: TP ranks draw different attention masks, from streams that do not
    disturb the replicated one (the default generator advances alike on every rank)."""
    from mbert_train.parallel.random import local_dropout_keep

    torch.manual_seed(3)
    keep = local_dropout_keep((2, 3, 16, 16), 0.5, dist.group.WORLD, torch.device("cpu"))
    after = torch.rand(4)
    masks = [torch.empty_like(keep) for _ in range(dist.get_world_size())]
    dist.all_gather(masks, keep)
    afters = [torch.empty_like(after) for _ in range(dist.get_world_size())]
    dist.all_gather(afters, after)
    assert not torch.equal(masks[0], masks[1])
    assert all(torch.equal(a, afters[0]) for a in afters)
    assert 0.3 < keep.float().mean().item() < 0.7


def test_dropout_streams_differ_per_tp_rank():
    spawn(per_rank_streams_main, 2)


class NestedOnCPU(CoreAttention):
    """The dispatch as on CUDA for packed batches: SDPA on nested jagged tensors (here through
    torch's CPU math backend, dropout 0)."""

    def __call__(self, qkv, layout, rows=None, *, training):
        if isinstance(layout, Packing):
            return self.packed_sdpa(qkv, layout, rows, 0.0)
        return super().__call__(qkv, layout, rows, training=training)


def check_packed(group) -> None:
    """Batches with padding run packed (the real tokens end to end, `unpad=True`, the default)
    with the collator's packing: the same losses, logits and gradients as the padded path,
    within 1e-5, through each attention path: the blockwise kernel without dropout and with
    dropout 1e-9 (which rounds to dropping nothing), and SDPA on nested jagged tensors (what
    CUDA runs; the padded path then runs SDPA with a mask)."""
    for dropout, attention in ((0.0, CoreAttention), (1e-9, CoreAttention), (0.0, NestedOnCPU)):
        cfg = small_config(dropout)
        ref = reference_model(cfg)
        batch = make_batch(cfg, b=4, s=16)
        lengths = torch.tensor([16, 9, 12, 5])
        real = torch.arange(16)[None] < lengths[:, None]
        batch["attention_mask"] = real.long()
        batch["input_ids"][~real] = cfg.pad_token_id
        batch["mlm_labels"][~real] = -100
        batch["mlm_labels"][3] = -100  # a sample with nothing masked still feeds the NSP head
        batch["nsp_labels"] = torch.tensor([0, 1, 1, 0])
        batch["packing"] = Packing.from_masks(batch["attention_mask"], batch["mlm_labels"])
        results = []
        for unpad in (False, True):
            model = ours_from_reference(ref, cfg, group, unpad=unpad).train()
            for layer in model.layers:
                layer.attn.core = attention(dropout, model.tp)
            seen = []
            model.layers[0].register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
            out = model(**batch)
            out.loss.backward()
            assert seen == [(1, int(lengths.sum()), cfg.hidden_size) if unpad else (4, 16, cfg.hidden_size)]
            results.append((out, {n: p.grad for n, p in model.named_parameters()}))
        (padded, grads), (packed, packed_grads) = results
        for field in ("loss", "mlm_loss", "nsp_loss", "mlm_logits", "nsp_logits"):
            torch.testing.assert_close(getattr(packed, field), getattr(padded, field), **TOL, msg=field)
        assert packed.mlm_correct == padded.mlm_correct and packed.mlm_count == padded.mlm_count
        for name, g in grads.items():
            torch.testing.assert_close(packed_grads[name], g, **TOL, msg=lambda m: f"{name}: {m}")


def _ranks_main():
    check_against_reference(dist.group.WORLD)
    check_dropout(dist.group.WORLD)
    check_packed(dist.group.WORLD)


def test_tp1_matches_reference():
    check_against_reference(None)


def test_tp1_dropout_and_checkpointing():
    check_dropout(None)


def test_tp1_packed_batches_match_the_padded_path():
    check_packed(None)


def test_dropout_changes_the_loss():
    cfg = small_config(dropout=0.1)
    torch.manual_seed(5)
    model = MegatronBert(cfg)
    batch = make_batch(cfg)
    torch.manual_seed(9)
    train_loss = model(**batch).loss
    model.eval()
    assert not torch.allclose(train_loss, model(**batch).loss)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_reference(tp):
    spawn(_ranks_main, tp)


def test_mlm_only_model_matches_reference_masked_lm():
    from transformers import MegatronBertForMaskedLM

    cfg = dataclasses.replace(small_config(), binary_head=False)
    torch.manual_seed(0)
    hf_cfg = MegatronBertConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    ref = perturb_(MegatronBertForMaskedLM(hf_cfg).float())
    batch = make_batch(cfg)
    out_ref = ref(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                  attention_mask=batch["attention_mask"], labels=batch["mlm_labels"])
    out_ref.loss.backward()
    ours = MegatronBert(cfg)
    ours.load_state_dict(shard_state_dict(hf_to_full(ref.state_dict(), cfg), ours))
    out = ours(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"], batch["mlm_labels"])
    out.loss.backward()
    assert ours.pooler is None and ours.nsp is None and out.nsp_logits is None
    torch.testing.assert_close(out.loss, out_ref.loss, **TOL)
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, g in full_grads_as_hf(ours).items():
        torch.testing.assert_close(g, ref_grads[name], **GRAD_TOL, msg=lambda m: f"{name}: {m}")


def test_last_layer_runs_on_read_positions_only():
    """The masked-only path runs the last layer on [CLS] + masked positions alone: same losses,
    logits at those positions and gradients as the full path, within 1e-5."""
    cfg = small_config()
    ref = reference_model(cfg)
    batch = make_batch(cfg, b=3, s=16)
    batch["mlm_labels"][2] = -100  # a row with nothing masked still feeds the NSP head
    rows, _ = Packing.from_masks(batch["attention_mask"], batch["mlm_labels"]).padded_read_positions()
    assert rows.shape[1] < 16 and torch.equal(rows[:, 0], torch.zeros(3, dtype=torch.long))
    outs, grads = [], []
    for masked_only in (False, True):
        model = ours_from_reference(ref, cfg, None, mlm_masked_only=masked_only)
        out = model(**batch)
        out.loss.backward()
        outs.append(out)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    full, pruned = outs
    torch.testing.assert_close(pruned.loss, full.loss, **TOL)
    torch.testing.assert_close(pruned.mlm_loss, full.mlm_loss, **TOL)
    torch.testing.assert_close(pruned.nsp_logits, full.nsp_logits, **TOL)
    selected = batch["mlm_labels"] != -100
    torch.testing.assert_close(pruned.mlm_logits, full.mlm_logits[selected], **TOL)
    assert pruned.mlm_correct == full.mlm_correct and pruned.mlm_count == full.mlm_count
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, **TOL, msg=lambda m: f"{name}: {m}")
