"""model.arch=modernbert: our ModernBert at TP=1, 2, 4 (sequence parallelism on and off; padded and
packed batches) is `transformers.ModernBertForMaskedLM`, forward and backward, at a length above
the local window; its sparse head (masked positions only) gives the reference's dense loss."""

import dataclasses

import pytest
import torch
import torch.distributed as dist
from transformers import ModernBertConfig, ModernBertForMaskedLM

from mbert_train.config import compose_config
from mbert_train.model import ModelConfig, ModernBert, build_model
from mbert_train.model.modernbert_hf import (
    config_from_hf,
    full_to_hf,
    hf_config,
    hf_to_full,
    load_hf_state_dict,
)
from mbert_train.model.weights import full_shapes, full_state_dict
from mbert_train.parallel.context import TPContext
from tests.dist import spawn
from tests.test_model_reference import full_vocab_logits
from tests.train_util import losses, train

VOCAB = 301  # not a multiple of 128 x TP: exercises vocab padding
SEQ = 24  # above the local window (+-4 tokens), divisible by TP=2 and 4 for sequence parallelism
TOL = {"rtol": 1e-5, "atol": 1e-5}


def small_config(dropout: float = 0.0, **changes) -> ModelConfig:
    """4 layers: global, local, local, global (the presets' last layer is global too)."""
    fields = {"arch": "modernbert", "binary_head": False, "vocab_size": VOCAB, "hidden_size": 64, "num_layers": 4,
              "num_heads": 4, "intermediate_size": 96, "max_position_embeddings": 64, "layer_norm_eps": 1e-5,
              "initializer_range": 0.2, "hidden_dropout": dropout, "attention_dropout": dropout, "pad_token_id": 2,
              "global_attn_every_n_layers": 3, "local_attention": 8}
    return ModelConfig(**{**fields, **changes})


def reference_model(cfg: ModelConfig) -> ModernBertForMaskedLM:
    """The reference, with noise on every parameter (at init the norms are the identity and the
    decoder bias zero, which would hide a dropped affine or a bias added on every TP rank)."""
    torch.manual_seed(0)
    hf_cfg = ModernBertConfig(**{k: v for k, v in hf_config(cfg).items() if k != "architectures"},
                              attn_implementation="eager")
    model = ModernBertForMaskedLM(hf_cfg).float()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def make_batch(cfg: ModelConfig, lengths=(24, 15, 20, 7)) -> dict:
    b = len(lengths)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (b, SEQ), generator=g)
    real = torch.arange(SEQ)[None] < torch.tensor(lengths)[:, None]
    ids[~real] = cfg.pad_token_id
    labels = torch.full((b, SEQ), -100)
    pick = (torch.rand(b, SEQ, generator=g) < 0.3) & real
    pick[:, 1] = pick[:, SEQ - 1] = True
    pick &= real
    labels[pick] = torch.randint(0, cfg.vocab_size, (int(pick.sum()),), generator=g)
    return {"input_ids": ids, "attention_mask": real.long(), "mlm_labels": labels}


def ours_from_reference(ref, cfg, tp, **kw) -> ModernBert:
    model = build_model(cfg, tp, **kw)
    load_hf_state_dict(model, ref.state_dict())
    return model


def grads_as_hf(model: ModernBert) -> dict:
    return full_to_hf(full_state_dict(model, {n: p.grad for n, p in model.named_parameters()}), model.cfg)


def assert_grads_equal(grads: dict, ref_grads: dict, what: str) -> None:
    assert set(grads) == set(ref_grads), (what, set(grads) ^ set(ref_grads))
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], **TOL, msg=f"{what} {name}")


