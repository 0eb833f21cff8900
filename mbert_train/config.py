"""The typed schema behind `conf/`: Hydra validates overrides against it, and the entry points
turn the composed DictConfig into these dataclasses once (library code never sees Hydra)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from mbert_train.data.config import DataConfig
from mbert_train.errors import UserError
from mbert_train.model.config import ModelConfig

PRECISIONS = ("fp32", "bf16", "fp16")


def _conf_dir() -> Path:
    """`conf/`: inside the package when installed from a wheel (pyproject.toml maps the
    checkout's `conf/` to `mbert_train/conf`), else at the top of the checkout, beside the
    package (an editable install, or a checkout on sys.path)."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if (installed / "config.yaml").is_file() else package.parent / "conf"


CONF_DIR = _conf_dir()
"""The one home of the config folder: Hydra's `config_path` (train.py) and `compose_config`."""


@dataclass
class ParallelConfig:
    """How the world is split: TP within a node, DP (with ZeRO) across the rest."""

    tensor_parallel: int = 1
    """Tensor-parallel degree; divides num_heads, intermediate_size and the world size."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 none, 1 optimizer state, 2 also gradients sharded over DP."""
    timeout_s: float = 600.0
    """Process-group timeout: a hung collective fails after this long instead of never."""
    sequence_parallel: bool = False
    """Split LayerNorms, dropouts and residuals along the sequence over the TP group
    (Korthikanti et al. 2022): their activation memory / TP."""
    sp_keep_gathered: bool = False
    """Under sequence parallelism, column-parallel linears keep their all-gathered input for
    backward (the TP bytes of SP off) instead of keeping their chunk and all-gathering it again in
    backward (Megatron-LM's choice, the default: 1.25x the bytes, less memory)."""

    def __post_init__(self) -> None:
        if self.tensor_parallel < 1:
            raise ValueError(f"parallel.tensor_parallel={self.tensor_parallel} must be >= 1")
        if self.zero_stage == 3:
            raise ValueError("parallel.zero_stage=3 is not supported with tensor parallelism (ZeRO-3 "
                             "re-partitions the TP shards); use parallel.zero_stage=2")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"parallel.zero_stage={self.zero_stage} must be 0, 1 or 2")
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise UserError("parallel.sequence_parallel=true needs parallel.tensor_parallel>1: it splits the "
                            "sequence over the tensor-parallel group; set tensor_parallel or turn it off")
        if self.sp_keep_gathered and not self.sequence_parallel:
            raise UserError("parallel.sp_keep_gathered=true only changes sequence parallelism; set "
                            "parallel.sequence_parallel=true or leave sp_keep_gathered off")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            # 0 would fail every collective at once; torch cannot represent an infinite timeout.
            raise UserError(f"parallel.timeout_s={self.timeout_s} must be a positive number of seconds "
                            f"(default 600): how long a collective may wait for a stalled rank")


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (linear warmup, then decay)."""

    name: str = "adamw"
    """adamw, or lamb (CUDA only, through DeepSpeed's FusedLamb)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    weight_decay: float = 0.01
    """Decoupled weight decay on every 2-D parameter, embeddings included; not on biases and
    LayerNorm weights (the 1-D parameters), as Megatron-LM does."""
    beta1: float = 0.9
    """Adam's first-moment decay."""
    beta2: float = 0.999
    """Adam's second-moment decay."""
    eps: float = 1e-6
    """Adam's denominator epsilon."""
    warmup_steps: int = 30
    """Optimizer steps of linear warmup from 0 to `lr`."""
    decay: str = "linear"
    """After warmup: linear (to min_lr_ratio*lr at max_steps), cosine, or constant."""
    min_lr_ratio: float = 0.0
    """Floor of the decay as a fraction of `lr`."""

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "lamb"):
            raise ValueError(f"optim.name={self.name!r} must be adamw or lamb")
        if self.decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"optim.decay={self.decay!r} must be linear, cosine or constant")
        if self.lr <= 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.lr={self.lr} must be > 0, optim.warmup_steps={self.warmup_steps} >= 0, "
                             f"optim.min_lr_ratio={self.min_lr_ratio} in [0, 1]")


