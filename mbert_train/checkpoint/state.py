"""The training state as one set of stateful parts, saved by one `torch.distributed.checkpoint`
call and loaded by one (as torchtitan's `components/checkpointer` does): weights, optimizer
state, schedule, data position, counters and every rank's RNG.

What the one DCP directory of a checkpoint holds (`mbert_train.checkpoint.dcp`):

    NAME/param, NAME/exp_avg, NAME/exp_avg_sq (NAME/master)   full tensors, written in chunks by
                                                              the ranks that hold them
    scalars      JSON: step, bad_in_a_row, skipped, optimizer (Adam's step, loss scaler),
                 scheduler, loader (data position), engine (DeepSpeed's counters); rank 0 writes it
    rng/RANK     torch.save bytes of rank RANK's RNG states (`mbert_train.rng`), read back with
                 weights_only=True

`meta.json` beside it records the format, the layout, the manifest of files, the model config
and the run record (`CheckpointDir.commit`). A load at the layout that saved restores every
rank's RNG (the run continues bit for bit); at another layout the dropout streams are reseeded
from (seed, step, DP rank) instead.

Each rank reads only the chunks overlapping what it holds: the weights of its TP shard, the
optimizer state of its ZeRO partition. Full shapes come from the live parameters
(`Fragment.full_shape`), never from a model built for the purpose.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from mbert_train import manifest
from mbert_train.checkpoint import dcp
from mbert_train.checkpoint.dcp import PARAM, Part
from mbert_train.checkpoint.dir import (CHECKPOINT_ADVICE, FORMAT, META_FILE, MODEL_KEY, RUN_KEY, CheckpointDir,
                                        CheckpointError, find_latest, read_meta, step_of, write_errors)
from mbert_train.config import TrainConfig
from mbert_train.errors import UserError, as_os_error, describe_os_error
from mbert_train.lease import Lease
from mbert_train.metrics import redact
from mbert_train.model.config import ModelConfig
from mbert_train.model.weights import load_shard_from_dir, read_model_meta
from mbert_train.parallel.layout import ParallelState
from mbert_train.parallel.random import seed_after_reshard
from mbert_train.rng import capture_rng_state

SCALARS = "scalars"
SCALAR_KEYS = ("step", "bad_in_a_row", "skipped", "optimizer", "scheduler", "loader", "engine")
"""What `scalars` holds; a resume sets the engine only through the integer `ENGINE_COUNTERS`."""
ENGINE_COUNTERS = ("global_steps", "skipped_steps")
COUNTERS = ("step", "bad_in_a_row", "skipped")
"""The trainer's own counters, the part of `scalars` the loop keeps."""
UPGRADE_COMMAND = "mbert-convert upgrade-checkpoint"
MASTER = "master"
SHAPE_KEYS = ("arch", "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size", "binary_head")


def rng_key(rank: int) -> str:
    return f"rng/{rank}"


def describe_layout(layout: dict) -> str:
    """`TP2xDP2 ZeRO-1`, as the resharding message names a layout."""
    return (f"TP{layout.get('tensor_parallel', '?')}xDP{layout.get('data_parallel', '?')} "
            f"ZeRO-{layout.get('zero_stage', '?')}" + (" SP" if layout.get("sequence_parallel") else ""))


def require_format(checkpoint: Path) -> dict:
    """`meta.json` of a checkpoint this version can resume; one line for an older format."""
    meta = read_meta(checkpoint)
    if meta.get("format") == FORMAT:
        return meta
    if meta.get("format") == 2:
        raise CheckpointError(f"checkpoint {checkpoint} is in format 2 of an earlier mbert-train; upgrade it in place "
                              f"with `{UPGRADE_COMMAND} {checkpoint}`, then rerun")
    raise CheckpointError(
        f"checkpoint {checkpoint} is in the per-rank format of an earlier mbert-train, which cannot be "
        f"resumed here; continue from its weights in a new run.dir with trainer.init_from={checkpoint} "
        f"(the optimizer state and data position start afresh)")


