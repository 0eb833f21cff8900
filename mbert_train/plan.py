"""Per-GPU memory and tensor-parallel traffic of a MegatronBERT (or ModernBERT) layout, and a
layout advisor.

Accounting, all per GPU:

- Parameters are counted exactly as the model holds them (Megatron-LM layout): the word
  embedding and MLM decoder bias are vocab-parallel over a vocabulary padded to a multiple
  of 128 x TP; QKV and MLP-in are column-parallel, attention-out and MLP-out row-parallel
  (their biases replicated); LayerNorms, position/type embeddings, pooler, MLM transform and
  NSP head are replicated on every TP rank.
- Model states count what DeepSpeed allocates (runtime/zero/stage_1_and_2.py). Mixed
  precision keeps 16-bit params and grads and fp32 master weights plus both AdamW moments
  (2 + 2 + 12 bytes per parameter, Rajbhandari et al. 2020, "ZeRO", Sec. 3.1); fp32 keeps
  4 + 4 + 8, plus under ZeRO a 4-byte master copy of the rank's partition (DeepSpeed clones it
  whatever the dtype). ZeRO-1 shards the optimizer states over data parallel, ZeRO-2 also the
  gradients, ZeRO-3 also the parameters. In the optimizer step DeepSpeed frees the gradients
  outside the rank's partition and builds an fp32 copy of the partition's gradients (`flat_grad
  _partition.to(fp32)`, 4 bytes per partitioned parameter) that lives until that group's step
  is done: ZeRO-2 in bf16 peaks at 2 + 18/N bytes per parameter over N data-parallel ranks, what
  DeepSpeed's `estimate_zero2_model_states_mem_needs` says. The activations are freed by then,
  so the total is the larger of the two phases (forward/backward, optimizer step).
- Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", Sec. 4: sbh(10 + 24/t + 5as/(ht)) bytes per layer with 16-bit
  activations and TP without sequence parallelism (sbh(34 + 5as/h) at t=1), generalised
  here to any activation width and MLP width; full recomputation keeps only each layer's
  input (2sbh) plus one layer's working set. The paper's 5as/h score term (softmax output,
  dropout mask and output) is what an explicit softmax keeps; ours never keeps it: by default
  the GPU runs attention and its dropout in fused SDPA (an fp32 log-sum-exp per query and head),
  and with tp_invariant_dropout the blockwise path of `model/blockwise.py` keeps only the
  1-byte dropout mask (as/h).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mbert_train.arithmetic import VOCAB_MULTIPLE, count_parameters, padded_vocab_size
from mbert_train.model.config import ModelConfig
from mbert_train.parallel.layout import model_problem

GIB = 1024**3
TP_MIN_SHARD_WIDTH = 1024
"""Narrowest per-rank hidden slice (h/t) at which TP GEMMs still keep tensor cores busy."""
TP_HIDDEN_THRESHOLD = 2048
"""Below this hidden size TP's per-layer all-reduces cost more than the memory they save."""

_PRECISIONS = {"fp32": "fp32", "32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16",
               "bf16-mixed": "bf16", "fp16": "fp16", "16": "fp16", "float16": "fp16",
               "16-mixed": "fp16", "fp16-mixed": "fp16"}


