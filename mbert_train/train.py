"""`mbert-train`: Hydra entry point. Composes `conf/`, converts it once into dataclasses, builds
the layout, data, model and DeepSpeed engine, then trains (resuming from RUN_DIR if possible).

    mbert-train                                     # tiny model, embedded corpus, 1 CPU process
    torchrun --nproc_per_node 2 -m mbert_train.train parallel.tensor_parallel=2
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import random
import re
import sys
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from mbert_train.config import CONF_DIR, TrainConfig, register_schema, to_train_config
from mbert_train.errors import UserError, describe_os_error, first_line
from mbert_train.lease import Lease, is_lease_file

log = logging.getLogger("mbert_train")

RUN_MARKER = ".mbert-train-run"
"""Written into a run dir at its first start. Only a folder holding it (or a run of an older
version: `checkpoints/step_*`) is resumed into; any other non-empty folder is refused, so a
mistyped `run.dir` never overwrites a user's `config.yaml` or `hf/`."""
HYDRA_SUBDIR = ".hydra"
"""Hydra's record of the run, written here (redacted) by rank 0: `conf/` sets
`hydra.output_subdir: null` so that Hydra itself never writes the secrets of a command line."""
_STEP_DIR = re.compile(r"step_\d{8}")
# Errors of the file system that the user fixes (space, permissions, read-only mounts).
_USER_OS_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends `--local_rank=N`, which Hydra would reject as an override."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def _quiet_libraries(rank: int) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*")


def run_dir_problem(run_dir: Path) -> str | None:
    """Why `run_dir` cannot hold this run, or None: it may be missing, empty (Hydra and the
    launchers create it before we run), hold only Hydra's `.hydra/`, or be one of our runs."""
    if not run_dir.exists():
        return None
    if not run_dir.is_dir():
        return f"run.dir={run_dir} is a file; point run.dir at a new folder, or at an existing run to resume it"
    if (run_dir / RUN_MARKER).exists():
        return None
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(_STEP_DIR.fullmatch(p.name) for p in checkpoints.iterdir()):
        return None  # a run of a version before RUN_MARKER
    others = sorted(p.name for p in run_dir.iterdir() if p.name != HYDRA_SUBDIR and not is_lease_file(p.name))
    if not others:
        return None
    shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
    return (f"run.dir={run_dir} is not empty ({shown}) and is not an mbert-train run dir (no {RUN_MARKER}); "
            f"point run.dir at a new or empty folder, or at an existing run to resume it")


def _prepare_run_dir(run_dir: Path, record: dict[str, object]) -> None:
    """Mark `run_dir` as ours, then write Hydra's record (redacted)."""
    from mbert_train.staging import write_text_atomic

    run_dir.mkdir(parents=True, exist_ok=True)
    marker = run_dir / RUN_MARKER
    if not marker.exists():  # first, and in place: a run killed right here is still recognised
        marker.write_text("mbert-train run directory; rerun mbert-train with this run.dir to resume it\n")
    if record:
        (run_dir / HYDRA_SUBDIR).mkdir(exist_ok=True)
        for name, content in record.items():
            write_text_atomic(run_dir / HYDRA_SUBDIR / name, OmegaConf.to_yaml(OmegaConf.create(content)))


def _write_config(run_dir: Path, cfg: TrainConfig, secrets: frozenset[str]) -> None:
    """RUN_DIR/config.yaml: the resolved config (the vocabulary size the dataset gave), redacted."""
    from mbert_train.metrics import redact
    from mbert_train.staging import write_text_atomic

    config = redact(dataclasses.asdict(cfg), values=secrets)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(config)))


def _on_rank0(action, where: str):
    """`action()` on rank 0, its result on every rank. A refusal or a file-system error there
    stops every rank with the same line, instead of leaving the others at the next collective."""
    box: list[object] = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = action()
        except UserError as exc:
            box[1] = str(exc)
        except OSError as exc:
            box[1] = f"{where}: {describe_os_error(exc, exc.filename or where)}"
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise UserError(box[1])
    return box[0]


