"""The training loop around a DeepSpeed engine: steps, NaN skipping, evaluation; checkpoints
(saved, loaded and resumed bit for bit) are `mbert_train.checkpoint.state`'s."""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mbert_train.arithmetic import masked_fraction
from mbert_train.checkpoint import find_latest
from mbert_train.checkpoint.state import COUNTERS, Checkpointer, any_rank, locate_checkpoint
from mbert_train.config import TrainConfig
from mbert_train.data.loader import STOP_SIGNALS
from mbert_train.errors import UserError
from mbert_train.lease import Lease
from mbert_train.metrics import MetricsLogger, ProgressBar, mfu, model_flops_per_token, peak_memory_gib
from mbert_train.parallel.layout import ParallelState
from mbert_train.rng import restore_rng_state


class TrainingDiverged(UserError):
    """Non-finite loss, gradients or weights that the run cannot recover from by itself."""


class Trainer:
    def __init__(self, cfg: TrainConfig, state: ParallelState, engine, train_loader, eval_loader,
                 run_dir: Path, device: torch.device, log: MetricsLogger | None = None, dataset: dict | None = None,
                 lease: Lease | None = None):
        self.cfg, self.state, self.engine = cfg, state, engine
        self.train_loader, self.eval_loader = train_loader, eval_loader
        self.run_dir, self.device, self.log = run_dir, device, log
        # dataset: {"path", "tokenizer_sha256"}, recorded in each checkpoint, where the export finds the tokenizer
        self.checkpoints = Checkpointer(cfg, state, engine, train_loader, run_dir, device, lease=lease, log=log,
                                        dataset=dataset)
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
    def save(self) -> None:
        """Write the checkpoint of this step, unless a weight is not finite on any rank."""
        finite = all(bool(torch.isfinite(p).all()) for p in self.engine.module.parameters())
        if self._any_rank(not finite):  # each TP rank checks its own shards
            raise TrainingDiverged(f"parameters are not finite at step {self.step}; not writing a checkpoint: "
                                   f"lower optim.lr or raise trainer.grad_clip and resume from the last one")
        self.checkpoints.save({k: getattr(self, k) for k in COUNTERS})

    def resume(self, latest: Path | None = None) -> bool:
        """Continue from `latest` (default: RUN_DIR's latest checkpoint, if any), written at this
        layout or any other (TP, DP, ZeRO stage, micro-batch, grad_accum)."""
        latest = locate_checkpoint(self.checkpoints.dir, self.device) if latest is None else latest
        if latest is None:
            return False
        resumed = self.checkpoints.load(latest)
        self.step, self.bad_in_a_row, self.skipped = (resumed.counters[k] for k in COUNTERS)
        self._pending_rng, self.resume_note = resumed.rng, resumed.note
        return True
