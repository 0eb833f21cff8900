"""The loaders the trainer pulls from: an infinite resumable training stream, a fixed eval set."""

from __future__ import annotations

import atexit
import signal
import threading
import weakref
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from mbert_train.data.collate import PadCollator
from mbert_train.data.config import DataConfig
from mbert_train.data.corpus import DatasetError, open_dataset
from mbert_train.data.dataset import PretrainingDataset
from mbert_train.data.sampler import ShardedBatchSampler, eval_batches

Batch = dict  # the contract of `mbert_train.batch`: tensors and a `Packing`

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
"""Signals that ask a run to checkpoint and stop: SLURM preemption and time limits, scancel,
`timeout`, Ctrl-C, torchrun forwarding them. They go to the whole process group, DataLoader
workers included; only the main process acts on them (`Trainer.install_signal_handlers`)."""


def _leave_stop_to_main(worker_id: int) -> None:
    """worker_init_fn: ignore the stop signals. torch's own SIGTERM handler in a worker exits
    unless the parent sent the signal, and the main process then dies of "DataLoader worker is
    killed by signal" before it can checkpoint. The main process shuts the workers down itself."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # also discards one that arrived since the fork
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _worker_failure_at_fetch() -> None:
    """Report a dead worker at the next fetch, never in the middle of a step.

    torch raises "DataLoader worker ... is killed by signal" from a SIGCHLD handler, that is at
    any bytecode of the main thread: inside an optimizer step or a checkpoint write. The fetch
    finds a dead worker by itself (within 5 s, `MP_STATUS_CHECK_INTERVAL`) and raises there,
    where nothing is half done: `TrainLoader.take` puts the position back, and a stop in
    progress still checkpoints the last completed step.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if not callable(torch_handler) or getattr(torch_handler, "fails_at_fetch", False):
        return

    def handler(signum, frame) -> None:
        try:
            torch_handler(signum, frame)
        except RuntimeError as exc:
            if "DataLoader worker" not in str(exc):
                raise

    handler.fails_at_fetch = True
    signal.signal(signal.SIGCHLD, handler)


_running: weakref.WeakSet = weakref.WeakSet()
"""TrainLoaders with live workers, closed at exit (see `TrainLoader.close`)."""


@atexit.register  # registered after torch's and multiprocessing's exit hooks, so it runs before them
def _close_running() -> None:
    for loader in list(_running):
        loader.close()