@dataclass
class TrainerConfig:
    """The loop: steps, batch, precision, checkpoints, evaluation."""

    max_steps: int = 300
    """Optimizer steps to train for."""
    micro_batch_size: int = 16
    """Samples per forward pass on each data-parallel replica."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; global batch = micro x grad_accum x DP."""
    global_batch_size: int = 0
    """Samples per optimizer step, fixed (0 = off): grad_accum is then derived at start as
    global_batch_size / (micro_batch_size x DP), so an elastic restart on fewer nodes keeps the
    global batch and with it the data stream."""
    precision: str = "fp32"
    """fp32, bf16 (GPU or CPU) or fp16 (GPU, dynamic loss scaling)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm (TP-correct: replicated parameters counted once); 0 = off."""
    checkpoint_every: int = 100
    """Steps between checkpoints (also written on SIGTERM/SIGINT/SIGUSR1 and at the end)."""
    keep_last: int = 3
    """Checkpoints kept; older ones are deleted after a new one is complete."""
    eval_every: int = 100
    """Steps between held-out evaluations (0 = never)."""
    eval_batches: int = 8
    """Held-out micro-batches per evaluation."""
    log_every: int = 10
    """Steps between lines in metrics.jsonl / W&B."""
    activation_checkpointing: bool = False
    """Recompute each layer's activations in backward (less memory, ~30% more compute)."""
    compile: bool = False
    """torch.compile the transformer layers (inductor; on CPU it needs a C++ compiler). The first
    step pays the warm-up (logged as compile_s), and each new padded batch length compiles once."""
    mlm_masked_only: bool = True
    """Run the MLM decoder on masked positions only (same loss and gradients, far less work)."""
    unpad: bool = True
    """Run the layers on the real tokens only: a batch's padding is removed and its samples laid
    end to end (same loss and gradients). Not under sequence parallelism, `compile` or
    `model.tp_invariant_dropout`, where batches keep their padded shape."""
    seed: int = 1234
    """Seed of weights, data order, masks and dropout."""
    max_bad_steps: int = 5
    """Stop (with the last good checkpoint intact) after this many consecutive NaN/inf steps."""
    init_from: str | None = None
    """Start from these weights (an `mbert-convert from-hf` output or any checkpoint, any TP)."""
    export_hf: bool = True
    """Write a Hugging Face export to RUN_DIR/hf at the end."""
    resume: str = "auto"
    """Which checkpoint a start continues from: `auto` (the run dir's latest, if any), `none`
    (step 0; refused if the run dir holds checkpoints, so nothing is overwritten) or a step
    number (`checkpoints/step_STEP`; checkpoints of later steps are moved into
    `checkpoints/set_aside_DATE_TIME/`, never deleted)."""
    eval_only: bool = False
    """Evaluate the run dir's checkpoint (as `resume` chooses it) or else `init_from` on the
    held-out split, append the result to metrics.jsonl and exit: no training, no checkpoint."""
    inject_nan_at: list[int] = field(default_factory=list)
    """Fault injection for tests: make the loss NaN at these steps."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config keys, merged over the generated JSON (e.g. zero_optimization.*)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "checkpoint_every", "log_every",
                     "eval_batches", "keep_last", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"trainer.{name}={getattr(self, name)} must be >= 1")
        if self.precision not in PRECISIONS:
            raise ValueError(f"trainer.precision={self.precision!r} must be one of {', '.join(PRECISIONS)}")
        if self.global_batch_size < 0 or self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"trainer.global_batch_size={self.global_batch_size} must be 0 (off) or a multiple "
                             f"of trainer.micro_batch_size={self.micro_batch_size}")
        if self.resume not in ("auto", "none") and not self.resume.isdigit():
            raise UserError(f"trainer.resume={self.resume} must be auto, none or a checkpoint's step number "
                            f"(e.g. trainer.resume=1000 for checkpoints/step_00001000)")
        if self.grad_clip < 0 or self.eval_every < 0:
            raise ValueError(f"trainer.grad_clip={self.grad_clip} and trainer.eval_every={self.eval_every} "
                             f"must be >= 0")

    def at_data_parallel(self, data_parallel: int) -> TrainerConfig:
        """This config with grad_accum derived from global_batch_size at `data_parallel` (itself
        when global_batch_size is off): the same global batch at any node count."""
        if not self.global_batch_size:
            return self
        if self.grad_accum != 1:
            raise UserError(f"trainer.grad_accum={self.grad_accum} and trainer.global_batch_size="
                            f"{self.global_batch_size} are both set; leave trainer.grad_accum at 1, it is "
                            f"derived from the global batch")
        per_step = self.micro_batch_size * data_parallel
        if self.global_batch_size % per_step:
            raise UserError(f"trainer.global_batch_size={self.global_batch_size} is not a multiple of "
                            f"trainer.micro_batch_size={self.micro_batch_size} x DP {data_parallel} = {per_step}; "
                            f"choose a global batch that every DP size of the run divides into micro-batches")
        return replace(self, grad_accum=self.global_batch_size // per_step)


@dataclass
class LoggingConfig:
    """Weights & Biases, TensorBoard (both rank 0 only) and the progress bar."""

    wandb_mode: str = "offline"
    """offline (files under RUN_DIR/wandb), online (needs WANDB_API_KEY in the env) or disabled."""
    project: str = "mbert-train"
    """W&B project."""
    run_name: str | None = None
    """W&B run name; default: the run directory's name."""
    progress_bar: bool = True
    """tqdm bar on rank 0."""
    tensorboard: bool = False
    """Also write every value of metrics.jsonl as TensorBoard scalars under RUN_DIR/tensorboard (rank 0;
    independent of W&B). Needs the `tensorboard` package (the `[tensorboard]` extra)."""

    def __post_init__(self) -> None:
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logging.wandb_mode={self.wandb_mode!r} must be offline, online or disabled")