def _shared_run_dir(candidate: str, record: dict[str, object], *, command: str,
                    max_wait_s: float) -> tuple[Path, Lease | None]:
    """Rank 0's run dir for every rank (ranks may start a second apart and name dirs by time),
    checked, held (the lease, on rank 0; None elsewhere) and prepared by rank 0. A run dir that
    another live run holds stops every rank here, before anything in it is written."""
    run_dir = Path(candidate).resolve()
    held: list[Lease] = []

    def check_hold_prepare() -> str:
        problem = run_dir_problem(run_dir)
        if problem is not None:
            raise UserError(problem)
        run_dir.mkdir(parents=True, exist_ok=True)
        held.append(Lease.acquire(run_dir, command=command, max_wait_s=max_wait_s,
                                  say=lambda line: print(f"[mbert-train] {line}", flush=True)))
        _prepare_run_dir(run_dir, record)
        return str(run_dir)

    try:
        return Path(_on_rank0(check_hold_prepare, f"run.dir={run_dir}")), (held[0] if held else None)
    except BaseException:
        for lease in held:
            lease.release()
        raise


def _dataset_dir(cfg: TrainConfig, rank: int) -> str:
    from mbert_train.data import prepare_default_corpus
    from mbert_train.data.corpus import require_dataset

    if cfg.data.path is not None:
        return require_dataset(cfg.data.path, "data.path")  # by its format marker, one line
    if rank == 0:  # build the embedded corpus once; the others then find it cached
        path = prepare_default_corpus(cfg.data)
    dist.barrier()
    return path if rank == 0 else prepare_default_corpus(cfg.data)


def _require_cpp_compiler() -> None:
    """torch.compile's CPU code (inductor) is C++ built at run time: find the compiler up front,
    where inductor looks for it ($CXX, else g++), rather than fail at the first step."""
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler

    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise UserError(f"trainer.compile=true needs a C++ compiler on CPU and none was found "
                        f"(CXX={os.environ.get('CXX', 'unset')}, else g++); install g++ or set "
                        f"trainer.compile=false") from None


def _check_same_tokenizer(digest: str | None, dataset_dir: str) -> None:
    """Nodes without a shared file system build the embedded corpus each on their own, and
    WordPiece training may break ties differently: refuse rather than train on mixed vocabs."""
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise ValueError(f"ranks see different tokenizers in {dataset_dir}; put the dataset (or MBERT_CACHE "
                         f"for the embedded corpus) on a file system all nodes share, or use data.path")


def run(cfg: TrainConfig, run_dir_candidate: str, record: dict[str, object] | None = None,
        secrets: frozenset[str] = frozenset()) -> Path:
    from mbert_train.metrics import redact_argv, require_tensorboard

    # First, on every rank (all stop with the same line), before the imports of _train_in (~4 s).
    if cfg.logging.tensorboard:
        require_tensorboard()
    from mbert_train.parallel.layout import init_parallel

    state = init_parallel(cfg.parallel.tensor_parallel, timeout_s=cfg.parallel.timeout_s)
    state.dims.check_model(cfg.model)
    # Before anything reads grad_accum (engine, loaders, config.yaml, run.json).
    cfg = dataclasses.replace(cfg, trainer=cfg.trainer.at_data_parallel(state.dims.data_parallel))
    _quiet_libraries(state.rank)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if cfg.trainer.precision == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision=fp16 needs a GPU; on CPU use fp32 or bf16")
    if cfg.optim.name == "lamb" and device.type != "cuda":
        raise ValueError("optim=lamb needs a GPU (DeepSpeed's FusedLamb); on CPU use optim=adamw")
    if cfg.trainer.compile and device.type == "cpu":
        _require_cpp_compiler()
    # The lease wait (for a holder that looks gone) ends well before the other ranks' broadcast.
    command = " ".join(redact_argv(sys.argv, values=secrets))
    run_dir, lease = _shared_run_dir(run_dir_candidate, record or {}, command=command,
                                     max_wait_s=cfg.parallel.timeout_s / 2)
    try:
        _train_in(run_dir, cfg, state, device, secrets, lease)
    finally:
        if lease is not None:
            lease.release()
    return run_dir