def checked_scalars(state, where: Path) -> dict:
    """The loaded `scalars`, refused unless it has our keys and exactly the integer engine
    counters (a resume sets only those on the engine, never attributes named by a file)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {where} holds {type(state).__name__} scalars, not a dict; it was not "
                              "written by mbert-train")
    missing = [key for key in SCALAR_KEYS if key not in state]
    engine = state.get("engine")
    if missing or not isinstance(engine, dict):
        raise CheckpointError(f"checkpoint {where} lacks {missing or ['engine']}; it was not written by "
                              "mbert-train or is from an incompatible version")
    if set(engine) != set(ENGINE_COUNTERS) or any(type(value) is not int for value in engine.values()):
        raise CheckpointError(f"checkpoint {where} has engine state {sorted(map(str, engine))}; only the integer "
                              f"counters {list(ENGINE_COUNTERS)} are accepted, refusing to resume from it")
    return state


@contextmanager
def _dcp_errors(path: Path, action: str) -> Iterator[None]:
    """One line for a failed read or write of the training state. DCP reports a failure on any
    rank to every rank (a CheckpointException); the first failure is named."""
    try:
        try:
            yield
        except CheckpointException as exc:
            failures = list(exc.failures.values())  # rank -> (exception, traceback)
            if not failures or not isinstance(failures[0][0], Exception):
                raise
            raise failures[0][0] from None
    except CheckpointError:
        raise
    except dcp.UnsafeCheckpoint as exc:
        raise CheckpointError(f"checkpoint file {path / dcp.METADATA_FILE} names the Python global "
                              f"{exc.args[0]}, which no checkpoint holds; refusing to load it") from None
    except dcp.MissingState as exc:
        raise CheckpointError(f"checkpoint state {path}: {exc.args[0]}; it was written for another model - "
                              f"{CHECKPOINT_ADVICE}") from None
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {exc.filename or path} is missing; {CHECKPOINT_ADVICE}") from None
    except Exception as exc:
        # A read that fails on the file's content: truncated or corrupt. Anything else (every
        # write, and reads the disk refused) is one line only if it is an OS error; torch.save
        # reports a full disk as the text of a RuntimeError ("unexpected pos").
        if "read" in action and isinstance(exc, (pickle.UnpicklingError, EOFError, RuntimeError, ValueError)):
            raise CheckpointError(f"checkpoint state {path} is truncated or corrupt "
                                  f"({type(exc).__name__}); {CHECKPOINT_ADVICE}") from None
        os_error = as_os_error(exc)
        if os_error is None:
            raise
        raise CheckpointError(describe_os_error(os_error, getattr(exc, "filename", None) or path,
                                                action.split()[0] + " checkpoint")) from exc


def _rng_bytes() -> bytes:
    buffer = io.BytesIO()
    torch.save(capture_rng_state(), buffer)
    return buffer.getvalue()


def _read_rng(blob: bytes, where: Path):
    # torch's own allow-list only: other libraries widen the process-wide one when imported
    # (megatron.core adds SimpleNamespace and argparse.Namespace), and an RNG state is tensors,
    # tuples, lists and numbers.
    widened = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        raise CheckpointError(f"checkpoint {where} holds {found.group(1) if found else 'a non-tensor object'} in its "
                              "RNG state, which weights_only loading refuses") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {where}: its RNG state is truncated or corrupt ({type(exc).__name__}); "
                              f"{CHECKPOINT_ADVICE}") from None
    finally:
        torch.serialization.add_safe_globals(widened)


def _read_scalars(blob: bytes, where: Path) -> dict:
    try:
        return checked_scalars(json.loads(blob), where)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"checkpoint {where}: its scalars are truncated or corrupt; "
                              f"{CHECKPOINT_ADVICE}") from None


def _model_config(meta: dict, checkpoint: Path) -> ModelConfig:
    try:
        return ModelConfig(**meta[MODEL_KEY])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"checkpoint file {checkpoint / META_FILE} has no valid {MODEL_KEY!r} record; "
                              f"{CHECKPOINT_ADVICE}") from None


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is true on any (an all-reduce, so also a barrier)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def raise_together(error: UserError | None, what: str, device: torch.device) -> None:
    """If `error` happened on any rank, every rank raises (the failing rank its own message),
    and no rank is left waiting for a peer that died."""
    if any_rank(error is not None, device):
        raise error or CheckpointError(f"{what} failed on another rank; see that rank's error")


def _together(stage, what: str, device: torch.device):
    """Run `stage` on every rank; if it raised a CheckpointError on any, every rank raises."""
    error, result = None, None
    try:
        result = stage()
    except CheckpointError as exc:
        error = exc
    raise_together(error, what, device)
    return result


@dataclass
class Resumed:
    """What a load gives back to the loop."""

    counters: dict[str, int]
    """step, bad_in_a_row, skipped."""
    rng: dict | None
    """This rank's RNG states, to restore right before the first step; None after a reshard."""
    note: str | None
    """How the data stream continues, when not exactly as saved (the loader's note)."""