class TrainLoader:
    """Infinite iterator of this DP rank's training micro-batches, rolling over epochs.

    The position is counted in global samples (all DP ranks, all micro-steps): the epoch, the
    sample of the epoch where the current optimizer step started, the micro-steps of it already
    delivered, and the running total of samples consumed since the start of training.
    `state_dict()` records what was *delivered* (prefetched batches do not count), so a loader
    given that state yields exactly the batches an uninterrupted loader would have yielded
    next, with any number of workers, and a loader with another layout of the same global batch
    yields the same samples per step (see `load_state_dict`). The state is the same on every
    rank, so saving rank 0's copy is enough. It holds only ints and strings (`weights_only`-safe),
    among them the corpus fingerprint: a position means these samples only on this corpus.
    """

    def __init__(self, dataset: PretrainingDataset, collate: PadCollator, *, seed: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int,
                 prefetch_factor: int, grad_accum: int = 1, pin_memory: bool = False):
        self.dataset, self.collate = dataset, collate
        self.pin_memory = pin_memory
        self.seed, self.micro_batch_size, self.grad_accum = seed, micro_batch_size, grad_accum
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.epoch = 0
        self.step_start = 0  # sample of the epoch where the current optimizer step starts
        self.micro = 0  # micro-steps of the current optimizer step delivered
        self._total = 0  # global samples delivered since the start of training
        self._iterator: Iterator[Batch] | None = None

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: micro_batch_size x grad_accum x DP."""
        return self.micro_batch_size * self.grad_accum * self.dp_size

    @property
    def global_samples(self) -> int:
        """Samples (all DP ranks) delivered since the start of training, across resumes."""
        return self._total

    def sampler(self) -> ShardedBatchSampler:
        """A batch sampler starting at the current position."""
        return ShardedBatchSampler(self.dataset.epoch_size, seed=self.seed,
                                   micro_batch_size=self.micro_batch_size, dp_rank=self.dp_rank,
                                   dp_size=self.dp_size, grad_accum=self.grad_accum,
                                   start_epoch=self.epoch, start_sample=self.step_start,
                                   start_micro=self.micro)

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        """Micro-batches per rank in a whole `epoch` (default: the current one)."""
        return self.sampler().batches_in_epoch(self.epoch if epoch is None else epoch)

    def _roll_over(self) -> None:
        """Start the next epoch when fewer than a global batch of samples remain in this one."""
        if self.micro == 0 and self.sampler().steps_in_epoch(self.epoch, self.step_start) == 0:
            self.epoch, self.step_start = self.epoch + 1, 0

    def _start(self) -> Iterator[Batch]:
        workers = self.num_workers
        # An own generator: without it, starting the iterator draws the workers' base seed
        # from the global torch RNG, and a resumed run (which starts it after restoring the
        # RNG state) would then draw different dropout masks than the uninterrupted run.
        loader = DataLoader(self.dataset, batch_sampler=self.sampler(), num_workers=workers,
                            collate_fn=self.collate, pin_memory=self.pin_memory,
                            generator=torch.Generator().manual_seed(self.seed),
                            prefetch_factor=self.prefetch_factor if workers else None,
                            persistent_workers=False, worker_init_fn=_leave_stop_to_main)
        if not workers:
            return iter(loader)
        # Blocked while the workers are forked: a stop signal in that window stays pending here
        # (and is handled right after) instead of killing a worker before it ignores it.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            iterator = iter(loader)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _worker_failure_at_fetch()
        _running.add(self)
        return iterator

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> Batch:
        if self._iterator is None:
            self._iterator = self._start()
        batch = next(self._iterator)
        self.micro += 1
        self._total += self.micro_batch_size * self.dp_size
        if self.micro == self.grad_accum:
            self.step_start, self.micro = self.step_start + self.global_batch, 0
            self._roll_over()
        return batch

    def take(self, n: int) -> list[Batch]:
        """The next `n` micro-batches (one optimizer step), all or none: if a fetch fails (a
        worker died), the position is put back and the next call restarts the workers there."""
        mark = self.mark()
        try:
            return [next(self) for _ in range(n)]
        except BaseException:
            self.rewind(mark)
            raise

    def mark(self) -> tuple[int, int, int, int]:
        """The current position, for `rewind`."""
        return self.epoch, self.step_start, self.micro, self._total

    def rewind(self, mark: tuple[int, int, int, int]) -> None:
        """Go back to `mark`: batches delivered since then are delivered again."""
        self.close()
        self.epoch, self.step_start, self.micro, self._total = mark

    def close(self) -> None:
        """Stop the worker processes now; the next `next()` restarts them at the current state.

        Now, not whenever the iterator is collected: the workers ignore SIGTERM, and left to
        Python's exit they would be (multiprocessing terminates daemon children with SIGTERM,
        then waits for them forever)."""
        iterator, self._iterator = self._iterator, None
        _running.discard(self)
        if hasattr(iterator, "_shutdown_workers"):  # torch's own clean shutdown
            iterator._shutdown_workers()
            for worker in iterator._workers:
                if worker.is_alive():  # stuck: it ignored torch's SIGTERM
                    worker.kill()
                    worker.join()

    def _signature(self, *, with_tokens: bool) -> str:
        """objective/max_seq_length/short_seq_prob, and the corpus' token count for states saved
        before the corpus fingerprint (the only trace of the corpus they hold)."""
        c = self.dataset.cfg
        settings = f"{c.objective}/{c.max_seq_length}/{c.short_seq_prob}"
        return f"{settings}/{self.dataset.corpus.metadata['num_tokens']}" if with_tokens else settings

    def state_dict(self) -> dict:
        in_step = self.micro * self.micro_batch_size * self.dp_size
        return {"epoch": self.epoch, "sample": self.step_start + in_step, "in_step": in_step,
                "global_samples": self._total, "seed": self.seed,
                "micro_batch_size": self.micro_batch_size, "grad_accum": self.grad_accum,
                "dp_size": self.dp_size, "signature": self._signature(with_tokens=False),
                "corpus": self.dataset.corpus.fingerprint}

    def load_state_dict(self, state: dict) -> str | None:
        """Continue from `state`, saved at any micro_batch_size, grad_accum and DP size.

        The same global batch continues the uninterrupted run's steps exactly: the same samples
        per optimizer step in the same order of chunks k = micro_step x DP + rank, so with the
        same micro_batch_size the same ids in each chunk. Another global batch continues at the
        same sample of the same epoch, its steps starting there, and returns a one-line note
        that says so (None when the steps continue unchanged). A state saved on another corpus
        is refused unless `data.accept_changed_corpus`, which continues with a note."""
        if state["seed"] != self.seed:
            raise ValueError(f"data loader state was saved with seed={state['seed']}, this run "
                             f"has seed={self.seed}; resume with the original seed")
        fingerprinted = "corpus" in state
        signature = self._signature(with_tokens=not fingerprinted)
        if state["signature"] != signature:
            raise ValueError(f"data loader state was saved for data {state['signature']} "
                             f"(objective/max_seq_length/short_seq_prob{'' if fingerprinted else '/tokens'}), "
                             f"this run reads {signature}; resume with the original data settings")
        corpus_note = self._corpus_note(state["corpus"]) if fingerprinted else None
        if "sample" not in state:
            state = self._from_micro_batch_count(state)
        epoch, sample, in_step = int(state["epoch"]), int(state["sample"]), int(state["in_step"])
        saved = state["micro_batch_size"] * state["grad_accum"] * state["dp_size"]
        per_micro = self.micro_batch_size * self.dp_size
        self.close()
        self.epoch, self._total = epoch, int(state["global_samples"])
        exact = saved == self.global_batch and in_step % per_micro == 0
        if exact and corpus_note is None:
            self.step_start, self.micro = sample - in_step, in_step // per_micro
            return None
        # A new step starts at the sample reached (the next epoch if it no longer fits: a
        # changed corpus may have smaller epochs).
        self.step_start, self.micro = sample, 0
        self._roll_over()
        if exact:
            return corpus_note
        why = (f"global batch changed from {saved} to {self.global_batch} samples "
               f"(micro_batch_size x grad_accum x DP)" if saved != self.global_batch else
               f"the state was saved {in_step} samples into an optimizer step, not a multiple of "
               f"micro_batch_size x DP = {per_micro}")
        note = f"{why}; continuing at global sample {self._total} of the data stream"
        return f"{corpus_note}; {note}" if corpus_note else note

    def _corpus_note(self, saved: str) -> str | None:
        """None for the corpus the state was saved on; a note for another one if the config
        accepts it, else a one-line DatasetError."""
        corpus = self.dataset.corpus
        if saved == corpus.fingerprint:
            return None
        if not self.dataset.cfg.accept_changed_corpus:
            raise DatasetError(
                f"data.path={corpus.path} is not the corpus the checkpoint's data position counts samples of "
                f"(fingerprint {corpus.fingerprint[:12]}, saved {saved[:12]}: other text, sentence splits or "
                f"held-out documents); start a new run on it with a new run.dir (trainer.init_from=CHECKPOINT "
                f"keeps the weights), or continue this one with data.accept_changed_corpus=true")
        return (f"data.accept_changed_corpus=true: the corpus changed since the checkpoint (fingerprint "
                f"{saved[:12]} -> {corpus.fingerprint[:12]}); the data position now counts its samples")

    def _from_micro_batch_count(self, state: dict) -> dict:
        """A state of the format before grad_accum counted (a position in global micro-batches,
        one per step): the same position in samples; the total assumes that layout throughout."""
        per_step = state["micro_batch_size"] * state["dp_size"]
        sample = state["position"] * per_step
        before = sum(self.dataset.epoch_size(e) // per_step * per_step
                     for e in range(state["epoch"]))
        return {**state, "sample": sample, "in_step": 0, "grad_accum": 1,
                "global_samples": before + sample}


class EvalLoader:
    """The same held-out batches, in the same order, on every pass (finite; may be empty)."""

    def __init__(self, dataset: PretrainingDataset, collate: PadCollator,
                 batches: list[list[tuple[int, int]]]):
        self.dataset, self.collate, self.batches = dataset, collate, batches

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_samples(self) -> int:
        return sum(len(b) for b in self.batches)

    def __iter__(self) -> Iterator[Batch]:
        for keys in self.batches:
            yield self.collate([self.dataset[key] for key in keys])


def build_loaders(cfg: DataConfig, dataset_dir: str, *, seed: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int, grad_accum: int = 1,
                  pin_memory: bool = False) -> tuple[TrainLoader, EvalLoader]:
    """Open `dataset_dir` and build this DP rank's training and evaluation loaders; the
    training stream advances by optimizer steps of micro_batch_size x grad_accum x dp_size.
    `pin_memory` (for CUDA) pins the training batches, so they go to the GPU asynchronously."""
    corpus = open_dataset(dataset_dir)
    collate = PadCollator(corpus.special.pad, cfg.pad_to_multiple_of, cfg.max_seq_length)
    train = PretrainingDataset(corpus, "train", cfg, seed)
    train.check_usable()
    train_loader = TrainLoader(train, collate, seed=seed, micro_batch_size=micro_batch_size,
                               dp_rank=dp_rank, dp_size=dp_size, num_workers=cfg.num_workers,
                               prefetch_factor=cfg.prefetch_factor, grad_accum=grad_accum,
                               pin_memory=pin_memory)
    # Fails here, one line, rather than in the first training step.
    train_loader.sampler().require_batches(0)
    heldout = PretrainingDataset(corpus, "heldout", cfg, cfg.eval_seed)
    usable = len(heldout.docs) >= (2 if heldout.pairs else 1)
    batches = eval_batches(heldout.epoch_size(0) if usable else 0, limit=cfg.eval_max_samples,
                           micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    return train_loader, EvalLoader(heldout, collate, batches)