def _train_in(run_dir: Path, cfg: TrainConfig, state, device: torch.device, secrets: frozenset[str],
              lease: Lease | None) -> None:
    """Everything after the run dir is held: config, data, model, engine, then evaluate or
    train (resuming from the run dir if possible) and export."""
    from mbert_train.checkpoint import CheckpointDir, read_run_record, step_of
    from mbert_train.checkpoint.state import checkpoint_to_evaluate, choose_checkpoint
    from mbert_train.data import build_loaders, open_dataset, resolve_pad, resolve_vocab
    from mbert_train.engine import build_engine
    from mbert_train.metrics import MetricsLogger
    from mbert_train.model import build_model
    from mbert_train.parallel.context import TPContext
    from mbert_train.parallel.random import seed_for_training, training_seed
    from mbert_train.trainer import Trainer

    # config.yaml records the run as started, then (below) with the vocabulary and [PAD] the dataset gave;
    # an evaluation leaves the training run's record alone. Decided on rank 0, for every rank.
    def first_config_record() -> bool:
        if cfg.trainer.eval_only and (run_dir / "config.yaml").exists():
            return False
        _write_config(run_dir, cfg, secrets)
        return True

    write_config = _on_rank0(first_config_record, str(run_dir / "config.yaml"))

    dataset_dir = _dataset_dir(cfg, state.rank)
    metadata = open_dataset(dataset_dir).metadata
    vocab_size = resolve_vocab(metadata, cfg.model.vocab_size, dataset_dir)
    pad_token_id = resolve_pad(metadata, cfg.model.pad_token_id, dataset_dir)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size,
                                                             pad_token_id=pad_token_id))
    if write_config:
        _on_rank0(lambda: _write_config(run_dir, cfg, secrets), str(run_dir / "config.yaml"))
    _check_same_tokenizer(metadata.get("tokenizer_sha256"), dataset_dir)

    torch.manual_seed(cfg.trainer.seed)  # same on every rank: TP shards cut from one master weight
    with device:  # initialise on the GPU itself: no full-size host copies of large models
        tp = TPContext(state.tp_group, sequence_parallel=cfg.parallel.sequence_parallel,
                       sp_keep_gathered=cfg.parallel.sp_keep_gathered,
                       invariant_dropout=cfg.model.tp_invariant_dropout)
        model = build_model(cfg.model, tp, activation_checkpointing=cfg.trainer.activation_checkpointing,
                            mlm_masked_only=cfg.trainer.mlm_masked_only, unpad=cfg.trainer.unpad)
    if cfg.trainer.compile:
        model.compile_layers()  # the graphs are built by the first step (compile_s)
    seed_for_training(cfg.trainer.seed, state.dp_rank)
    random.seed(training_seed(cfg.trainer.seed, state.dp_rank))
    np.random.seed(training_seed(cfg.trainer.seed, state.dp_rank) % 2**32)
    engine = build_engine(model, cfg, state)
    train_loader, eval_loader = build_loaders(cfg.data, dataset_dir, seed=cfg.trainer.seed,
                                              micro_batch_size=cfg.trainer.micro_batch_size,
                                              dp_rank=state.dp_rank, dp_size=state.dims.data_parallel,
                                              grad_accum=cfg.trainer.grad_accum, pin_memory=device.type == "cuda")
    # The checkpoint to resume from is found first: the logger it is built with continues the
    # W&B run that checkpoint recorded and cuts metrics.jsonl back to its step.
    ckpt = CheckpointDir(run_dir, rank=state.rank, keep_last=cfg.trainer.keep_last, lease=lease)
    if cfg.trainer.eval_only:
        resume_from, note = checkpoint_to_evaluate(ckpt, cfg.trainer), ""
    else:
        resume_from, note = choose_checkpoint(ckpt, cfg.trainer.resume, device)
    record = read_run_record(resume_from)
    resume_step = step_of(resume_from) if resume_from is not None else 0
    log = MetricsLogger(run_dir, rank=state.rank, wandb_mode=cfg.logging.wandb_mode,
                        project=cfg.logging.project, run_name=cfg.logging.run_name or run_dir.name,
                        config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                        wandb_run_id=record.get("wandb_run_id"),
                        resume_step=None if cfg.trainer.eval_only else resume_step, secrets=secrets,
                        tensorboard=cfg.logging.tensorboard)
    trainer = Trainer(cfg, state, engine, train_loader, eval_loader, run_dir, device, log,
                      dataset={"path": str(Path(dataset_dir).resolve()),
                               "tokenizer_sha256": metadata.get("tokenizer_sha256")}, lease=lease)
    took_over = f" | {lease.note}" if lease is not None and lease.note else ""
    layout = (f" | world {state.dims.world_size} = TP {state.dims.tensor_parallel} x DP {state.dims.data_parallel}"
              f" | ZeRO-{cfg.parallel.zero_stage}{' + SP' if cfg.parallel.sequence_parallel else ''}"
              f" | {cfg.trainer.precision} on {device.type}")
    try:
        if cfg.trainer.eval_only:
            evaluate_only(trainer, resume_from, layout + took_over)
            return
        resumed = trainer.resume(resume_from) if resume_from is not None else False
        if not resumed and cfg.trainer.init_from:
            trainer.checkpoints.load_weights(cfg.trainer.init_from)
        if state.rank == 0:
            start = f"resumed at step {trainer.step}" if resumed else "new run"
            notes = [f"trainer.resume={cfg.trainer.resume}", note] if resumed and cfg.trainer.resume != "auto" else []
            notes = [n for n in (*notes, trainer.resume_note) if n]
            if notes:
                start += f" ({'; '.join(notes)})"
            print(f"[mbert-train] run dir {run_dir} | {start}{layout}"
                  f" | global batch {train_loader.global_batch} = micro {cfg.trainer.micro_batch_size}"
                  f" x accum {cfg.trainer.grad_accum} x DP {state.dims.data_parallel}{took_over}", flush=True)
        trainer.install_signal_handlers()
        trainer.train()
        finish(trainer, run_dir, dataset_dir)
    finally:
        log.finish()
    return run_dir