def check_against_reference(tp, cfg: ModelConfig | None = None, lengths=(24, 15, 20, 7)) -> None:
    """Dense head, sparse head padded and (without SP) packed: the reference's logits, loss and
    gradients within 1e-5."""
    cfg = cfg or small_config()
    ref = reference_model(cfg)
    batch = make_batch(cfg, lengths)
    out_ref = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["mlm_labels"])
    out_ref.loss.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    real = batch["attention_mask"].bool()

    dense = ours_from_reference(ref, cfg, tp, mlm_masked_only=False)
    out = dense(**batch)
    out.loss.backward()
    torch.testing.assert_close(full_vocab_logits(dense, out.mlm_logits)[real], out_ref.logits[real], **TOL)
    torch.testing.assert_close(out.loss, out_ref.loss, **TOL)
    assert_grads_equal(grads_as_hf(dense), ref_grads, "dense head")

    selected = batch["mlm_labels"] != -100
    ctx = TPContext.of(tp)
    packs = not (ctx.sp or ctx.invariant_dropout) and not bool(real.all())
    for unpad in (False, True) if packs else (False,):
        sparse = ours_from_reference(ref, cfg, tp, unpad=unpad)
        seen: list[tuple] = []
        sparse.layers[0].register_forward_hook(lambda mod, args, out, seen=seen: seen.append(tuple(args[0].shape)))
        out_s = sparse(**batch)
        out_s.loss.backward()
        rows = int(real.sum()) if unpad else SEQ // ctx.size if ctx.sp else SEQ
        assert seen == [(1 if unpad else len(lengths), rows, cfg.hidden_size)]
        torch.testing.assert_close(out_s.loss, out_ref.loss, **TOL)
        torch.testing.assert_close(full_vocab_logits(sparse, out_s.mlm_logits), out_ref.logits[selected], **TOL)
        assert out_s.mlm_count == int(selected.sum())
        assert out_s.mlm_correct == (out_ref.logits[selected].argmax(-1) == batch["mlm_labels"][selected]).sum()
        assert_grads_equal(grads_as_hf(sparse), ref_grads, f"sparse head unpad={unpad}")


def dropout_loss(tp, *, checkpointing: bool = False, tp_invariant: bool = True, unpad: bool = True):
    cfg = small_config(dropout=0.1, tp_invariant_dropout=tp_invariant)
    if not isinstance(tp, TPContext):
        tp = TPContext(tp, invariant_dropout=tp_invariant)
    torch.manual_seed(5)
    model = ModernBert(cfg, tp, activation_checkpointing=checkpointing, unpad=unpad).train()
    torch.manual_seed(9)
    out = model(**make_batch(cfg))
    out.loss.backward()
    return out.loss.detach(), full_state_dict(model, {n: p.grad for n, p in model.named_parameters()})


def assert_close_grads(a: dict, b: dict, **tol) -> None:
    for name, g in a.items():
        torch.testing.assert_close(b[name], g, **tol, msg=name)


def check_dropout(group) -> None:
    """TP-invariant masks: TP=N (SP on and off) drops what TP=1 drops; in both modes recomputation
    under activation checkpointing redraws the same masks."""
    loss_tp1, grads_tp1 = dropout_loss(None)
    for sp in (False, True):
        loss, grads = dropout_loss(TPContext(group, sequence_parallel=sp, invariant_dropout=True))
        torch.testing.assert_close(loss, loss_tp1, **TOL)
        assert_close_grads(grads_tp1, grads, rtol=1e-4, atol=1e-6)
    # Invariant masks on the padded layout; per-rank streams packed (TP=1) or under SP.
    for tp_invariant, sp in ((True, False), (False, group is not None)):
        tp = TPContext(group, sequence_parallel=sp, invariant_dropout=tp_invariant)
        loss, grads = dropout_loss(tp, tp_invariant=tp_invariant)
        loss_ckpt, grads_ckpt = dropout_loss(tp, checkpointing=True, tp_invariant=tp_invariant)
        assert torch.equal(loss_ckpt, loss)
        assert_close_grads(grads, grads_ckpt, rtol=1e-6, atol=1e-7)


def _ranks_main():
    group = dist.group.WORLD
    check_against_reference(group)
    check_against_reference(TPContext(group, sequence_parallel=True))
    check_dropout(group)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_reference(tp):
    spawn(_ranks_main, tp)


