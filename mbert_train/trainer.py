"""The training loop around a DeepSpeed engine: steps, NaN skipping, evaluation, and
checkpoints that resume bit for bit (model, optimizer, schedule, data position, every RNG)."""

from __future__ import annotations

import json
import math
import pickle
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from mbert_train import manifest, reshard
from mbert_train.arithmetic import masked_fraction
from mbert_train.checkpoint import (CHECKPOINT_ADVICE, META_FILE, OPTIM_DIR, RUN_FILE, TRAINER_STATE_FILE,
                                    CheckpointDir, CheckpointError, find_latest, load_torch, require_format,
                                    rng_file, step_of, write_errors)
from mbert_train.config import TrainConfig
from mbert_train.data.loader import STOP_SIGNALS
from mbert_train.errors import UserError, as_os_error, describe_os_error
from mbert_train.lease import Lease
from mbert_train.metrics import MetricsLogger, ProgressBar, mfu, model_flops_per_token, peak_memory_gib, redact
from mbert_train.model.weights import full_shapes, load_full_from_dir, save_model_shard, shard_state_dict
from mbert_train.parallel.layout import ParallelState
from mbert_train.parallel.random import seed_after_reshard
from mbert_train.rng import capture_rng_state, restore_rng_state


# What trainer_state.pt holds, and the only engine attributes a resume sets from it.
TRAINER_STATE_KEYS = ("step", "bad_in_a_row", "skipped", "optimizer", "scheduler", "loader", "engine", "layout")
ENGINE_COUNTERS = ("global_steps", "skipped_steps")


class TrainingDiverged(UserError):
    """Non-finite loss, gradients or weights that the run cannot recover from by itself."""


