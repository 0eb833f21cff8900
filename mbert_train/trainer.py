"""The training loop around a DeepSpeed engine: steps, NaN skipping, evaluation, and
checkpoints that resume bit for bit (model, optimizer, schedule, data position, every RNG)."""

from __future__ import annotations

import enum
import json
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from mbert_train.arithmetic import masked_fraction
from mbert_train.checkpoint import CheckpointDir, CheckpointError, find_latest, load_torch, read_json, read_meta, write_errors
from mbert_train.config import TrainConfig
from mbert_train.data.loader import STOP_SIGNALS
from mbert_train.errors import UserError
from mbert_train.metrics import MetricsLogger, ProgressBar, mfu, model_flops_per_token, peak_memory_gib, redact
from mbert_train.model.weights import load_full_from_dir, save_model_shard, shard_state_dict
from mbert_train.parallel.layout import ParallelState
from mbert_train.rng import capture_rng_state, restore_rng_state


LOSS_SCALER_KEY = "loss_scaler"
# What a trainer_rank*.pt holds, and the only engine attributes a resume sets from it.
TRAINER_STATE_KEYS = ("step", "bad_in_a_row", "skipped", "optimizer", "scheduler", "loader", "rng", "engine")
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")


class TrainingDiverged(UserError):
    """Non-finite loss, gradients or weights that the run cannot recover from by itself."""


def _plain(value):
    """Enums (DeepSpeed's ZeroStageEnum) as their values, recursively: weights_only-loadable."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def _plain_optimizer_state(optimizer) -> dict:
    """The optimizer's state dict made loadable by `torch.load(weights_only=True)`: DeepSpeed's
    LossScaler object becomes its plain attributes, enums their values, and the fragment map
    that only DeepSpeed's universal-checkpoint converter reads is dropped."""
    sd = dict(optimizer.state_dict())
    sd.pop("param_slice_mappings", None)
    scaler = sd.get(LOSS_SCALER_KEY)
    if scaler is not None and not isinstance(scaler, dict):
        sd[LOSS_SCALER_KEY] = {k: v for k, v in vars(scaler).items() if isinstance(v, (int, float, bool))}
    return _plain(sd)


def _trainer_file(rank: int) -> str:
    return f"trainer_rank{rank:05d}.pt"