def test_tp1_matches_reference():
    check_against_reference(None)


def test_tp1_last_layer_local_matches_reference():
    """3 layers: the last one, which runs on the read positions only, is a sliding-window layer."""
    check_against_reference(None, small_config(num_layers=3))


def test_tp1_without_padding_matches_reference():
    check_against_reference(None, lengths=(24, 24))


def test_window_and_rope_bases_matter():
    """The batch is long enough that the window changes the loss, and both RoPE bases are used."""
    batch = make_batch(small_config())
    losses = []
    for changes in ({}, {"local_attention": 64}, {"local_rope_theta": 500.0}, {"global_rope_theta": 500.0}):
        torch.manual_seed(0)
        losses.append(ModernBert(small_config(**changes))(**batch).loss.item())
    assert len(set(losses)) == 4, losses


@pytest.mark.parametrize("s, half", [(50, 4), (7, 4), (64, 8), (33, 2)])
def test_sliding_window_attention_is_the_masked_attention(s, half):
    """The band alone (query blocks of 2 half, each against its window) against SDPA with the
    whole (s, s) window mask, padding included, forward and backward, fp64: lengths that the
    blocks divide and do not, and one shorter than the window."""
    import torch.nn.functional as F

    from mbert_train.model.window import sliding_window_attention

    torch.manual_seed(s)
    b, n, d = 3, 2, 8
    q, k, v = (torch.randn(b, n, s, d, dtype=torch.float64, requires_grad=True) for _ in range(3))
    lengths = torch.tensor([s, max(1, s // 2), 1])
    real = torch.arange(s)[None] < lengths[:, None]  # (b, s)
    pos = torch.arange(s)
    window = (pos[:, None] - pos[None, :]).abs() <= half
    for key_real, mask in ((real, (window & real[:, None, None, :]) | torch.eye(s, dtype=torch.bool)),
                           (None, window)):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = sliding_window_attention(q, k, v, half, key_real)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        weight = torch.randn_like(got) * (real[:, None, :, None] if key_real is not None else 1)
        grads = torch.autograd.grad((got * weight).sum(), (q, k, v))
        for g, e in zip(grads, torch.autograd.grad((expected * weight).sum(), (q, k, v)), strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-12)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_geglu_keeps_autograds_gradients(autocast):
    """GatedDown (the product recomputed in backward) against autograd on the plain ops, bit for
    bit, in fp32 and under bf16 autocast (backward in the forward's dtypes, fp32 weight grads)."""
    import torch.nn.functional as F

    from mbert_train.model.modernbert import GatedDown

    torch.manual_seed(0)
    h = torch.randn(3, 5, 16, requires_grad=True)
    w = torch.randn(6, 8, requires_grad=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        x = h * 1.0  # an op's output, as fc1's is
        act, gate = x.chunk(2, dim=-1)
        expected = F.linear(F.gelu(act) * gate, w)
        got = GatedDown.apply(x, w)
    grad = torch.randn(3, 5, 6).to(got.dtype)
    assert got.dtype == expected.dtype and torch.equal(got, expected)
    for g, e in zip(torch.autograd.grad(got, (h, w), grad, retain_graph=True),
                    torch.autograd.grad(expected, (h, w), grad), strict=True):
        assert g.dtype == e.dtype and torch.equal(g, e)


def test_tp1_dropout():
    check_dropout(None)
    cfg = small_config(dropout=0.1)
    torch.manual_seed(5)
    model = ModernBert(cfg)
    batch = make_batch(cfg)
    train_loss = model(**batch).loss
    model.eval()
    assert not torch.allclose(train_loss, model(**batch).loss)


def test_weights_round_trip():
    """transformers -> ours (full) -> transformers gives every tensor back (the tied decoder
    weight is the embedding's); the full form has the shapes the model's template gives."""
    cfg = small_config()
    hf = reference_model(cfg).state_dict()
    full = hf_to_full(hf, cfg)
    assert {k: v.shape for k, v in full.items()} == full_shapes(cfg)
    back = full_to_hf(full, cfg)
    assert set(hf) - set(back) == {"decoder.weight"} and set(back) <= set(hf)
    for name, tensor in back.items():
        assert torch.equal(tensor, hf[name]), name
    with pytest.raises(ValueError, match="untied"):
        hf_to_full({**hf, "decoder.weight": hf["decoder.weight"] + 1}, cfg)


def test_export_loads_in_transformers(tmp_path):
    """The trainer's Hugging Face export of a ModernBert loads as ModernBertForMaskedLM with no
    missing or unexpected tensors, and computes our logits."""
    from mbert_train.convert.hf import export_hf

    cfg = small_config()
    torch.manual_seed(0)
    ours = ModernBert(cfg, mlm_masked_only=False).eval()
    export_hf(full_state_dict(ours), cfg, tmp_path / "hf")
    ref, info = ModernBertForMaskedLM.from_pretrained(tmp_path / "hf", output_loading_info=True,
                                                      attn_implementation="eager")
    assert not any(info.values()), info
    batch = make_batch(cfg)
    with torch.no_grad():
        logits = full_vocab_logits(ours, ours(**batch).mlm_logits)
        ref_logits = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[real], ref_logits[real], **TOL)


def test_config_round_trip_and_hub_config():
    cfg = small_config()
    assert config_from_hf(hf_config(cfg)) == cfg
    # The Hub's config.json (answerdotai/ModernBERT-base) still has the older rope keys.
    hub = {"model_type": "modernbert", "vocab_size": 50368, "hidden_size": 768, "num_hidden_layers": 22,
           "num_attention_heads": 12, "intermediate_size": 1152, "global_attn_every_n_layers": 3,
           "local_attention": 128, "global_rope_theta": 160000.0, "local_rope_theta": 10000.0, "norm_eps": 1e-05,
           "norm_bias": False, "attention_bias": False, "mlp_bias": False, "pad_token_id": 50283,
           "max_position_embeddings": 8192, "embedding_dropout": 0.0, "mlp_dropout": 0.0, "attention_dropout": 0.0}
    got = config_from_hf(hub)
    assert (got.arch, got.num_layers, got.local_rope_theta, got.pad_token_id) == ("modernbert", 22, 1e4, 50283)
    with pytest.raises(ValueError, match="mlp_bias"):
        config_from_hf({**hub, "mlp_bias": True})


PUBLISHED = {"modernbert-base": (768, 22, 12, 1152), "modernbert-large": (1024, 28, 16, 2624)}


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_presets_are_the_published_configurations(preset):
    """Composed with Hydra, each preset is transformers' ModernBertConfig of that shape (whose
    other defaults are the published ones); the vocabulary and [PAD] come from the dataset, and
    ModernBERT's objective with the preset: MLM only, 30 % masked, no cap per sample."""
    composed = compose_config([f"model={preset}"])
    cfg, data = composed.model, composed.data
    assert cfg.vocab_size is None and cfg.pad_token_id is None
    assert (data.objective, data.masked_lm_prob, data.max_predictions_per_seq) == ("none", 0.3, data.max_seq_length)
    data = compose_config([f"model={preset}", "data.max_seq_length=512", "data.masked_lm_prob=0.2"]).data
    assert (data.masked_lm_prob, data.max_predictions_per_seq) == (0.2, 512)
    ours = ModernBertConfig(**{k: v for k, v in hf_config(dataclasses.replace(cfg, vocab_size=50368, pad_token_id=50283))
                               .items() if k != "architectures"})
    hidden, layers, heads, inter = PUBLISHED[preset]
    published = ModernBertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                 intermediate_size=inter)
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "layer_types", "rope_parameters", "sliding_window", "local_attention", "norm_eps", "norm_bias",
                "attention_bias", "mlp_bias", "decoder_bias", "hidden_activation", "classifier_activation",
                "classifier_bias", "max_position_embeddings", "pad_token_id", "tie_word_embeddings",
                "embedding_dropout", "attention_dropout", "mlp_dropout", "initializer_range",
                "initializer_cutoff_factor"):
        assert getattr(ours, key) == getattr(published, key), key
    assert published.layer_types[:4] == ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_parameter_count_is_transformers(preset):
    """arithmetic.count_parameters (mbert-plan, MFU, the model card) counts what transformers
    builds (on the meta device) and what our model holds (vocabulary padded)."""
    from mbert_train.arithmetic import count_parameters

    cfg = dataclasses.replace(compose_config([f"model={preset}"]).model,
                              vocab_size=50368, pad_token_id=50283)
    with torch.device("meta"):
        ref = ModernBertForMaskedLM(ModernBertConfig(**{k: v for k, v in hf_config(cfg).items()
                                                        if k != "architectures"}))
        ours = ModernBert(cfg)
    assert count_parameters(cfg, vocab_multiple=1).total == sum(p.numel() for p in ref.parameters())
    assert count_parameters(cfg).total == sum(p.numel() for p in ours.parameters())


def test_flops_count_the_window():
    """Sliding-window layers' attention FLOPs stop growing with the sequence past the window; the
    masked-only path counts less than the full one."""
    from mbert_train.arithmetic import model_flops_per_token

    cfg = small_config()
    f = {s: model_flops_per_token(cfg, s) for s in (16, 32)}
    all_global = dataclasses.replace(cfg, global_attn_every_n_layers=1)
    g = {s: model_flops_per_token(all_global, s) for s in (16, 32)}
    assert f[32] - f[16] == 6 * 2 * 64 * 16 * 2  # the two global layers, 16 more keys each
    assert g[32] - g[16] == 6 * 2 * 64 * 16 * 4
    assert model_flops_per_token(cfg, 32, masked_fraction=0.15) < f[32]


def test_modernbert_config_errors():
    with pytest.raises(ValueError, match="binary_head=false"):
        ModelConfig(arch="modernbert")
    with pytest.raises(ValueError, match="model.arch='gpt'"):
        ModelConfig(arch="gpt")
    with pytest.raises(ValueError, match="local_attention=7"):
        small_config(local_attention=7)
    with pytest.raises(ValueError, match="modernbert_hf.py"):
        small_config().to_hf_dict()
    with pytest.raises(ValueError, match="set data.objective=none"):
        compose_config(["model=modernbert-base", "data.objective=nsp"])


MODERN_RUN = ["model=modernbert-base", "model.intermediate_size=96", "model.local_attention=16",
              "trainer.max_steps=4", "trainer.eval_every=0"]


@pytest.mark.slow
def test_mbert_train_runs_modernbert(tmp_path, corpus_cache):
    """`mbert-train model=modernbert-base` (shrunk, sequences of 64 over a 16-token window) trains
    at TP=1 and at TP=2 with sequence parallelism to the same losses, and exports a model that
    transformers loads as ModernBertForMaskedLM."""
    train(tmp_path / "tp1", corpus_cache, MODERN_RUN)
    train(tmp_path / "tp2", corpus_cache, [*MODERN_RUN, "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"],
          nproc=2)
    tp1, tp2 = losses(tmp_path / "tp1"), losses(tmp_path / "tp2")
    assert sorted(tp1) == [1, 2, 3, 4]
    for step, loss in tp1.items():
        assert tp2[step] == pytest.approx(loss, rel=1e-5), step
    model = ModernBertForMaskedLM.from_pretrained(tmp_path / "tp2" / "hf")
    assert model.config.num_hidden_layers == 2 and model.config.layer_types == ["full_attention", "sliding_attention"]


@pytest.mark.parametrize("unpad,masked_only,checkpointing", [(True, True, False), (True, True, True),
                                                              (False, True, False), (True, False, False)],
                         ids=["packed", "packed-checkpointed", "padded", "full-decoder"])
def test_training_step_reads_nothing_back_from_the_device(monkeypatch, unpad, masked_only, checkpointing):
    """As tests/test_batch.py checks MegatronBert's: with the collator's packing a training
    forward and backward of ModernBert (dropout on) runs on fake tensors, where any read-back
    (`.item()`, `.tolist()`, `nonzero`, a boolean index, `bool(t)`) raises. The attention dropout's
    seeds are draws of the CPU generator, host values, drawn outside the fake mode; the
    truncated-normal init (which reads back, once, when the model is built) is a plain normal."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    import mbert_train.model.modernbert as modernbert
    import mbert_train.parallel.random as random_streams
    from mbert_train.batch import Packing
    from mbert_train.parallel.layers import normal_init
    from tests.test_batch import fake

    seed = modernbert.replicated_seed

    def host_draw() -> int:
        with unset_fake_temporarily():
            return seed()

    monkeypatch.setattr(modernbert, "replicated_seed", host_draw)
    monkeypatch.setattr(random_streams, "replicated_seed", host_draw)  # the MLP's dropout stream
    monkeypatch.setattr(modernbert, "trunc_init", normal_init)
    cfg = small_config(dropout=0.1)
    batch = make_batch(cfg)
    batch["packing"] = Packing.from_masks(batch["attention_mask"], batch["mlm_labels"])
    with FakeTensorMode() as mode:
        model = ModernBert(cfg, activation_checkpointing=checkpointing, mlm_masked_only=masked_only,
                           unpad=unpad).train()
        out = model(**{k: fake(mode, v) for k, v in batch.items()})
        out.loss.backward()
    assert model.packs(batch["packing"]) == unpad
    assert out.mlm_count.shape == () and all(p.grad is not None for p in model.parameters())


LONG_RUN = ["model=modernbert-base", "model.intermediate_size=96", "data.max_seq_length=1024",
            "trainer.micro_batch_size=2", "trainer.max_steps=6", "trainer.checkpoint_every=2", "trainer.eval_every=0",
            "trainer.export_hf=false"]
TP2_SP = ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true"]


@pytest.mark.slow
def test_modernbert_at_1024_resumes_exactly_after_sigkill_and_at_tp1(tmp_path, corpus_cache):
    """`mbert-train model=modernbert-base` (shrunk to 2 layers of 64, the published 128-token window)
    at TP=2 with sequence parallelism on sequences of 1024 of the default corpus: SIGKILLed after
    its first checkpoint and started again it continues bit for bit; started from that checkpoint
    at TP=1 it continues within 1e-5."""
    import shutil
    import time

    from tests.train_util import start

    reference = tmp_path / "uninterrupted"
    train(reference, corpus_cache, [*LONG_RUN, *TP2_SP], nproc=2)
    ref = losses(reference)
    assert sorted(ref) == [1, 2, 3, 4, 5, 6]

    killed = tmp_path / "killed"
    run = start(killed, corpus_cache, [*LONG_RUN, *TP2_SP], nproc=2)
    latest = killed / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and run.ranks.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    run.ranks.kill()
    run.result()
    step = int(latest.read_text().strip().removeprefix("step_"))
    assert step in (2, 4), "killed before its last checkpoint"
    train(killed, corpus_cache, [*LONG_RUN, *TP2_SP], nproc=2)
    assert losses(killed) == ref

    tp1 = tmp_path / "tp1"
    shutil.copytree(reference, tp1)
    for later in ("step_00000004", "step_00000006"):
        shutil.rmtree(tp1 / "checkpoints" / later)
    (tp1 / "checkpoints" / "latest").write_text("step_00000002\n")
    proc = train(tp1, corpus_cache, LONG_RUN)
    assert "resharding checkpoint step_00000002" in proc.stdout
    resumed = losses(tp1)
    for s in (3, 4, 5, 6):
        assert resumed[s] == pytest.approx(ref[s], rel=1e-5), s