def evaluate_only(trainer, checkpoint: Path | None, layout: str) -> dict:
    """`trainer.eval_only=true`: the weights of `checkpoint` (else `trainer.init_from`), one
    held-out evaluation logged at the checkpoint's step, printed on rank 0; nothing written
    but the metrics."""
    from mbert_train.checkpoint import step_of

    source = checkpoint if checkpoint is not None else trainer.cfg.trainer.init_from
    trainer.checkpoints.load_weights(source)
    trainer.step = step_of(checkpoint) if checkpoint is not None else 0
    if trainer.state.rank == 0:
        print(f"[mbert-train] run dir {trainer.run_dir} | evaluating {source}{layout}", flush=True)
    result = trainer.evaluate()
    if trainer.state.rank == 0:
        shown = " ".join(f"{k}={v:.4f}" for k, v in result.items())
        print(f"[mbert-train] eval at step {trainer.step}: {shown} (appended to {trainer.run_dir / 'metrics.jsonl'})",
              flush=True)
    return result


def finish(trainer, run_dir: Path, dataset_dir: str | None = None) -> None:
    """HF export (the weights of the final checkpoint, read on rank 0; with the dataset's
    tokenizer and a model card) and the loss curves, on rank 0."""
    cfg, state = trainer.cfg, trainer.state
    if not run_dir.is_dir():  # every rank sees the shared run dir: all stop here together
        raise UserError(f"run dir {run_dir} is gone (deleted or unmounted while the run was training); the export "
                        f"and curves of step {trainer.step} are not written: start again with a new run.dir")
    if cfg.trainer.export_hf and state.rank == 0:
        from mbert_train.checkpoint.dcp import PARAM, read_full
        from mbert_train.convert.hf import export_files, export_hf

        files, missing = export_files(cfg.model, dataclasses.asdict(cfg), dataset_dir=dataset_dir,
                                      step=trainer.step, data_parallel=state.dims.data_parallel,
                                      metrics_file=run_dir / "metrics.jsonl", name=run_dir.name)
        if missing:
            print(f"[mbert-train] {run_dir / 'hf'}: tokenizer not written: {missing}; add it with "
                  f"mbert-convert to-hf {run_dir} OUT_DIR --dataset DATASET_DIR", flush=True)
        # The checkpoint of the last step, which the loop has just written (or resumed from).
        full = read_full(trainer.checkpoints.dir.path(trainer.step), PARAM)
        export_hf({k: v.float() for k, v in full.items()}, cfg.model, run_dir / "hf", overwrite=True, files=files)
    if state.rank == 0:
        from mbert_train.plot import plot_curves, read_metrics

        plot_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "curves.png", title=run_dir.name)
        print(f"[mbert-train] done at step {trainer.step}: metrics {run_dir / 'metrics.jsonl'}, "
              f"curves {run_dir / 'curves.png'}" + (f", Hugging Face export {run_dir / 'hf'}"
                                                     if cfg.trainer.export_hf else ""), flush=True)
    dist.barrier()