def checked_trainer_state(state, path: Path) -> dict:
    """A loaded trainer_rank*.pt, refused unless it has our keys and exactly the integer engine
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


class Trainer:
    def __init__(self, cfg: TrainConfig, state: ParallelState, engine, scheduler, train_loader, eval_loader,
                 run_dir: Path, device: torch.device, log: MetricsLogger | None = None):
        self.cfg, self.state, self.engine, self.scheduler = cfg, state, engine, scheduler
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.run_dir, self.device, self.log = run_dir, device, log
        self.ckpt = CheckpointDir(run_dir, rank=state.rank, keep_last=cfg.trainer.keep_last)
        self.step = 0
        self.bad_in_a_row = 0
        self.skipped = 0
        self.wandb_run_id: str | None = None
        self._stop_requested = False
        self._pending_rng: dict | None = None
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
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

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
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        return {"loss": totals[0].item() / (dp * accum), "mlm_loss": totals[1].item() / (dp * accum),
                "nsp_loss": totals[2].item() / (dp * accum), "tokens": totals[3].item(),
                "lr": self.scheduler.get_last_lr()[0], "applied": applied,
                "grad_norm": None if norm is None else float(norm)}

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
        while self.step < t.max_steps:
            # The ranks agree on a stop before each step, once its batches are in hand: a DataLoader
            # worker that died with the stop signal then fails the fetch, never a half-done step.
            mark = self.train_loader.mark()
            micro = self._fetch(t.grad_accum)
            if self._any_rank(self._stop_requested or micro is None):
                self.train_loader.rewind(mark)  # the checkpoint resumes with this step's batches
                self._stop(bar, write=saved_at != self.step)
            m = self.train_step(iter(micro))
            self.step += 1
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
                "zero_stage": self.cfg.parallel.zero_stage}

    def _raise_together(self, error: UserError | None, what: str) -> None:
        """An all-reduce, so also a barrier: if `error` happened on any rank, every rank raises
        (the failing rank its own message), and no rank is left waiting for a peer that died."""
        if self._any_rank(error is not None):
            raise error or CheckpointError(f"{what} failed on another rank; see that rank's error")

    def save(self) -> None:
        """Write the checkpoint of this step. The ranks agree after each stage (begin, write,
        commit), so a failure on any rank (disk full, non-finite weights) stops them all."""
        model = self.engine.module
        finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
        if self._any_rank(not finite):  # each TP rank checks its own shards
            raise TrainingDiverged(f"parameters are not finite at step {self.step}; not writing a checkpoint: "
                                   f"lower optim.lr or raise trainer.grad_clip and resume from the last one")
        tmp = self.ckpt.tmp_path(self.step)
        stages = (lambda: self.ckpt.begin(self.step), lambda: self._write_files(tmp),
                  lambda: self.ckpt.commit(self.step, layout=self._layout()))
        for stage in stages:
            error = None
            try:
                stage()
            except CheckpointError as exc:
                error = exc
            self._raise_together(error, f"writing the checkpoint of step {self.step}")

    def _write_files(self, tmp: Path) -> None:
        model = self.engine.module
        if self.state.dp_rank == 0:
            with write_errors(tmp):
                save_model_shard(tmp, model, self.state.tp_rank, self.state.dims.tensor_parallel)
        with write_errors(tmp / _trainer_file(self.state.rank)):
            torch.save({
                "step": self.step, "bad_in_a_row": self.bad_in_a_row, "skipped": self.skipped,
                "optimizer": _plain_optimizer_state(self.engine.optimizer), "scheduler": self.scheduler.state_dict(),
                "loader": self.train_loader.state_dict(), "rng": capture_rng_state(),
                "engine": {key: getattr(self.engine, key) for key in ENGINE_COUNTERS},
            }, tmp / _trainer_file(self.state.rank))
        if self.state.rank == 0:
            with write_errors(tmp / "run.json"):
                (tmp / "run.json").write_text(json.dumps({"wandb_run_id": self.wandb_run_id,
                                                          "config": redact(asdict(self.cfg))}, indent=2, default=str))

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

    def resume(self) -> bool:
        """Continue from RUN_DIR's latest checkpoint, if any; refuses a different layout."""
        error, latest, state = None, None, None
        try:
            self.ckpt.collect_garbage()  # rank 0 repairs first; the others read after the barrier
        except CheckpointError as exc:
            error = exc
        self._raise_together(error, "cleaning up the checkpoint directory")
        try:
            latest = self.ckpt.latest()
            state = None if latest is None else self._read_trainer_state(latest)
        except CheckpointError as exc:
            error = exc
        self._raise_together(error, "reading the checkpoint")
        if latest is None:
            return False
        self.load_weights(latest)
        opt = self.engine.optimizer
        if self.cfg.parallel.zero_stage > 0:
            scaler = state["optimizer"].pop(LOSS_SCALER_KEY, None)
            if scaler is not None:
                vars(opt.loss_scaler).update(scaler)
            per_dp = [None] * self.state.dims.data_parallel
            per_dp[self.state.dp_rank] = state["optimizer"]
            opt.load_state_dict(per_dp, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            opt.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["loader"])
        for key in ENGINE_COUNTERS:
            setattr(self.engine, key, state["engine"][key])
        self.step, self.bad_in_a_row, self.skipped = state["step"], state["bad_in_a_row"], state["skipped"]
        run_file = latest / "run.json"
        if run_file.is_file():
            self.wandb_run_id = read_json(run_file).get("wandb_run_id")
        self._pending_rng = state["rng"]
        return True

    def _read_trainer_state(self, latest: Path) -> dict:
        saved = read_meta(latest).get("layout", {})
        if saved and saved != self._layout():
            raise CheckpointError(
                f"checkpoint {latest} was written with {saved}, this run has {self._layout()}; resume with the "
                f"same parallel.* and world size, or start a new run.dir with trainer.init_from={latest}")
        path = latest / _trainer_file(self.state.rank)
        return checked_trainer_state(load_torch(path), path)