def checked_trainer_state(state, path: Path) -> dict:
    """A loaded trainer_state.pt, refused unless it has our keys and exactly the integer engine
    counters (a resume sets only those on the engine, never attributes named by a file)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {path} holds a {type(state).__name__}, not a trainer state dict; "
                              "it was not written by mbert-train")
    missing = [key for key in TRAINER_STATE_KEYS if key not in state]
    engine = state.get("engine")
    if missing or not isinstance(engine, dict):
        raise CheckpointError(f"checkpoint file {path} lacks {missing or ['engine']}; it was not written by "
                              "mbert-train or is from an incompatible version")
    if set(engine) != set(ENGINE_COUNTERS) or any(type(value) is not int for value in engine.values()):
        raise CheckpointError(f"checkpoint file {path} has engine state {sorted(map(str, engine))}; only the integer "
                              f"counters {list(ENGINE_COUNTERS)} are accepted, refusing to resume from it")
    return state


def describe_layout(layout: dict) -> str:
    """`TP2xDP2 ZeRO-1`, as the resharding message names a layout."""
    return (f"TP{layout.get('tensor_parallel', '?')}xDP{layout.get('data_parallel', '?')} "
            f"ZeRO-{layout.get('zero_stage', '?')}" + (" SP" if layout.get("sequence_parallel") else ""))


@contextmanager
def _dcp_errors(path: Path, action: str) -> Iterator[None]:
    """One line for a failed optimizer-state read or write. DCP reports a failure on any rank
    to every rank (a CheckpointException); the first failure is named."""
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
    except reshard.UnsafeCheckpoint as exc:
        raise CheckpointError(f"checkpoint file {path / reshard.METADATA_FILE} names the Python global "
                              f"{exc.args[0]}, which no checkpoint holds; refusing to load it") from None
    except reshard.MissingState as exc:
        raise CheckpointError(f"checkpoint optimizer state {path}: {exc.args[0]}; it was written for another model - "
                              f"{CHECKPOINT_ADVICE}") from None
    except FileNotFoundError as exc:
        raise CheckpointError(f"checkpoint file {exc.filename or path} is missing; {CHECKPOINT_ADVICE}") from None
    except Exception as exc:
        # A read that fails on the file's content: truncated or corrupt. Anything else (every
        # write, and reads the disk refused) is one line only if it is an OS error; torch.save
        # reports a full disk as the text of a RuntimeError ("unexpected pos").
        if "read" in action and isinstance(exc, (pickle.UnpicklingError, EOFError, RuntimeError, ValueError)):
            raise CheckpointError(f"checkpoint optimizer state {path} is truncated or corrupt "
                                  f"({type(exc).__name__}); {CHECKPOINT_ADVICE}") from None
        os_error = as_os_error(exc)
        if os_error is None:
            raise
        raise CheckpointError(describe_os_error(os_error, getattr(exc, "filename", None) or path,
                                                action.split()[0] + " checkpoint")) from exc


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


def locate_checkpoint(ckpt: CheckpointDir, device: torch.device) -> Path | None:
    """The checkpoint to resume from, agreed by every rank; rank 0 first repairs the directory
    (an interrupted re-commit, leftovers of crashed saves)."""
    error, latest = None, None
    try:
        ckpt.collect_garbage()
    except CheckpointError as exc:
        error = exc
    raise_together(error, "cleaning up the checkpoint directory", device)
    try:
        latest = ckpt.latest()
    except CheckpointError as exc:
        error = exc
    raise_together(error, "reading the checkpoint", device)
    return latest


def choose_checkpoint(ckpt: CheckpointDir, resume: str, device: torch.device) -> tuple[Path | None, str]:
    """The checkpoint this start continues from as `trainer.resume` says (auto, none or a step),
    agreed by every rank, and what the start line should add (checkpoints set aside)."""
    if resume == "auto":
        return locate_checkpoint(ckpt, device), ""
    error, chosen, note = None, None, ""
    try:
        ckpt.collect_garbage()
        existing = ckpt.list()
        steps = ", ".join(str(step_of(p)) for p in sorted(existing, key=step_of)) or "none"
        if resume == "none" and existing:
            raise CheckpointError(f"trainer.resume=none but {ckpt.root} holds checkpoints (steps {steps}); point "
                                  f"run.dir at a new folder to start over, or continue with trainer.resume=auto "
                                  f"or trainer.resume=STEP")
        if resume != "none":
            chosen = ckpt.path(int(resume))
            if chosen not in existing:
                raise CheckpointError(f"trainer.resume={resume}: {ckpt.root} has no complete checkpoint of step "
                                      f"{int(resume)} (its steps: {steps}); use one of those, auto or none")
    except CheckpointError as exc:
        error = exc
    raise_together(error, f"choosing the checkpoint (trainer.resume={resume})", device)
    if chosen is not None:
        try:
            aside = ckpt.set_aside_after(step_of(chosen)) if ckpt.rank == 0 else None
            if aside is not None:
                note = f"later checkpoints moved to {aside}"
        except CheckpointError as exc:
            error = exc
        raise_together(error, f"setting aside the checkpoints after step {step_of(chosen)}", device)
    return chosen, note


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


class Trainer:
    def __init__(self, cfg: TrainConfig, state: ParallelState, engine, train_loader, eval_loader,
                 run_dir: Path, device: torch.device, log: MetricsLogger | None = None, dataset: dict | None = None,
                 lease: Lease | None = None):
        self.cfg, self.state, self.engine = cfg, state, engine
        self.dataset = dataset  # {"path", "tokenizer_sha256"}: the export finds the tokenizer by it
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.run_dir, self.device, self.log = run_dir, device, log
        self.ckpt = CheckpointDir(run_dir, rank=state.rank, keep_last=cfg.trainer.keep_last, lease=lease)
        self.step = 0
        self.bad_in_a_row = 0
        self.skipped = 0
        self._stop_requested = False
        self._pending_rng: dict | None = None
        self.resume_note: str | None = None  # how the data stream continues, for the start line
        # MFU counts what runs: with mlm_masked_only the MLM head (and the last layer's
        # attention output and MLP) only on the masked positions and [CLS].
        self._flops_per_token = model_flops_per_token(
            cfg.model, cfg.data.max_seq_length,
            masked_fraction=masked_fraction(cfg.data) if cfg.trainer.mlm_masked_only else 1.0)

    # ---- signals -------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def request_stop(signum, frame):
            self._stop_requested = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, request_stop)

    def _any_rank(self, flag: bool) -> bool:
        return any_rank(flag, self.device)

    # ---- one optimizer step --------------------------------------------------------------
    def train_step(self, batches) -> dict:
        t = self.cfg.trainer
        totals = torch.zeros(4, device=self.device, dtype=torch.float64)  # loss, mlm, nsp, tokens
        for _ in range(t.grad_accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
            out = self.engine(**batch)
            loss = out.loss
            if self.step + 1 in t.inject_nan_at:
                loss = loss * float("nan")
            self.engine.backward(loss)
            self.engine.step()
            totals += torch.stack([loss.detach().double(), out.mlm_loss.detach().double(),
                                   (out.nsp_loss if out.nsp_loss is not None else torch.zeros(())).detach().double()
                                   .to(self.device), batch["attention_mask"].sum().double()])
        dist.all_reduce(totals, group=self.state.dp_group)
        dp, accum = self.state.dims.data_parallel, t.grad_accum
        return {"loss": totals[0].item() / (dp * accum), "mlm_loss": totals[1].item() / (dp * accum),
                "nsp_loss": totals[2].item() / (dp * accum), "tokens": totals[3].item(),
                "lr": self.engine.scheduler.get_last_lr()[0], "applied": self.engine.step_applied(),
                "grad_norm": self.engine.grad_norm()}

    def train(self) -> None:
        t = self.cfg.trainer
        bar = ProgressBar(t.max_steps, rank=self.state.rank, initial_step=self.step) if self.cfg.logging.progress_bar \
            else None
        if self._pending_rng is not None:
            # Restored last, right before the first step, so nothing in between draws from it.
            restore_rng_state(self._pending_rng)
            self._pending_rng = None
        tokens_since, time_since = 0.0, time.perf_counter()
        saved_at = self.step  # the checkpoint resumed from, or a fresh start: nothing to save yet
        warming_up = t.compile  # this process's first step builds the compiled graphs
        while self.step < t.max_steps:
            # The ranks agree on a stop before each step, once its batches are in hand: a DataLoader
            # worker that died with the stop signal then fails the fetch, never a half-done step.
            mark = self.train_loader.mark()
            micro = self._fetch(t.grad_accum)
            if self._any_rank(self._stop_requested or micro is None):
                self.train_loader.rewind(mark)  # the checkpoint resumes with this step's batches
                self._stop(bar, write=saved_at != self.step)
            stepped = time.perf_counter()
            m = self.train_step(iter(micro))
            self.step += 1
            if warming_up:
                warming_up = False
                self._log_compile(time.perf_counter() - stepped)
            tokens_since += m["tokens"]
            self._count_bad(m)
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                elapsed = time.perf_counter() - time_since
                tps = tokens_since / elapsed
                util = mfu(self._flops_per_token * tokens_since, elapsed, dist.get_world_size(), self.device,
                           precision=t.precision)
                record = {k: m[k] for k in ("loss", "mlm_loss", "nsp_loss", "lr", "grad_norm")}
                record.update(tokens_per_s=tps, skipped_steps=self.skipped, mfu=util,
                              memory_gib=peak_memory_gib(self.device))
                if self.log:
                    self.log.log(self.step, record)
                if bar:
                    bar.update(self.step, loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"], tokens_per_s=tps,
                               memory_gib=record["memory_gib"], mfu=util)
                tokens_since, time_since = 0.0, time.perf_counter()
            # Evaluation and checkpoints are timed on their own (eval_s, checkpoint_s) and kept out
            # of the interval tokens_per_s and MFU divide by, which measure training steps only.
            paused = time.perf_counter()
            if t.eval_every and self.step % t.eval_every == 0:
                self.evaluate()
            if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                started = time.perf_counter()
                self.save()
                saved_at = self.step
                if self.log:
                    self.log.log(self.step, {"checkpoint_s": time.perf_counter() - started})
            time_since += time.perf_counter() - paused
        if bar:
            bar.close()

    def _log_compile(self, seconds: float) -> None:
        """The warm-up of trainer.compile: the first step's time, graph building included."""
        if self.log:
            self.log.log(self.step, {"compile_s": seconds})
        if self.state.rank == 0:
            print(f"[mbert-train] first step with trainer.compile=true (torch.compile warm-up included): "
                  f"{seconds:.1f} s", flush=True)

    def _fetch(self, n: int) -> list | None:
        """This step's micro-batches; None if a DataLoader worker died after a stop was requested
        (SIGKILL, or a stop signal caught before it could ignore it): the stop then goes ahead."""
        try:
            return self.train_loader.take(n)
        except RuntimeError as exc:
            if self._stop_requested and "DataLoader worker" in str(exc):
                return None
            raise

    def _stop(self, bar, *, write: bool) -> None:
        """Checkpoint the last completed step (unless that checkpoint exists) and exit 0."""
        if write:
            self.save()
        if bar:
            bar.close()
        if self.state.rank == 0:
            done = (f"checkpoint written at step {self.step}" if write else
                    f"the checkpoint of step {self.step} is current" if self.step else "no step trained yet")
            print(f"[mbert-train] stop signal: {done}; rerun the same command to resume", flush=True)
        raise SystemExit(0)

    def _count_bad(self, m: dict) -> None:
        if m["applied"] and math.isfinite(m["loss"]):
            self.bad_in_a_row = 0
            return
        self.skipped += 1
        self.bad_in_a_row += 1
        if self.state.rank == 0:
            print(f"[mbert-train] step {self.step}: non-finite loss or gradients, update skipped "
                  f"({self.bad_in_a_row} in a row, {self.skipped} in total)", flush=True)
        if self.bad_in_a_row >= self.cfg.trainer.max_bad_steps:
            last, _ = find_latest(self.run_dir)  # read-only: no clean-up while ranks are stopping
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise TrainingDiverged(
                f"{self.bad_in_a_row} consecutive non-finite steps (trainer.max_bad_steps="
                f"{self.cfg.trainer.max_bad_steps}) up to step {self.step}; {where}: lower optim.lr or raise "
                f"trainer.grad_clip and resume")

    # ---- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        started = time.perf_counter()
        self.engine.eval()
        sums = torch.zeros(5, device=self.device, dtype=torch.float64)  # mlm loss*n, n, correct, nsp ok, seqs
        for i, batch in enumerate(self.eval_loader):
            if i >= self.cfg.trainer.eval_batches:
                break
            batch = {k: v.to(self.device) for k, v in batch.items()}
            out = self.engine(**batch)
            n = out.mlm_count.double()
            nsp_ok = out.nsp_correct.double() if out.nsp_correct is not None else torch.zeros((), device=self.device)
            sums += torch.stack([out.mlm_loss.double() * n, n, out.mlm_correct.double(), nsp_ok.to(self.device),
                                 torch.tensor(float(batch["input_ids"].shape[0]), device=self.device)])
        dist.all_reduce(sums, group=self.state.dp_group)
        self.engine.train()
        result = {"eval_mlm_loss": (sums[0] / sums[1].clamp(min=1)).item(),
                  "eval_mlm_accuracy": (sums[2] / sums[1].clamp(min=1)).item()}
        if self.cfg.model.binary_head:
            result["eval_nsp_accuracy"] = (sums[3] / sums[4].clamp(min=1)).item()
        if self.log:
            self.log.log(self.step, {**result, "eval_s": time.perf_counter() - started})
        return result

    # ---- checkpoints ---------------------------------------------------------------------
    def _layout(self) -> dict:
        return {"tensor_parallel": self.state.dims.tensor_parallel, "data_parallel": self.state.dims.data_parallel,
                "zero_stage": self.cfg.parallel.zero_stage, "sequence_parallel": self.cfg.parallel.sequence_parallel}

    def _raise_together(self, error: UserError | None, what: str) -> None:
        raise_together(error, what, self.device)

    def save(self) -> None:
        """Write the checkpoint of this step. The ranks agree after each stage (begin, write,
        commit), so a failure on any rank (disk full, non-finite weights) stops them all."""
        model = self.engine.module
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if self._any_rank(not finite):  # each TP rank checks its own shards
            raise TrainingDiverged(f"parameters are not finite at step {self.step}; not writing a checkpoint: "
                                   f"lower optim.lr or raise trainer.grad_clip and resume from the last one")
        tmp = self.ckpt.tmp_path(self.step)
        self._save_stage(lambda: self.ckpt.begin(self.step))
        written = self._save_stage(lambda: self._write_files(tmp))
        files = manifest.gather(written)  # every rank's files, on rank 0: the commit checks they are all there
        self._save_stage(lambda: self.ckpt.commit(self.step, layout=self._layout(), files=files))

    def _save_stage(self, stage):
        """Run one stage of `save` on every rank; if it failed on any, every rank raises."""
        error, result = None, None
        try:
            result = stage()
        except CheckpointError as exc:
            error = exc
        self._raise_together(error, f"writing the checkpoint of step {self.step}")
        return result

    def _write_files(self, tmp: Path) -> manifest.Manifest:
        """Each rank's own files, then (once every rank wrote them) the optimizer state, a
        collective of torch.distributed.checkpoint: no rank enters it while another has failed.
        Returns the manifest entries of the files this rank wrote."""
        error, written = None, []
        try:
            written = self._write_local_files(tmp)
        except CheckpointError as exc:
            error = exc
        self._raise_together(error, f"writing the checkpoint of step {self.step}")
        engine = self.engine
        with _dcp_errors(tmp / OPTIM_DIR, "writing the optimizer state to"):
            names = reshard.save_state(tmp / OPTIM_DIR, engine.fragments(), full_shapes(self.cfg.model),
                                       tp=self.state.dims.tensor_parallel, tp_rank=self.state.tp_rank,
                                       write=engine.zero or self.state.dp_rank == 0, kinds=engine.state_kinds())
        with write_errors(tmp):
            return manifest.describe(tmp, [*written, *(tmp / OPTIM_DIR / name for name in names)],
                                     rank=self.state.rank)

    def _write_local_files(self, tmp: Path) -> list[Path]:
        """This rank's files but the optimizer state; returns their paths."""
        model, written = self.engine.module, [tmp / rng_file(self.state.rank)]
        if self.state.dp_rank == 0:
            with write_errors(tmp):
                written += save_model_shard(tmp, model, self.state.tp_rank, self.state.dims.tensor_parallel)
        with write_errors(tmp / rng_file(self.state.rank)):
            torch.save(capture_rng_state(), tmp / rng_file(self.state.rank))
        if self.state.rank != 0:
            return written
        with write_errors(tmp / TRAINER_STATE_FILE):
            torch.save({
                "step": self.step, "bad_in_a_row": self.bad_in_a_row, "skipped": self.skipped,
                "optimizer": self.engine.scalar_state(), "scheduler": self.engine.scheduler.state_dict(),
                "loader": self.train_loader.state_dict(), "engine": self.engine.counters(), "layout": self._layout(),
            }, tmp / TRAINER_STATE_FILE)
        with write_errors(tmp / RUN_FILE):
            wandb_id = self.log.wandb_run_id if self.log else None
            record = {"wandb_run_id": wandb_id, "dataset": getattr(self, "dataset", None),
                      "config": redact(asdict(self.cfg))}
            (tmp / RUN_FILE).write_text(json.dumps(record, indent=2, default=str))
        return [*written, tmp / TRAINER_STATE_FILE, tmp / RUN_FILE]

    def load_weights(self, directory: str | Path) -> None:
        """Weights only, from any of our model dirs at any TP degree (resharded here)."""
        full, saved_cfg = load_full_from_dir(directory)
        shape_keys = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                      "max_position_embeddings", "type_vocab_size", "binary_head")
        diff = [f"model.{k}={getattr(self.cfg.model, k)} (checkpoint: {getattr(saved_cfg, k)})"
                for k in shape_keys if getattr(saved_cfg, k) != getattr(self.cfg.model, k)]
        if diff:
            raise CheckpointError(f"checkpoint {directory} does not fit this model: {', '.join(diff)}; "
                                  f"set model.* to match it or use another run.dir")
        model = self.engine.module
        sd = shard_state_dict(full, model)
        model.load_state_dict({k: v.to(self.device) for k, v in sd.items()})

    def resume(self, latest: Path | None = None) -> bool:
        """Continue from `latest` (default: RUN_DIR's latest checkpoint, if any), written at this
        layout or any other (TP, DP, ZeRO stage, micro-batch, grad_accum)."""
        latest = locate_checkpoint(self.ckpt, self.device) if latest is None else latest
        if latest is None:
            return False
        error, state, rng, meta = None, None, None, {}
        try:
            meta = require_format(latest)
        except CheckpointError as exc:
            error = exc
        self._raise_together(error, "reading the checkpoint")
        self.ckpt.verify(latest, meta)  # every rank together, before anything loads
        try:
            path = latest / TRAINER_STATE_FILE
            state = checked_trainer_state(load_torch(path), path)
            same = state["layout"] == self._layout()
            rng_path = latest / rng_file(self.state.rank)
            rng = load_torch(rng_path) if same else None
        except CheckpointError as exc:
            error = exc
        self._raise_together(error, "reading the checkpoint")
        # The data position first: a corpus other than the one it counts is refused before the weights load.
        self.resume_note = self.train_loader.load_state_dict(state["loader"])
        self.load_weights(latest)
        engine = self.engine
        with _dcp_errors(latest / OPTIM_DIR, "reading the optimizer state from"):
            # fp32 master weights where this run keeps them and the checkpoint has them; a run
            # that was fp32 gives a mixed-precision one its masters from the weights.
            master = engine.mixed and any(k.endswith("/master") for k in reshard.saved_keys(latest / OPTIM_DIR))
            kinds = engine.state_kinds() if master else tuple(k for k in engine.state_kinds() if k != "master")
            reshard.load_state(latest / OPTIM_DIR, engine.fragments(), full_shapes(self.cfg.model),
                               tp=self.state.dims.tensor_parallel, tp_rank=self.state.tp_rank, kinds=kinds)
        engine.load_scalar_state(state["optimizer"])
        engine.scheduler.load_state_dict(state["scheduler"])
        engine.after_load(master_loaded=master)
        engine.set_counters(**state["engine"])
        self.step, self.bad_in_a_row, self.skipped = state["step"], state["bad_in_a_row"], state["skipped"]
        if rng is not None:
            self._pending_rng = rng
        else:
            seed_after_reshard(self.cfg.trainer.seed, self.step, self.state.dp_rank)
        if self.state.rank == 0 and rng is None:
            print(f"[mbert-train] resharding checkpoint {latest.name} from {describe_layout(state['layout'])} "
                  f"to {describe_layout(self._layout())}", flush=True)
        return True
