"""Memory planner: exact parameter count, AdamW state bytes, ZeRO/TP sharding, advice, CLI."""

from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch
import transformers

from mbert_train.arithmetic import padded_vocab_size
from mbert_train.model.config import ModelConfig
from mbert_train.plan import (GIB, count_parameters, main, normalize_precision, plan_memory, recommend_layout,
                              run_cli, split_planner_args)

TINY = ModelConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128,
                   max_position_embeddings=64)
BERT_BASE = ModelConfig(vocab_size=30522)
BERT_LARGE = ModelConfig(vocab_size=30522, hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
MEGATRON_1_3B = ModelConfig(vocab_size=30522, hidden_size=2048, num_layers=24, num_heads=32, intermediate_size=8192)
MEGATRON_3_9B = ModelConfig(vocab_size=30522, hidden_size=2560, num_layers=48, num_heads=40, intermediate_size=10240)


def _hf_model(cfg: ModelConfig) -> torch.nn.Module:
    hf = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type")}
    return transformers.MegatronBertForPreTraining(transformers.MegatronBertConfig(**hf))


@pytest.fixture(scope="module", params=[TINY, BERT_BASE], ids=["tiny", "bert-base"])
def reference(request):
    torch.manual_seed(0)
    return request.param, _hf_model(request.param)


def _plan(model=TINY, **kw):
    args = dict(tensor_parallel=1, data_parallel=1, zero_stage=0, micro_batch_size=2, seq_len=64,
                precision="bf16", activation_checkpointing=False)
    return plan_memory(model, **(args | kw))


def test_parameter_count_equals_reference_model(reference):
    cfg, model = reference
    real = sum(p.numel() for p in model.parameters())
    assert count_parameters(cfg, vocab_multiple=1).total == real
    counts = count_parameters(cfg, vocab_multiple=1)
    assert counts.non_embedding == real - cfg.vocab_size * cfg.hidden_size - (
        cfg.max_position_embeddings + cfg.type_vocab_size) * cfg.hidden_size


def test_optimizer_state_bytes_match_a_real_adamw_step(reference):
    cfg, model = reference
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    # fused=True is the fastest CPU path; the state it builds is the same exp_avg/exp_avg_sq.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    opt.step()
    real = sum(t.numel() * t.element_size() for state in opt.state.values()
               for t in state.values() if torch.is_tensor(t))
    plan = _plan(cfg, precision="fp32", seq_len=64)
    assert plan.optimizer_bytes == pytest.approx(real, rel=0.05)
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    assert plan.grad_bytes == pytest.approx(grads, rel=0.05)
    model.zero_grad(set_to_none=True)


def test_vocab_padding_and_tp_shards():
    assert padded_vocab_size(30522, 1) == 30592
    assert padded_vocab_size(30522, 4) == 30720 and padded_vocab_size(30592, 1) == 30592
    h, layers = BERT_BASE.hidden_size, BERT_BASE.num_layers
    for t in (2, 4):
        shard = count_parameters(BERT_BASE, tensor_parallel=t)
        whole = count_parameters(BERT_BASE, tensor_parallel=1, vocab_multiple=128 * t)
        assert shard.word_embeddings * t == padded_vocab_size(30522, t) * h
        replicated = (shard.position_embeddings + shard.token_type_embeddings
                      + layers * (4 * h + 2 * h)  # LayerNorms + row-parallel biases
                      + shard.final_layernorm + shard.pooler + (h * h + 3 * h) + shard.nsp_head)
        assert t * shard.total - (t - 1) * replicated == whole.total
    with pytest.raises(ValueError, match="tensor_parallel=5 must divide"):
        count_parameters(BERT_BASE, tensor_parallel=5)


def test_zero_stages_shard_states_grads_params():
    n = _plan().total_params
    base = {s: _plan(data_parallel=8, zero_stage=s) for s in range(4)}
    assert (base[0].param_bytes, base[0].grad_bytes, base[0].optimizer_bytes) == (2 * n, 2 * n, 12 * n)
    assert base[1].optimizer_bytes == pytest.approx(12 * n / 8, abs=12)
    assert base[1].grad_bytes == 2 * n and base[2].grad_bytes == pytest.approx(2 * n / 8, abs=2)
    assert base[2].param_bytes == 2 * n and base[3].param_bytes == pytest.approx(2 * n / 8, abs=2)
    fp32 = _plan(precision="fp32")
    assert (fp32.param_bytes, fp32.grad_bytes, fp32.optimizer_bytes) == (4 * n, 4 * n, 8 * n)
    assert normalize_precision("bf16-mixed") == "bf16" and normalize_precision("32") == "fp32"
    with pytest.raises(ValueError, match="precision='int8'"):
        _plan(precision="int8")


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_model_states_match_deepspeeds_estimator(zero_stage):
    """DeepSpeed as referee: BERT-large, bf16, 8 GPUs. Its ZeRO-1/2 step builds an fp32 copy of
    the rank's gradient partition (stage_1_and_2.py: `single_grad_partition =
    flat_grad_partition.to(fp32)`), so model states peak at 2 + 18/N bytes per parameter."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p = _plan(BERT_LARGE, data_parallel=8, zero_stage=zero_stage, seq_len=128)
    n = p.total_params
    assert n == pytest.approx(336.3e6, abs=0.05e6)
    _, deepspeed_bytes = estimate_zero2_model_states_mem_needs(total_params=n, num_gpus_per_node=8, num_nodes=1,
                                                               cpu_offload=False)
    assert deepspeed_bytes / GIB == pytest.approx(1.331, abs=5e-4)
    # In the optimizer step both stages hold only the rank's gradient partition (DeepSpeed frees
    # the rest first) plus its fp32 copy: exactly DeepSpeed's estimate, up to rounding of n / 8.
    assert p.step_bytes == pytest.approx(deepspeed_bytes, abs=32)
    assert p.step_grad_bytes == pytest.approx((2 + 4) * n / 8, abs=8)
    if zero_stage == 2:
        assert p.model_state_bytes == p.step_bytes
    else:
        # ZeRO-1 holds every 16-bit gradient through backward, which DeepSpeed's estimate
        # (written for ZeRO-2) leaves out: 2 + 2 + 12/8 bytes per parameter, more than the step.
        assert p.model_state_bytes == p.param_bytes + p.grad_bytes + p.optimizer_bytes == \
            pytest.approx(deepspeed_bytes + 2 * n - 2 * n / 8 - 4 * n / 8, abs=32)
    # The activations are gone by the step: the total is the larger phase, not the sum.
    backward = p.param_bytes + p.grad_bytes + p.optimizer_bytes + p.activation_bytes
    assert p.total_bytes == backward > p.step_bytes
    if zero_stage == 2:  # activations smaller than the fp32 gradient copy: the step is the peak
        short = _plan(BERT_LARGE, data_parallel=8, zero_stage=2, seq_len=8, micro_batch_size=1)
        assert short.total_bytes == short.step_bytes > (short.param_bytes + short.grad_bytes
                                                        + short.optimizer_bytes + short.activation_bytes)


def test_fp32_zero_keeps_a_master_partition_and_steps_on_an_fp32_copy():
    n = _plan().total_params
    fp32 = {s: _plan(precision="fp32", data_parallel=4, zero_stage=s) for s in (0, 1, 2)}
    assert (fp32[0].optimizer_bytes, fp32[0].step_grad_bytes) == (8 * n, 4 * n)  # torch AdamW on the params
    # DeepSpeed clones the partition as its master copy even in fp32 (`.detach().clone()`).
    assert fp32[1].optimizer_bytes == pytest.approx(12 * n / 4, abs=12)
    assert fp32[2].step_grad_bytes == pytest.approx(8 * n / 4, abs=8)


def _with_layers(cfg: ModelConfig, n: int) -> ModelConfig:
    return ModelConfig(**(cfg.to_dict() | {"num_layers": n}))


@pytest.mark.parametrize("t", [1, 2, 4])
def test_activation_bytes_per_layer_follow_korthikanti(t):
    # With TP-invariant masks the model keeps the s x s dropout mask (1 byte), not the paper's
    # softmax output and dropout output as well (its 5as/(ht) term is as/(ht) here).
    cfg = ModelConfig(**(BERT_BASE.to_dict() | {"tp_invariant_dropout": True}))
    s, b, h, a = 512, 4, cfg.hidden_size, cfg.num_heads
    kw = dict(micro_batch_size=b, seq_len=s, tensor_parallel=t)
    one, two = _plan(_with_layers(cfg, 1), **kw), _plan(_with_layers(cfg, 2), **kw)
    per_layer = two.activation_bytes_no_ckpt - one.activation_bytes_no_ckpt
    # Korthikanti et al. 2022, Eq. 2: sbh(10 + 24/t + 5as/(ht)) bytes with 16-bit activations.
    assert per_layer == pytest.approx(s * b * h * (10 + 24 / t + a * s / (h * t)), rel=1e-9)
    if t == 1:
        assert per_layer == s * b * h * (34 + a * s // h)
    # Full recomputation keeps only each layer's 2sbh input.
    assert two.activation_bytes_ckpt - one.activation_bytes_ckpt == 2 * s * b * h
    assert one.activation_bytes_ckpt > one.activation_bytes_no_ckpt - per_layer
    # fp32 activations: 4-byte tensors, dropout masks still 1 byte.
    fp32 = [_plan(_with_layers(cfg, n), precision="fp32", **kw).activation_bytes_no_ckpt for n in (1, 2)]
    assert fp32[1] - fp32[0] == pytest.approx(s * b * h * (18 + 48 / t + a * s / (h * t)), rel=1e-9)
    assert two.activation_bytes == two.activation_bytes_no_ckpt
    assert _plan(_with_layers(cfg, 2), activation_checkpointing=True, **kw).activation_bytes == \
        two.activation_bytes_ckpt


@pytest.mark.parametrize("change", [{"attention_dropout": 0.0}, {"tp_invariant_dropout": False},
                                    {"attention_dropout": 0.0, "tp_invariant_dropout": True}])
def test_fused_attention_drops_the_score_term(change):
    """Fused SDPA (no attention dropout, or dropout on each TP rank's own stream, the default)
    keeps no s x s matrix."""
    s, b, h, a = 512, 4, BERT_BASE.hidden_size, BERT_BASE.num_heads
    fused = ModelConfig(**(BERT_BASE.to_dict() | {"attention_dropout": 0.1} | change))
    one, two = (_plan(_with_layers(fused, n), micro_batch_size=b, seq_len=s) for n in (1, 2))
    assert two.activation_bytes_no_ckpt - one.activation_bytes_no_ckpt == 34 * s * b * h + 4 * a * s * b


def test_tp_communication_volume():
    s, b, h = 128, 2, BERT_BASE.hidden_size
    assert _plan(BERT_BASE, seq_len=s, micro_batch_size=b).tp_comm_bytes_per_step == 0
    kw = dict(seq_len=s, micro_batch_size=b, tensor_parallel=4)
    for ckpt, per_layer in ((False, 4), (True, 6)):
        one = _plan(_with_layers(BERT_BASE, 1), activation_checkpointing=ckpt, **kw)
        two = _plan(_with_layers(BERT_BASE, 2), activation_checkpointing=ckpt, **kw)
        assert two.tp_comm_bytes_per_step - one.tp_comm_bytes_per_step == per_layer * b * s * h * 2
        assert two.tp_wire_bytes_per_step == two.tp_comm_bytes_per_step * 2 * 3 // 4


def test_recommendations():
    base = recommend_layout(BERT_BASE, 16, 8, 16 * GIB, micro_batch_size=8, seq_len=512)
    assert base.fits and base.plan.tensor_parallel == 1 and base.plan.data_parallel == 16
    assert base.plan.zero_stage == 1 and not base.plan.activation_checkpointing
    assert "pure data parallel" in base.reason
    big = recommend_layout(MEGATRON_1_3B, 32, 8, 80 * GIB, micro_batch_size=8, seq_len=512)
    assert big.fits and big.plan.tensor_parallel == 2 and big.plan.data_parallel == 16
    tight = recommend_layout(MEGATRON_3_9B, 8, 8, 32 * GIB, micro_batch_size=16, seq_len=512,
                             sequence_parallel=False)
    assert tight.fits and tight.plan.total_bytes <= tight.usable_bytes
    assert tight.plan.activation_checkpointing
    forced = recommend_layout(MEGATRON_3_9B, 8, 8, 32 * GIB, micro_batch_size=16, seq_len=512,
                              activation_checkpointing=False, sequence_parallel=False)
    assert forced.fits and forced.plan.tensor_parallel > 2 and not forced.plan.activation_checkpointing
    assert "smallest tensor-parallel degree" in forced.reason
    # mbert-train runs ZeRO 0-2 only; a planner for another trainer may allow ZeRO-3.
    assert all(r.plan.zero_stage in (1, 2) for r in (base, big, tight, forced))
    small = dict(micro_batch_size=1, seq_len=128, activation_checkpointing=False)
    zero3 = recommend_layout(MEGATRON_3_9B, 64, 8, 4 * GIB, zero_stages=(1, 2, 3), **small)
    assert zero3.fits and (zero3.plan.tensor_parallel, zero3.plan.zero_stage) == (2, 3)
    without = recommend_layout(MEGATRON_3_9B, 64, 8, 4 * GIB, **small)
    assert without.fits and (without.plan.tensor_parallel, without.plan.zero_stage) == (4, 2)
    single = recommend_layout(BERT_BASE, 1, 1, 80 * GIB, micro_batch_size=8, seq_len=128)
    assert single.plan.data_parallel == 1 and single.plan.zero_stage == 1
    assert "nothing to shard" in single.reason
    hopeless = recommend_layout(MEGATRON_3_9B, 1, 1, 8 * GIB, micro_batch_size=64, seq_len=512)
    assert not hopeless.fits and "does not fit" in hopeless.reason
    with pytest.raises(ValueError, match="multiple of gpus_per_node"):
        recommend_layout(BERT_BASE, 12, 8, 80 * GIB, micro_batch_size=8, seq_len=128)


def _fake_compose(overrides: list[str]) -> SimpleNamespace:
    """Stands in for `mbert_train.config.compose_config` with the attributes the CLI reads."""
    kv = dict(o.split("=", 1) for o in overrides)
    models = {"bert-base": BERT_BASE, "megatron-1.3b": MEGATRON_1_3B}
    return SimpleNamespace(
        model=models[kv.get("model", "bert-base")],
        parallel=SimpleNamespace(tensor_parallel=int(kv.get("parallel.tensor_parallel", 1)),
                                 zero_stage=int(kv.get("parallel.zero_stage", 0)),
                                 sequence_parallel=kv.get("parallel.sequence_parallel") == "true"),
        trainer=SimpleNamespace(micro_batch_size=int(kv.get("trainer.micro_batch_size", 8)),
                                precision="bf16", activation_checkpointing=False),
        data=SimpleNamespace(max_seq_length=512))


def test_cli_splits_planner_keys_and_prints_table():
    own, rest = split_planner_args(["model=megatron-1.3b", "world=32", "gpu_mem_gb=40.5",
                                    "parallel.tensor_parallel=4", "gpus_per_node=4"])
    assert own == {"world": 32, "gpu_mem_gb": 40.5, "gpus_per_node": 4}
    assert rest == ["model=megatron-1.3b", "parallel.tensor_parallel=4"]
    with pytest.raises(ValueError, match="world must be an integer"):
        split_planner_args(["world=many"])
    seen = []
    report = run_cli("model=megatron-1.3b parallel.tensor_parallel=4 parallel.zero_stage=1 "
                     "trainer.micro_batch_size=8 world=32".split(),
                     lambda ov: seen.append(ov) or _fake_compose(ov))
    assert seen == [["model=megatron-1.3b", "parallel.tensor_parallel=4", "parallel.zero_stage=1",
                     "trainer.micro_batch_size=8"]]
    for needle in ("TP=4 x DP=8", "ZeRO-1", "parameters", "gradients", "optimizer states",
                   "activations, no checkpointing", "activations, full checkpointing", "total",
                   "TP all-reduce per micro-batch step", "recommended for world=32",
                   "parallel.tensor_parallel=2"):
        assert needle in report, needle
    with pytest.raises(ValueError, match="world=6 is not divisible"):
        run_cli(["parallel.tensor_parallel=4", "world=6"], _fake_compose)


def test_main_help(capsys):
    main(["--help"])
    assert "gpu_mem_gb" in capsys.readouterr().out


def test_cli_with_the_real_config_tree(capsys):
    main("model=megatron-1.3b parallel.tensor_parallel=4 parallel.zero_stage=1 "
         "trainer.micro_batch_size=8 world=32".split())
    out = capsys.readouterr().out
    assert "TP=4 x DP=8 (world 32), ZeRO-1" in out and "micro-batch 8" in out
    assert "1,281.0M parameters" in out  # 1.3B with the vocab padded to 128 x 4
    for bad, message in (("parallel.zero_stage=5", "must be 0, 1 or 2"),
                         ("model=nope", "Could not find 'model/nope'"), ("world=1.5", "integer")):
        with pytest.raises(SystemExit) as info:
            main([bad])
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and err.count("\n") == 1


@pytest.mark.slow
def test_console_script():
    exe = shutil.which("mbert-plan")
    assert exe, "mbert-plan is not installed; run `pip install -e . --no-deps`"
    done = subprocess.run([exe, "model=bert-base", "world=16", "gpu_mem_gb=24"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "recommended for world=16" in done.stdout and "parallel.tensor_parallel=1" in done.stdout


@pytest.mark.parametrize("t", [2, 4])
def test_sequence_parallel_activations_follow_korthikanti(t):
    """With SP every layer but the last (which runs replicated for the heads) holds
    sbh(10/t + 24/t + as/(ht)) bytes (Korthikanti et al. 2022, Eq. 4, with the 1-byte mask as the
    only s x s term); TP traffic is the same."""
    cfg = ModelConfig(**(BERT_BASE.to_dict() | {"tp_invariant_dropout": True}))
    s, b, h, a = 512, 4, cfg.hidden_size, cfg.num_heads
    kw = dict(micro_batch_size=b, seq_len=s, tensor_parallel=t)
    two, three = (_plan(_with_layers(cfg, n), sequence_parallel=True, **kw) for n in (2, 3))
    per_layer = three.activation_bytes_no_ckpt - two.activation_bytes_no_ckpt
    assert per_layer == pytest.approx(s * b * h * (10 / t + 24 / t + a * s / (h * t)), rel=1e-9)
    off = _plan(_with_layers(cfg, 3), **kw)
    assert three.sequence_parallel and not off.sequence_parallel
    assert three.activation_bytes_no_ckpt < off.activation_bytes_no_ckpt
    assert three.tp_comm_bytes_per_step == off.tp_comm_bytes_per_step
    # Recomputation keeps each SP layer's input chunk: 2sbh/t.
    ckpt = [_plan(_with_layers(cfg, n), sequence_parallel=True, activation_checkpointing=True, **kw)
            for n in (2, 3)]
    assert ckpt[1].activation_bytes_ckpt - ckpt[0].activation_bytes_ckpt == 2 * s * b * h // t
    assert not _plan(cfg, sequence_parallel=True, micro_batch_size=b, seq_len=s).sequence_parallel  # TP=1


def test_sequence_parallel_is_recommended_where_it_changes_what_fits():
    kw = dict(micro_batch_size=16, seq_len=512)
    with_sp = recommend_layout(MEGATRON_3_9B, 8, 8, 32 * GIB, **kw)
    without = recommend_layout(MEGATRON_3_9B, 8, 8, 32 * GIB, sequence_parallel=False, **kw)
    assert with_sp.plan.sequence_parallel and not with_sp.plan.activation_checkpointing
    assert "sequence parallelism" in with_sp.reason
    assert without.plan.activation_checkpointing and not without.plan.sequence_parallel
    assert with_sp.plan.tensor_parallel == without.plan.tensor_parallel == 2
    # Where plain TP fits, SP is not proposed.
    assert not recommend_layout(MEGATRON_3_9B, 8, 8, 80 * GIB, **kw).plan.sequence_parallel