def _redact_hydra(config: dict, secrets: frozenset[str]) -> dict:
    """A Hydra config ({hydra: ..., ...}) with its record of the command line redacted."""
    from mbert_train.metrics import redact, redact_argv

    overrides = config.get("hydra", {}).get("overrides", {})
    for name in ("task", "hydra"):
        if isinstance(overrides.get(name), list):
            overrides[name] = redact_argv([str(arg) for arg in overrides[name]], values=secrets)
    return redact(config, values=secrets)


def _override_secrets(overrides: list[str]) -> set[str]:
    """Secret values on the command line, also ones a later override replaced or one inside a
    dict (`trainer.deepspeed='{comet: {api_key: ...}}'`): Hydra's record keeps every override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mbert_train.metrics import secret_values

    found: set[str] = set()
    for override in OverridesParser.create().parse_overrides(overrides):
        value = override.value()
        found |= secret_values({override.key_or_group: getattr(value, "list", value)})  # a sweep's choices
    return found


def run_secrets(cfg: TrainConfig) -> frozenset[str]:
    """Every secret value of this run: the environment's, the config's and the command line's."""
    from hydra.core.hydra_config import HydraConfig

    from mbert_train.metrics import secret_values

    return frozenset(secret_values(dataclasses.asdict(cfg)) | _override_secrets(list(HydraConfig.get().overrides.task)))


def hydra_record(dcfg: DictConfig, secrets: frozenset[str]) -> dict[str, object]:
    """What Hydra would write to `.hydra/`, with `secrets` and secret-named keys redacted. A
    sweep's `multirun.yaml` (beside the job dirs) is redacted in place, on rank 0."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from mbert_train.metrics import redact, redact_argv

    hydra_cfg = HydraConfig.get()
    record = {"config.yaml": redact(OmegaConf.to_container(dcfg), values=secrets),
              "hydra.yaml": _redact_hydra({"hydra": OmegaConf.to_container(hydra_cfg)}, secrets),
              "overrides.yaml": redact_argv([str(a) for a in hydra_cfg.overrides.task], values=secrets)}
    sweep_record = Path(hydra_cfg.runtime.output_dir).parent / "multirun.yaml"
    if hydra_cfg.mode == RunMode.MULTIRUN and int(os.environ.get("RANK", "0")) == 0 and sweep_record.is_file():
        text = sweep_record.read_text(encoding="utf-8")
        if any(s in text for s in secrets):
            from mbert_train.staging import write_text_atomic

            clean = _redact_hydra(OmegaConf.to_container(OmegaConf.create(text)), secrets)
            write_text_atomic(sweep_record, OmegaConf.to_yaml(OmegaConf.create(clean)))
    return record


def _fail(message: str) -> None:
    # One write of the whole line: ranks share the launcher's stderr, and print()'s separate
    # writes of the text and the newline interleave between ranks (unbuffered under torchrun).
    line = f"mbert-train: error: {message}\n"
    sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), line.encode())
    except (AttributeError, OSError, ValueError):  # a captured or replaced stderr (tests, notebooks)
        sys.stderr.write(line)
        sys.stderr.flush()
    raise SystemExit(2)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    # Every error the user can fix (UserError: bad settings, files, a diverged run; a full or
    # read-only disk) ends here as one line naming the setting or file and the fix. Anything
    # else is a bug and keeps its traceback.
    try:
        cfg = to_train_config(dcfg)
        secrets = run_secrets(cfg)
        run(cfg, cfg.run.dir or HydraConfig.get().runtime.output_dir, hydra_record(dcfg, secrets), secrets)
    except (UserError, ValueError, FileNotFoundError) as exc:
        _fail(first_line(exc))
    except OSError as exc:
        if exc.errno not in _USER_OS_ERRNOS:
            raise
        _fail(describe_os_error(exc, exc.filename or "a file", "accessing"))
    except RuntimeError as exc:
        # A collective that outlived parallel.timeout_s, or lost a rank that died first.
        from mbert_train.parallel.layout import collective_failure

        failure = collective_failure(exc, dcfg.parallel.timeout_s)
        if failure is None:
            raise
        _fail(str(failure))


def main() -> None:
    from mbert_train.launcher import die_with_launcher, started_by_launcher

    if started_by_launcher():  # first: a rank whose launcher is gone must not train on
        die_with_launcher(os.getppid())
    sys.argv = strip_launcher_args(sys.argv)
    register_schema()
    try:
        _hydra_main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
