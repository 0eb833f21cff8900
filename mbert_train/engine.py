"""Everything DeepSpeed-specific, behind one small seam (`Engine`): the generated DeepSpeed
JSON, parameter groups, the optimizer, the LR schedule, a TP-correct clip-and-skip guard for
ZeRO-0, and the optimizer state a checkpoint reads and writes (per parameter, whatever the
ZeRO stage partitioned it into: `Engine.fragments`)."""

from __future__ import annotations

import enum
import math
from typing import Any

import deepspeed
import torch
import torch.distributed as dist

from mbert_train.config import OptimConfig, TrainConfig
from mbert_train.parallel.layers import sharding
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
    replicated ones counted once (they are identical on every TP rank; sequence-parallel ones
    too, since backward already summed their gradients over the group)."""
    device = params[0].device
    sharded = torch.zeros((), device=device, dtype=torch.float32)
    replicated = torch.zeros((), device=device, dtype=torch.float32)
    for p in params:
        if p.grad is None:
            continue
        sq = p.grad.detach().float().pow(2).sum()
        if sharding(p).sharded:
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


MOMENTS = ("exp_avg", "exp_avg_sq")
MASTER = "master"


class Engine:
    """The trainer's one view of DeepSpeed: forward/backward/step, what a step did, the counters
    a resume restores, and the weights and optimizer state as per-parameter fragments
    (`checkpoint.dcp.Fragment`) that a checkpoint writes and reads at any layout."""

    def __init__(self, ds_engine, scheduler, cfg: TrainConfig, state: ParallelState):
        self.ds, self.scheduler, self.cfg, self.state = ds_engine, scheduler, cfg, state
        self.optimizer = ds_engine.optimizer
        self.zero = cfg.parallel.zero_stage > 0
        # Mixed precision keeps fp32 master weights apart from the model's; fp32 runs do not
        # (ZeRO's fp32 partition is then a copy of the weights, refilled from them on load).
        self.mixed = cfg.trainer.precision in ("bf16", "fp16")

    # ---- training ------------------------------------------------------------------------
    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    def __call__(self, **batch):
        return self.ds(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def step_applied(self) -> bool:
        return bool(self.ds.was_step_applied())

    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    # ---- what a checkpoint holds -----------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return {"global_steps": int(self.ds.global_steps), "skipped_steps": int(self.ds.skipped_steps)}

    def set_counters(self, global_steps: int, skipped_steps: int) -> None:
        """DeepSpeed's step counters after `global_steps` optimizer steps at this layout (its
        gradient-accumulation boundary follows micro_steps)."""
        t = self.cfg.trainer
        self.ds.global_steps, self.ds.skipped_steps = global_steps, skipped_steps
        self.ds.micro_steps = global_steps * t.grad_accum
        self.ds.global_samples = global_steps * t.micro_batch_size * t.grad_accum * self.state.dims.data_parallel

    def state_kinds(self) -> tuple[str, ...]:
        return MOMENTS + ((MASTER,) if self.mixed else ())

    def _names(self) -> dict[int, str]:
        return {id(p): n for n, p in self.module.named_parameters()}

    def fragments(self):
        """This rank's part of every parameter as a checkpoint writes it: the weights (`param`)
        and the optimizer state, as views of the model's and the optimizer's own tensors
        (created as a fresh Adam state when no step was applied yet). At ZeRO-1/2 the range of
        each parameter in this rank's partition, else the whole TP shard."""
        from mbert_train.checkpoint.dcp import PARAM, Fragment

        names, out = self._names(), []
        if not self.zero:
            opt = self.optimizer
            for group in opt.param_groups:
                for p in group["params"]:
                    st = _adam_state(opt.state, p)
                    views = {k: st[k].view(-1) for k in MOMENTS}
                    views[PARAM] = p.data.view(-1)
                    out.append(Fragment(names[id(p)], tuple(p.shape), 0, p.numel(), views, sharding(p)))
            return out
        opt = self.optimizer
        for i, params in enumerate(opt.bit16_groups):
            flat = opt.single_partition_of_fp32_groups[i]
            st = _adam_state(opt.optimizer.state, flat)
            for p in params:
                m = getattr(p, "_hp_mapping", None)
                if m is None:
                    continue  # no part of it in this rank's partition
                hp, lp = m.get_hp_fragment_address(), m.lp_fragment_address
                views = {k: st[k].narrow(0, hp.start, hp.numel) for k in MOMENTS}
                views[MASTER] = m.hp_fragment
                views[PARAM] = p.data.view(-1).narrow(0, lp.start, lp.numel)
                out.append(Fragment(names[id(p)], tuple(p.shape), lp.start, lp.numel, views, sharding(p)))
        return out

    def weight_fragments(self):
        """The whole TP shard of every parameter (`param` only): what every rank loads."""
        from mbert_train.checkpoint.dcp import PARAM, Fragment

        return [Fragment(n, tuple(p.shape), 0, p.numel(), {PARAM: p.data.view(-1)}, sharding(p))
                for n, p in self.module.named_parameters()]

    def scalar_state(self) -> dict:
        """The optimizer state that is one number per run: Adam's step count, the loss scaler."""
        steps = [float(st["step"]) for st in self._states() if "step" in st]
        out = {"adam_step": steps[0] if steps else 0.0}
        scaler = getattr(self.optimizer, "loss_scaler", None)
        if scaler is not None and self.zero:
            out["loss_scaler"] = {k: v for k, v in vars(scaler).items()
                                  if isinstance(v, (int, float, bool)) and not isinstance(v, enum.Enum)}
        return out

    def _states(self) -> list[dict]:
        opt = self.optimizer.optimizer if self.zero else self.optimizer
        return [st for st in opt.state.values() if st]

    def load_scalar_state(self, scalars: dict) -> None:
        for st in self._states():
            if torch.is_tensor(st.get("step")):
                st["step"].fill_(scalars["adam_step"])
            elif "step" in st:
                st["step"] = type(st["step"])(scalars["adam_step"])
        scaler = getattr(self.optimizer, "loss_scaler", None)
        if scaler is not None and scalars.get("loss_scaler"):
            vars(scaler).update({k: v for k, v in scalars["loss_scaler"].items() if hasattr(scaler, k)})

    def after_load(self, master_loaded: bool) -> None:
        """Make the optimizer consistent with what a checkpoint filled in: at ZeRO-1/2 in fp32,
        the fp32 partition is a copy of the weights, refilled from them (with mixed precision the
        master fragments were loaded, and the weights are their rounding, as saved); each param
        group's learning rate comes from the restored schedule."""
        if self.zero and not master_loaded:
            for params in self.optimizer.bit16_groups:
                for p in params:
                    m = getattr(p, "_hp_mapping", None)
                    if m is not None:
                        m.update_hp()
        for group, lr in zip(self.scheduler.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr




def _adam_state(states: dict, p: torch.Tensor) -> dict:
    """`states[p]`, created as torch's Adam/AdamW creates it at the first step (a zero step
    count and zero moments, which the first step treats exactly as no state)."""
    st = states[p]
    if not st:
        st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        for k in MOMENTS:
            st[k] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return st


def build_engine(model: torch.nn.Module, cfg: TrainConfig, state: ParallelState) -> Engine:
    """deepspeed.initialize with our layout as `mpu`, behind the `Engine` seam."""
    no_cpu_extension_builds()
    optimizer = build_optimizer(model, cfg, state)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, cfg.trainer.max_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, mpu=state,
        config=deepspeed_config(cfg, state.dims.data_parallel), dist_init_required=False)
    return Engine(engine, scheduler, cfg, state)