class Checkpointer:
    """The stateful parts of a run (engine: weights, optimizer, schedule, counters; loader: data
    position; the loop's counters; RNG) and the checkpoint directory they are saved to.

    Every method is collective over the world; a failure on any rank stops every rank with one
    line."""

    def __init__(self, cfg: TrainConfig, state: ParallelState, engine, loader, run_dir: Path,
                 device: torch.device, *, lease: Lease | None = None, log=None, dataset: dict | None = None):
        self.cfg, self.state, self.engine, self.loader, self.device = cfg, state, engine, loader, device
        self.log, self.dataset = log, dataset
        self.dir = CheckpointDir(run_dir, rank=state.rank, keep_last=cfg.trainer.keep_last, lease=lease)

    def layout(self) -> dict:
        return {"tensor_parallel": self.state.dims.tensor_parallel, "data_parallel": self.state.dims.data_parallel,
                "zero_stage": self.cfg.parallel.zero_stage, "sequence_parallel": self.cfg.parallel.sequence_parallel}

    def _where(self) -> dict:
        return {"tp": self.state.dims.tensor_parallel, "tp_rank": self.state.tp_rank,
                "vocab_size": self.cfg.model.vocab_size}

    # ---- save ------------------------------------------------------------------------------
    def save(self, counters: dict[str, int]) -> Path:
        """Write the checkpoint of step `counters["step"]`. The ranks agree after each stage
        (begin, write, commit), so a failure on any rank (disk full) stops them all."""
        step = counters["step"]
        what = f"writing the checkpoint of step {step}"
        tmp = self.dir.tmp_path(step)
        _together(lambda: self.dir.begin(step), what, self.device)
        written = _together(lambda: self._write(tmp, counters), what, self.device)
        files = manifest.gather(written)  # every rank's files, on rank 0: the commit checks they are all there
        return _together(lambda: self.dir.commit(step, layout=self.layout(), files=files, record=self._record()),
                         what, self.device)

    def _write(self, tmp: Path, counters: dict[str, int]) -> manifest.Manifest:
        """The one DCP save; returns the manifest entries of the files this rank wrote."""
        engine, rank = self.engine, self.state.rank
        blobs = {rng_key(rank): _rng_bytes()}
        if rank == 0:
            scalars = {**{k: counters[k] for k in COUNTERS}, "optimizer": engine.scalar_state(),
                       "scheduler": engine.scheduler.state_dict(), "loader": self.loader.state_dict(),
                       "engine": engine.counters()}
            blobs[SCALARS] = json.dumps(scalars).encode()
        writes = engine.zero or self.state.dp_rank == 0  # ZeRO-0 replicas hold copies of DP rank 0's
        part = Part(engine.fragments() if writes else [], (PARAM, *engine.state_kinds()))
        with _dcp_errors(tmp, "writing the training state to"):
            names = dcp.save_state(tmp, [part], blobs, **self._where())
        with write_errors(tmp):
            return manifest.describe(tmp, [tmp / name for name in names], rank=rank)

    def _record(self) -> dict:
        run = {"wandb_run_id": self.log.wandb_run_id if self.log else None, "dataset": self.dataset,
               "config": redact(asdict(self.cfg))}
        return json.loads(json.dumps({MODEL_KEY: self.cfg.model.to_dict(), RUN_KEY: run}, default=str))

    # ---- load ------------------------------------------------------------------------------
    def load(self, checkpoint: Path) -> Resumed:
        """Continue from `checkpoint`, written at this layout or any other (TP, DP, ZeRO stage,
        micro-batch, grad_accum): the manifest is checked, then the one DCP load."""
        def check() -> dict:
            meta = require_format(checkpoint)
            self._check_fits(_model_config(meta, checkpoint), checkpoint)
            return meta

        meta = _together(check, "reading the checkpoint", self.device)
        self.dir.verify(checkpoint, meta)  # every rank together, before anything loads
        engine, rank = self.engine, self.state.rank
        same = meta.get("layout") == self.layout()
        with _dcp_errors(checkpoint, "reading the training state from"):
            # fp32 master weights where this run keeps them and the checkpoint has them; a run
            # that was fp32 gives a mixed-precision one its masters from the weights.
            master = engine.mixed and any(k.endswith(f"/{MASTER}") for k in dcp.saved_keys(checkpoint))
            kinds = tuple(k for k in engine.state_kinds() if master or k != MASTER)
            parts = [Part(engine.weight_fragments(), (PARAM,)), Part(engine.fragments(), kinds)]
            blobs = dcp.load_state(checkpoint, parts, [SCALARS, *([rng_key(rank)] if same else [])],
                                   **self._where())

        def decode() -> tuple[dict, dict | None]:
            rng = _read_rng(blobs[rng_key(rank)], checkpoint) if same else None
            return _read_scalars(blobs[SCALARS], checkpoint), rng

        scalars, rng = _together(decode, "reading the checkpoint", self.device)
        note = self.loader.load_state_dict(scalars["loader"])
        engine.load_scalar_state(scalars["optimizer"])
        engine.scheduler.load_state_dict(scalars["scheduler"])
        engine.after_load(master_loaded=master)
        engine.set_counters(**scalars["engine"])
        if not same:
            seed_after_reshard(self.cfg.trainer.seed, scalars["step"], self.state.dp_rank)
            if rank == 0:
                print(f"[mbert-train] resharding checkpoint {checkpoint.name} from {describe_layout(meta['layout'])} "
                      f"to {describe_layout(self.layout())}", flush=True)
        return Resumed({k: scalars[k] for k in COUNTERS}, rng, note)

    def load_weights(self, directory: str | Path) -> None:
        """Weights only (`trainer.init_from`, `trainer.eval_only`), at any TP degree: from a
        checkpoint each rank reads the chunks of its shard; from a model directory (safetensors,
        mbert-convert's output) the rows of the saved shards that overlap its own."""
        directory = Path(directory)
        meta = read_meta(directory) if (directory / META_FILE).is_file() else {}
        if meta.get("format") == FORMAT:
            self._check_fits(_model_config(meta, directory), directory)
            with _dcp_errors(directory, "reading the weights from"):
                dcp.load_state(directory, [Part(self.engine.weight_fragments(), (PARAM,))], [], **self._where())
            return
        self._check_fits(ModelConfig(**read_model_meta(directory)["model"]), directory)
        load_shard_from_dir(directory, self.engine.module)

    def _check_fits(self, saved: ModelConfig, directory: Path) -> None:
        diff = [f"model.{k}={getattr(self.cfg.model, k)} (checkpoint: {getattr(saved, k)})"
                for k in SHAPE_KEYS if getattr(saved, k) != getattr(self.cfg.model, k)]
        if diff:
            raise CheckpointError(f"checkpoint {directory} does not fit this model: {', '.join(diff)}; "
                                  f"set model.* to match it or use another run.dir")