def normalize_precision(precision: str) -> str:
    """Map spellings such as `bf16-mixed` or `32` to one of `fp32`, `bf16`, `fp16`."""
    try:
        return _PRECISIONS[str(precision).lower()]
    except KeyError:
        raise ValueError(f"precision={precision!r} is not one of fp32, bf16, fp16") from None


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one GPU holds for a layout, and the TP traffic of one micro-batch step."""

    tensor_parallel: int
    """TP degree t (ranks sharing each layer)."""
    data_parallel: int
    """DP degree (replicas, over which ZeRO shards)."""
    zero_stage: int
    """DeepSpeed ZeRO stage 0-3."""
    micro_batch_size: int
    """Sequences per GPU per forward/backward."""
    seq_len: int
    """Tokens per sequence."""
    precision: str
    """Normalised precision: fp32, bf16 or fp16."""
    activation_checkpointing: bool
    """Whether `activation_bytes` and `total_bytes` assume full per-layer recomputation."""
    sequence_parallel: bool
    """Whether the LayerNorm/dropout/residual activations are split over TP (Korthikanti et al.)."""
    total_params: int
    """Parameters of the whole model, padded vocab included."""
    params_per_tp_rank: int
    """Parameters one TP rank owns before any ZeRO-3 sharding."""
    padded_vocab_size: int
    """Vocabulary after padding to a multiple of 128 x TP."""
    param_bytes: int
    """Model weights held (16-bit copy under mixed precision)."""
    grad_bytes: int
    """Gradient buffers held through backward (16-bit under mixed precision)."""
    optimizer_bytes: int
    """AdamW states held: fp32 master copy (mixed precision, or any ZeRO stage) and two moments."""
    step_grad_bytes: int
    """Gradients held during the optimizer step: the rank's partition of `grad_bytes` plus the
    fp32 copy of it DeepSpeed builds for the step (ZeRO >= 1, or mixed precision)."""
    activation_bytes_no_ckpt: int
    """Activations saved for backward of one micro-batch without recomputation."""
    activation_bytes_ckpt: int
    """The same with full activation checkpointing of every layer."""
    tp_comm_bytes_per_step: int
    """Size of all tensors all-reduced over TP in one micro-batch forward+backward."""
    tp_wire_bytes_per_step: int
    """Bytes each GPU sends for those all-reduces with a ring algorithm (2(t-1)/t x size)."""

    @property
    def activation_bytes(self) -> int:
        return self.activation_bytes_ckpt if self.activation_checkpointing else self.activation_bytes_no_ckpt

    @property
    def step_bytes(self) -> int:
        """Model states during the optimizer step (no activations are alive then)."""
        return self.param_bytes + self.step_grad_bytes + self.optimizer_bytes

    @property
    def model_state_bytes(self) -> int:
        """Peak of weights, gradients and optimizer states, over both phases; what DeepSpeed's
        `estimate_zero2_model_states_mem_needs` estimates (without offload)."""
        return max(self.param_bytes + self.grad_bytes + self.optimizer_bytes, self.step_bytes)

    @property
    def total_bytes(self) -> int:
        return max(self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes,
                   self.step_bytes)


def _activation_bytes(model: ModelConfig, *, t: int, b: int, s: int, vocab: int, e: int,
                      checkpointing: bool, sequence_parallel: bool = False) -> int:
    """Korthikanti et al. 2022 Sec. 4, with e-byte activations and 1-byte dropout masks."""
    h, a, i, n = model.hidden_size, model.num_heads, model.intermediate_size, model.num_layers
    sbh = s * b * h
    # Replicated on every TP rank: both LayerNorm inputs (2e), the QKV and MLP inputs (2e)
    # and the two residual dropout masks (2); e=2 gives the paper's 10.
    replicated = sbh * (4 * e + 2)
    # Sharded: Q, K, V and the out-proj input (4e sbh) and GELU input and output (2e sbI);
    # with I=4h and e=2 this is the paper's 24sbh. Attention scores: the paper counts softmax
    # output, dropout mask and dropout output, (2e+1) a s^2 b; the model never keeps them. With
    # `tp_invariant_dropout` it runs the blockwise path of model/blockwise.py, which keeps only
    # the 1-byte dropout mask (a s^2 b). Otherwise the GPU runs attention, dropout included, in
    # fused SDPA (flash / memory-efficient kernels), which keeps only an fp32 log-sum-exp per
    # query and head (4 a s b).
    if model.attention_dropout > 0 and model.tp_invariant_dropout:
        scores = a * s * s * b
    else:
        scores = 4 * a * s * b
    sharded = 4 * e * sbh + 2 * e * s * b * i + scores
    window_mask = 0
    if model.arch == "modernbert":
        # Q and K rotated (RoPE) beside the QKV projection, which V's view keeps (5e sbh), and
        # the out-proj input; GeGLU keeps its input projection (2I wide), the GELU output and the
        # product (4e sbI). With attention dropout off the GPU (or TP-invariant) attention is
        # explicit and keeps the paper's (2e+1) a s^2 b. The sliding-window mask, one bool
        # (b, s, s) per batch, is shared by every layer.
        if model.attention_dropout > 0 and model.tp_invariant_dropout:
            scores = (2 * e + 1) * a * s * s * b
        sharded = 6 * e * sbh + 4 * e * s * b * i + scores
        window_mask = b * s * s
    per_layer = replicated + sharded // t
    # Sequence parallelism splits the replicated part too: sbh(10/t + 24/t + as/(ht)), every
    # layer but the last (which runs replicated, on the positions the heads read).
    sp_layer = (replicated + sharded) // t if sequence_parallel and t > 1 else per_layer
    # Outside the layers: embedding dropout mask, final-LN input, MLM transform input, GELU
    # and LN inputs, then the vocab-parallel logits and the fp32 softmax that the parallel
    # cross-entropy saves for backward.
    head = sbh * (1 + 4 * e) + s * b * vocab // t * (e + 4) + window_mask
    if checkpointing:
        # Each layer keeps only its input (a sequence chunk under SP); backward recomputes one
        # layer at a time.
        inputs = (n - 1) * e * sbh // t + e * sbh if sp_layer != per_layer else n * e * sbh
        return inputs + per_layer + head
    return (n - 1) * sp_layer + per_layer + head


def plan_memory(model: ModelConfig, *, tensor_parallel: int, data_parallel: int, zero_stage: int,
                micro_batch_size: int, seq_len: int, precision: str,
                activation_checkpointing: bool, sequence_parallel: bool = False) -> MemoryPlan:
    """Per-GPU memory of MegatronBERT under TP x DP with ZeRO and AdamW."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage} must be 0, 1, 2 or 3")
    if tensor_parallel < 1 or data_parallel < 1:
        raise ValueError(f"tensor_parallel={tensor_parallel} and data_parallel={data_parallel} must be >= 1")
    if seq_len > model.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds model.max_position_embeddings="
                         f"{model.max_position_embeddings}")
    prec = normalize_precision(precision)
    t, dp = tensor_parallel, data_parallel
    params = count_parameters(model, tensor_parallel=t)
    n = params.total
    mixed = prec != "fp32"
    weight_b, grad_b = (2, 2) if mixed else (4, 4)
    # fp32 master weights: the mixed-precision copy, and DeepSpeed's ZeRO partition clone
    # (`.detach().clone()` even in fp32); fp32 at ZeRO-0 steps the parameters themselves.
    master_b = 4 if mixed or zero_stage > 0 else 0
    optim_b = master_b + 8

    def shard(count: int, stage_needed: int) -> int:
        return math.ceil(count / dp) if zero_stage >= stage_needed else count

    # Optimizer step: the rank's gradient partition (the rest is freed first) and its fp32
    # copy, `single_grad_partition = flat_grad_partition.to(fp32)` in DeepSpeed's ZeRO-1/2 step
    # (ZeRO-3: `_prepare_fp32_grad_for_sub_group`; mixed ZeRO-0: the fp32 gradient buffers).
    step_grads = shard(n, 1) * (grad_b + 4) if master_b else n * grad_b

    e = 2 if mixed else 4
    vocab = padded_vocab_size(model.vocab_size, t)
    sp = sequence_parallel and t > 1
    acts = {ckpt: _activation_bytes(model, t=t, b=micro_batch_size, s=seq_len, vocab=vocab, e=e,
                                    checkpointing=ckpt, sequence_parallel=sp) for ckpt in (False, True)}
    # Megatron TP, per layer: forward all-reduces after attention-out and MLP-out, backward
    # all-reduces before QKV and MLP-in (Shoeybi et al. 2019, Fig. 4): 4 x bsh elements;
    # recomputation repeats the 2 forward ones. Plus the vocab-parallel embedding (forward),
    # the LM-head input (backward), and 3 small fp32 all-reduces of the parallel
    # cross-entropy (max, sum of exp, target logit). Sequence parallelism turns each all-reduce
    # into a reduce-scatter + all-gather of the same size: the same bytes.
    bsh = micro_batch_size * seq_len * model.hidden_size
    per_layer_allreduces = 6 if activation_checkpointing else 4
    comm = (model.num_layers * per_layer_allreduces + 2) * bsh * e + 3 * micro_batch_size * seq_len * 4
    comm = comm if t > 1 else 0
    return MemoryPlan(
        tensor_parallel=t, data_parallel=dp, zero_stage=zero_stage,
        micro_batch_size=micro_batch_size, seq_len=seq_len, precision=prec,
        activation_checkpointing=activation_checkpointing, sequence_parallel=sp,
        total_params=count_parameters(model, tensor_parallel=1, vocab_multiple=VOCAB_MULTIPLE * t).total,
        params_per_tp_rank=n, padded_vocab_size=vocab,
        param_bytes=shard(n, 3) * weight_b, grad_bytes=shard(n, 2) * grad_b,
        optimizer_bytes=shard(n, 1) * optim_b, step_grad_bytes=step_grads,
        activation_bytes_no_ckpt=acts[False], activation_bytes_ckpt=acts[True],
        tp_comm_bytes_per_step=comm, tp_wire_bytes_per_step=comm * 2 * (t - 1) // t)


@dataclass(frozen=True)
class LayoutRecommendation:
    """The layout `recommend_layout` picked, its memory plan and why."""

    plan: MemoryPlan
    """Memory of the recommended layout (its TP, DP, ZeRO stage and checkpointing)."""
    fits: bool
    """Whether `plan.total_bytes` fits in the usable part of one GPU's memory."""
    usable_bytes: int
    """GPU memory the plan may use after the headroom for CUDA context and fragmentation."""
    reason: str
    """One sentence on why this layout was chosen."""


def valid_tensor_parallel(model: ModelConfig, world: int, gpus_per_node: int) -> list[int]:
    """TP degrees that stay within a node and divide world, heads and MLP width."""
    return [t for t in range(1, gpus_per_node + 1)
            if gpus_per_node % t == 0 and world % t == 0 and model_problem(model, t) is None]


def recommend_layout(model: ModelConfig, world: int, gpus_per_node: int, gpu_mem_bytes: int, *,
                     micro_batch_size: int, seq_len: int, precision: str = "bf16",
                     activation_checkpointing: bool | None = None,
                     zero_stages: Sequence[int] = (1, 2), sequence_parallel: bool | None = None,
                     usable_fraction: float = 0.9) -> LayoutRecommendation:
    """Pick TP (within a node), ZeRO stage and recomputation for `world` GPUs.

    TP is used only when it pays: hidden >= 2048, taking the largest t that keeps h/t >=
    1024, or a larger t when nothing fits otherwise. Everything else is DP + ZeRO, trying
    `zero_stages` in order before turning on activation checkpointing, since recomputation
    costs a third more compute on every step while ZeRO-1/2 cost no extra communication
    over plain DP. The default stages are the ones mbert-train's config accepts with mixed
    precision (ZeRO-3 would re-partition the TP shards, and bf16/fp16 need ZeRO >= 1); pass
    (1, 2, 3) to plan for a trainer that has ZeRO-3. `activation_checkpointing` forces recomputation on or off.
    At TP > 1 sequence parallelism is recommended where it changes what fits (it costs no extra
    communication, only smaller kernels): tried after plain TP, before recomputation.
    `sequence_parallel` forces it on or off.
    """
    if not zero_stages:
        raise ValueError("zero_stages must name at least one ZeRO stage")
    if world < 1 or gpus_per_node < 1 or (world > gpus_per_node and world % gpus_per_node):
        raise ValueError(f"world={world} must be a positive multiple of gpus_per_node={gpus_per_node}")
    node = min(gpus_per_node, world)
    candidates = valid_tensor_parallel(model, world, node)
    h = model.hidden_size
    wide = [t for t in candidates if h // t >= TP_MIN_SHARD_WIDTH]
    preferred = max(wide) if h >= TP_HIDDEN_THRESHOLD and wide else 1
    usable = int(gpu_mem_bytes * usable_fraction)
    ckpt_options = [False, True] if activation_checkpointing is None else [activation_checkpointing]
    plan: MemoryPlan | None = None
    for t in [preferred] + [c for c in candidates if c > preferred]:
        dp = world // t
        # At DP=1 there is nothing to shard: every stage holds the same bytes.
        stages = list(zero_stages)[:1] if dp == 1 else list(zero_stages)
        sp_options = [False] if t == 1 else [False, True] if sequence_parallel is None else [sequence_parallel]
        for ckpt in ckpt_options:
            for sp in sp_options:
                for stage in stages:
                    plan = plan_memory(model, tensor_parallel=t, data_parallel=dp, zero_stage=stage,
                                       micro_batch_size=micro_batch_size, seq_len=seq_len, precision=precision,
                                       activation_checkpointing=ckpt, sequence_parallel=sp)
                    if plan.total_bytes <= usable:
                        return LayoutRecommendation(plan, True, usable, _why(plan, preferred, h))
    # TP=1 is always a candidate, so the loop ran; `plan` is the most frugal layout tried.
    return LayoutRecommendation(
        plan, False, usable,
        f"does not fit even at TP={plan.tensor_parallel}, ZeRO-{plan.zero_stage} and "
        f"activation checkpointing={plan.activation_checkpointing}: needs "
        f"{plan.total_bytes / GIB:.1f} GiB of {usable / GIB:.1f} GiB usable; lower "
        "micro_batch_size or seq_len, or use GPUs with more memory")


def _why(plan: MemoryPlan, preferred: int, hidden: int) -> str:
    t = plan.tensor_parallel
    if t == 1:
        head = (f"hidden_size={hidden} < {TP_HIDDEN_THRESHOLD}: TP's per-layer all-reduces would "
                "cost more than they save, so pure data parallel")
    elif t == preferred:
        head = (f"hidden_size={hidden}: TP={t} within a node keeps each rank's GEMMs "
                f"{hidden // t} wide while cutting weights and activations by {t}x")
    else:
        head = f"TP={t} is the smallest tensor-parallel degree within a node that fits"
    extras = [f"ZeRO-{plan.zero_stage}" + (" (nothing to shard at DP=1)" if plan.data_parallel == 1 else ""),
              *(["sequence parallelism"] if plan.sequence_parallel else []),
              "activation checkpointing" if plan.activation_checkpointing else "no recomputation"]
    return f"{head}; {' + '.join(extras)} fits in {plan.total_bytes / GIB:.1f} GiB"


def format_plan(plan: MemoryPlan) -> str:
    """A readable per-GPU table of a memory plan."""
    rows = [("parameters", plan.param_bytes), ("gradients", plan.grad_bytes),
            ("optimizer states", plan.optimizer_bytes),
            ("gradients in the optimizer step", plan.step_grad_bytes),
            ("model states (peak of both phases)", plan.model_state_bytes),
            ("activations, no checkpointing", plan.activation_bytes_no_ckpt),
            ("activations, full checkpointing", plan.activation_bytes_ckpt),
            (f"total (checkpointing {'on' if plan.activation_checkpointing else 'off'})",
             plan.total_bytes)]
    lines = [f"model: {plan.total_params / 1e6:,.1f}M parameters (vocab padded to "
             f"{plan.padded_vocab_size}), seq_len {plan.seq_len}, micro-batch "
             f"{plan.micro_batch_size}, {plan.precision}",
             f"layout: TP={plan.tensor_parallel} x DP={plan.data_parallel} "
             f"(world {plan.tensor_parallel * plan.data_parallel}), ZeRO-{plan.zero_stage}"
             + (", sequence parallel" if plan.sequence_parallel else ""),
             "", f"  {'per GPU':<34}{'GiB':>10}", "  " + "-" * 44]
    lines += [f"  {name:<34}{value / GIB:>10.2f}" for name, value in rows]
    lines += ["", f"  TP all-reduce per micro-batch step: {plan.tp_comm_bytes_per_step / GIB:.3f} GiB "
              f"({plan.tp_wire_bytes_per_step / GIB:.3f} GiB sent per GPU by a ring)"]
    return "\n".join(lines)


PLAN_VOCAB = 30522
"""The vocabulary planned with when `model.vocab_size` is unset (the presets: a run takes it from
its dataset): BERT's uncased WordPiece."""
PLANNER_KEYS = {"world": int, "gpus_per_node": int, "gpu_mem_gb": float}
"""Overrides the planner consumes itself instead of passing to `compose_config`."""
_TYPE_NAMES = {int: "an integer", float: "a number"}


def split_planner_args(argv: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Pop `world=`, `gpus_per_node=`, `gpu_mem_gb=` from Hydra-style overrides."""
    own: dict[str, Any] = {}
    rest: list[str] = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in PLANNER_KEYS:
            try:
                own[key] = PLANNER_KEYS[key](value)
            except ValueError:
                raise ValueError(f"{arg}: {key} must be {_TYPE_NAMES[PLANNER_KEYS[key]]}") from None
        else:
            rest.append(arg)
    return own, rest


def run_cli(argv: Sequence[str], compose: Callable[[list[str]], Any]) -> str:
    """The `mbert-plan` report for `argv`, composing the training config with `compose`."""
    own, overrides = split_planner_args(argv)
    cfg = compose(overrides)
    vocab_note = []
    if cfg.model.vocab_size is None:  # a run takes it from its dataset; plan with BERT's WordPiece
        cfg.model = dataclasses.replace(cfg.model, vocab_size=PLAN_VOCAB)
        vocab_note = [f"  (vocabulary {PLAN_VOCAB}, BERT's WordPiece: a run takes it from its dataset's "
                      f"tokenizer; plan another with model.vocab_size=N)"]
    gpus_per_node = own.get("gpus_per_node", 8)
    world = own.get("world", gpus_per_node)
    mem = int(own.get("gpu_mem_gb", 80.0) * GIB)
    t = cfg.parallel.tensor_parallel
    if world % t:
        raise ValueError(f"world={world} is not divisible by parallel.tensor_parallel={t}")
    common = dict(micro_batch_size=cfg.trainer.micro_batch_size, seq_len=cfg.data.max_seq_length,
                  precision=cfg.trainer.precision)
    plan = plan_memory(cfg.model, tensor_parallel=t, data_parallel=world // t,
                       zero_stage=cfg.parallel.zero_stage,
                       activation_checkpointing=cfg.trainer.activation_checkpointing,
                       sequence_parallel=cfg.parallel.sequence_parallel, **common)
    rec = recommend_layout(cfg.model, world, gpus_per_node, mem, **common)
    r = rec.plan
    verdict = "fits" if plan.total_bytes <= rec.usable_bytes else "does NOT fit"
    return "\n".join([
        format_plan(plan),
        f"  -> {verdict} in {rec.usable_bytes / GIB:.1f} GiB usable of a {mem / GIB:.0f} GiB GPU",
        "",
        f"recommended for world={world} ({gpus_per_node} GPUs/node, {mem / GIB:.0f} GiB): "
        f"parallel.tensor_parallel={r.tensor_parallel} parallel.zero_stage={r.zero_stage} "
        + ("parallel.sequence_parallel=true " if r.sequence_parallel else "")
        + f"trainer.activation_checkpointing={str(r.activation_checkpointing).lower()} "
        f"(DP={r.data_parallel}, {r.total_bytes / GIB:.1f} GiB per GPU)",
        f"  {rec.reason}",
        *vocab_note,
    ])


def main(argv: Sequence[str] | None = None) -> None:
    """`mbert-plan [hydra overrides] [world=N] [gpus_per_node=N] [gpu_mem_gb=X]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(main.__doc__)
        return
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mbert_train.config import compose_config
    from mbert_train.errors import UserError, first_line

    try:
        print(run_cli(argv, compose_config))
    except (UserError, ValueError, HydraException, OmegaConfBaseException) as exc:
        # Hydra's messages run over several lines (search path, hints); the first says it.
        print(f"mbert-plan: error: {first_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
