"""DeepSpeed engine assembly: the generated DeepSpeed JSON, parameter groups, the optimizer,
the LR schedule, and a TP-correct clip-and-skip guard for ZeRO-0."""

from __future__ import annotations

import math
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from mbert_train.config import OptimConfig, TrainConfig
from mbert_train.parallel.layout import ParallelState


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: TrainConfig, data_parallel: int) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the Hydra config plus `trainer.deepspeed` passthrough."""
    t, stage = cfg.trainer, cfg.parallel.zero_stage
    ds = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * data_parallel,
        # At ZeRO-0 the TPGuard below clips; DeepSpeed's ZeRO-1/2 optimizers clip TP-correctly
        # (they count parameters without `model_parallel` once per TP group).
        "gradient_clipping": t.grad_clip if stage > 0 else 0.0,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7},
        "bf16": {"enabled": t.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _deep_merge(ds, t.deepspeed)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Megatron's split: no weight decay on 1-D parameters (biases and LayerNorms)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim == 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(optim: OptimConfig, max_steps: int):
    def scale(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.decay == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, max_steps - optim.warmup_steps))
        shape = 1.0 - progress if optim.decay == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * shape
    return scale


def tp_grad_norm(params: list[torch.nn.Parameter], tp_group) -> torch.Tensor:
    """Global L2 norm of gradients under TP: sharded parameters summed over the TP group,
    replicated ones counted once (they are identical on every TP rank)."""
    device = params[0].device
    sharded = torch.zeros((), device=device, dtype=torch.float32)
    replicated = torch.zeros((), device=device, dtype=torch.float32)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if getattr(p, "tensor_model_parallel", False):
            sharded += sq
        else:
            replicated += sq
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(sharded, group=tp_group)
    return (sharded + replicated).sqrt()


class TPGuard:
    """Mixed into the ZeRO-0 optimizer: clip by the TP-correct norm, and skip (and report as
    DeepSpeed's `overflow`) a step whose gradients are not finite."""

    def setup_guard(self, tp_group, grad_clip: float) -> None:
        self.tp_group, self.grad_clip = tp_group, grad_clip
        self.overflow = False
        self._global_grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        norm = tp_grad_norm(params, self.tp_group)
        self._global_grad_norm = norm.item()
        self.overflow = not math.isfinite(self._global_grad_norm)
        if self.overflow:
            return None
        if self.grad_clip > 0 and self._global_grad_norm > self.grad_clip:
            coef = self.grad_clip / (self._global_grad_norm + 1e-6)
            for p in params:
                if p.grad is not None:
                    p.grad.mul_(coef)
        return super().step(closure)


class GuardedAdamW(TPGuard, torch.optim.AdamW):
    pass


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, state: ParallelState) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.name == "lamb":
        from deepspeed.ops.lamb import FusedLamb  # CUDA only: train.py refuses lamb on CPU up front

        return FusedLamb(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, max_grad_norm=0.0)
    # The fused kernel (CPU and CUDA, torch >= 2.4) is several times faster than the per-tensor
    # loop and is what transformers' Trainer defaults to on torch >= 2.8.
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)
    if cfg.parallel.zero_stage == 0:
        opt = GuardedAdamW(groups, **kwargs)
        opt.setup_guard(state.tp_group, cfg.trainer.grad_clip)
        return opt
    return torch.optim.AdamW(groups, **kwargs)


def no_cpu_extension_builds() -> None:
    """Keep DeepSpeed from compiling C++ on the CPU path.

    `deepspeed.initialize` creates DeepSpeed's communication backend, which on the CPU
    accelerator JIT-builds the `deepspeed_shm_comm` extension (comm/torch.py `build_shm_op`)
    for `inference_all_reduce`, an AutoTP-inference kernel that training never calls. The
    build takes ~25 s with gcc (again at every switch between two venvs), and it waits without
    a bound or a message on `~/.cache/torch_extensions/.../deepspeed_shm_comm/lock`, which a run
    killed mid-build leaves behind. `build_shm_op` builds only an op that
    `deepspeed.ops.__compatible_ops__` lists, and filling that list compiles a probe for every
    op: declaring none compatible skips the probes and the build. On GPUs nothing is built here.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder

    if get_accelerator().device_name() != "cpu":
        return
    compatible = vars(deepspeed.ops).get("__compatible_ops__")
    if compatible is None:
        deepspeed.ops.__compatible_ops__ = {}
    else:
        compatible[ShareMemCommBuilder.NAME] = False


def build_engine(model: torch.nn.Module, cfg: TrainConfig, state: ParallelState):
    """deepspeed.initialize with our layout as `mpu`; returns (engine, optimizer, scheduler)."""
    no_cpu_extension_builds()
    optimizer = build_optimizer(model, cfg, state)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.trainer.max_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=state,
        config=deepspeed_config(cfg, state.dims.data_parallel), dist_init_required=False)
    return engine, optimizer, scheduler