# ---- which checkpoint ------------------------------------------------------------------------

def locate_checkpoint(ckpt: CheckpointDir, device: torch.device) -> Path | None:
    """The checkpoint to resume from, agreed by every rank; rank 0 first repairs the directory
    (an interrupted re-commit, leftovers of crashed saves)."""
    _together(ckpt.collect_garbage, "cleaning up the checkpoint directory", device)
    return _together(ckpt.latest, "reading the checkpoint", device)


def choose_checkpoint(ckpt: CheckpointDir, resume: str, device: torch.device) -> tuple[Path | None, str]:
    """The checkpoint this start continues from as `trainer.resume` says (auto, none or a step),
    agreed by every rank, and what the start line should add (checkpoints set aside)."""
    if resume == "auto":
        return locate_checkpoint(ckpt, device), ""

    def choose() -> Path | None:
        ckpt.collect_garbage()
        existing = ckpt.list()
        steps = ", ".join(str(step_of(p)) for p in sorted(existing, key=step_of)) or "none"
        if resume == "none" and existing:
            raise CheckpointError(f"trainer.resume=none but {ckpt.root} holds checkpoints (steps {steps}); point "
                                  f"run.dir at a new folder to start over, or continue with trainer.resume=auto "
                                  f"or trainer.resume=STEP")
        if resume == "none":
            return None
        chosen = ckpt.path(int(resume))
        if chosen not in existing:
            raise CheckpointError(f"trainer.resume={resume}: {ckpt.root} has no complete checkpoint of step "
                                  f"{int(resume)} (its steps: {steps}); use one of those, auto or none")
        return chosen

    chosen = _together(choose, f"choosing the checkpoint (trainer.resume={resume})", device)
    if chosen is None:
        return None, ""
    aside = _together(lambda: ckpt.set_aside_after(step_of(chosen)) if ckpt.rank == 0 else None,
                      f"setting aside the checkpoints after step {step_of(chosen)}", device)
    return chosen, f"later checkpoints moved to {aside}" if aside is not None else ""


def checkpoint_to_evaluate(ckpt: CheckpointDir, t) -> Path | None:
    """`trainer.eval_only`'s checkpoint, read-only (nothing is cleaned up or set aside): the
    latest, or `checkpoints/step_STEP` with `trainer.resume=STEP`; None to evaluate
    `trainer.init_from`. One line when there is nothing to evaluate."""
    if t.resume.isdigit():
        chosen = ckpt.path(int(t.resume))
        if not (chosen / META_FILE).is_file():
            raise CheckpointError(f"trainer.eval_only=true with trainer.resume={t.resume}: {chosen} is not a complete "
                                  f"checkpoint; choose a step of {ckpt.root}, or trainer.resume=auto")
        return chosen
    latest = find_latest(ckpt.root.parent)[0] if t.resume == "auto" else None
    if latest is None and not t.init_from:
        raise CheckpointError(f"trainer.eval_only=true found no checkpoint in {ckpt.root}"
                              f"{' (trainer.resume=none)' if t.resume == 'none' else ''} and trainer.init_from is "
                              f"unset; point run.dir at a run, or set trainer.init_from=MODEL_DIR")
    return latest