@dataclass
class RunConfig:
    """Where this run lives; rerunning with the same dir resumes from its latest checkpoint."""

    dir: str | None = None
    """Run directory; default Hydra's output dir (runs/DATE_TIME), fixed by rank 0 for all ranks.
    A new or empty folder, or one of our runs (resumed); any other non-empty folder is refused."""


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if self.data.max_seq_length > self.model.max_position_embeddings:
            raise ValueError(f"data.max_seq_length={self.data.max_seq_length} exceeds "
                             f"model.max_position_embeddings={self.model.max_position_embeddings}; lower it")
        if self.model.arch == "modernbert" and self.data.objective != "none":
            raise ValueError(f"model.arch=modernbert is masked LM only, but data.objective={self.data.objective}; "
                             f"set data.objective=none")
        if (self.data.objective == "none") == self.model.binary_head:
            want = "false" if self.data.objective == "none" else "true"
            raise ValueError(f"data.objective={self.data.objective} needs model.binary_head={want}")
        tp = self.parallel.tensor_parallel
        if self.parallel.sequence_parallel and (self.data.max_seq_length % tp or self.data.pad_to_multiple_of % tp):
            raise ValueError(f"parallel.sequence_parallel=true splits every padded batch's sequence over "
                             f"parallel.tensor_parallel={tp}: data.max_seq_length={self.data.max_seq_length} and "
                             f"data.pad_to_multiple_of={self.data.pad_to_multiple_of} must both be multiples of {tp}")
        if self.optim.name == "lamb" and self.parallel.zero_stage > 0:
            raise ValueError("optim=lamb needs parallel.zero_stage=0: ZeRO flattens parameters and LAMB's "
                             "per-tensor trust ratio needs them whole; use optim=adamw with ZeRO")
        if self.trainer.precision != "fp32" and self.parallel.zero_stage == 0:
            raise ValueError(f"trainer.precision={self.trainer.precision} needs parallel.zero_stage>=1: "
                             f"DeepSpeed's ZeRO-0 mixed-precision optimizer miscounts the grad norm "
                             f"under TP; set parallel.zero_stage=1")


def register_schema() -> None:
    """The schema node `conf/config.yaml` lists, and the resolver its `hydra:` block uses."""
    node = OmegaConf.structured(TrainConfig)
    # A run takes [PAD]'s id from its dataset's tokenizer unless set (`resolve_pad`), as it takes
    # the vocabulary size; a model built in Python keeps ModelConfig's BERT default, 0.
    node.model.pad_token_id = None
    # Hydra makes the whole config struct (unknown keys are typos); `trainer.deepspeed` is a
    # free-form passthrough, so it alone takes new keys: `trainer.deepspeed='{zero_optimization: ...}'`.
    OmegaConf.set_struct(node.trainer.deepspeed, False)
    ConfigStore.instance().store(name="schema", node=node)
    if not OmegaConf.has_resolver("unless_run_dir"):
        OmegaConf.register_new_resolver("unless_run_dir", lambda run_dir, default: default if run_dir is None else ".")


def _check_finite(value: Any, key: str) -> None:
    # nan passes every `x <= 0` check and inf turns into nan downstream: refuse both here,
    # for every float of the config (typed settings and the deepspeed passthrough alike).
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{key}={value} is not a finite number; set {key} to a finite value")


def to_train_config(cfg) -> TrainConfig:
    """The one conversion from Hydra's DictConfig to dataclasses (runs every __post_init__)."""
    _check_finite(OmegaConf.to_container(cfg, resolve=True), "")
    return OmegaConf.to_object(cfg)


def compose_config(overrides: list[str] | None = None) -> TrainConfig:
    """Compose `conf/` with Hydra's compose API (tests, mbert-plan)."""
    from hydra import compose, initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_train_config(compose(config_name="config", overrides=list(overrides or [])))
