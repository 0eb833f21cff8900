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
from mbert_train.data.corpus import open_dataset
from mbert_train.data.dataset import PretrainingDataset
from mbert_train.data.sampler import ShardedBatchSampler, eval_batches

Batch = dict[str, torch.Tensor]

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

    `state_dict()` records how many batches were *delivered* (prefetched ones do not count),
    so a loader given that state yields exactly the batches an uninterrupted loader would
    have yielded next, with any number of workers. The state is the same on every rank, so
    saving rank 0's copy is enough. It holds only ints and strings (`weights_only`-safe).
    """

    def __init__(self, dataset: PretrainingDataset, collate: PadCollator, *, seed: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int,
                 prefetch_factor: int):
        self.dataset, self.collate = dataset, collate
        self.seed, self.micro_batch_size = seed, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.epoch = 0
        self.position = 0
        self._iterator: Iterator[Batch] | None = None

    def sampler(self) -> ShardedBatchSampler:
        """A batch sampler starting at the current (epoch, position)."""
        return ShardedBatchSampler(self.dataset.epoch_size, seed=self.seed,
                                   micro_batch_size=self.micro_batch_size, dp_rank=self.dp_rank,
                                   dp_size=self.dp_size, start_epoch=self.epoch,
                                   start_batch=self.position)

    def batches_in_epoch(self, epoch: int | None = None) -> int:
        """Micro-batches per rank in `epoch` (default: the current one)."""
        return self.sampler().batches_in_epoch(self.epoch if epoch is None else epoch)

    def _start(self) -> Iterator[Batch]:
        workers = self.num_workers
        # An own generator: without it, starting the iterator draws the workers' base seed
        # from the global torch RNG, and a resumed run (which starts it after restoring the
        # RNG state) would then draw different dropout masks than the uninterrupted run.
        loader = DataLoader(self.dataset, batch_sampler=self.sampler(), num_workers=workers,
                            collate_fn=self.collate,
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
        self.position += 1
        if self.position == self.batches_in_epoch():
            self.epoch, self.position = self.epoch + 1, 0
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

    def mark(self) -> tuple[int, int]:
        """The current position, for `rewind`."""
        return self.epoch, self.position

    def rewind(self, mark: tuple[int, int]) -> None:
        """Go back to `mark`: batches delivered since then are delivered again."""
        self.close()
        self.epoch, self.position = mark

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

    def _signature(self) -> str:
        c = self.dataset.cfg
        return (f"{c.objective}/{c.max_seq_length}/{c.short_seq_prob}/"
                f"{self.dataset.corpus.metadata['num_tokens']}")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "micro_batch_size": self.micro_batch_size, "dp_size": self.dp_size,
                "signature": self._signature()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`; a new micro-batch/DP size is fine at a sample boundary."""
        if state["seed"] != self.seed:
            raise ValueError(f"data loader state was saved with seed={state['seed']}, this run "
                             f"has seed={self.seed}; resume with the original seed")
        if state["signature"] != self._signature():
            raise ValueError(f"data loader state was saved for data {state['signature']} "
                             f"(objective/max_seq_length/short_seq_prob/tokens), this run reads "
                             f"{self._signature()}; resume with the original data settings")
        consumed = state["position"] * state["micro_batch_size"] * state["dp_size"]
        global_batch = self.micro_batch_size * self.dp_size
        if consumed % global_batch:
            raise ValueError(
                f"cannot resume: {consumed} samples of epoch {state['epoch']} were consumed, "
                f"not a multiple of micro_batch_size x dp_size = {global_batch}; resume with "
                f"micro_batch_size={state['micro_batch_size']}, dp_size={state['dp_size']}")
        self.close()
        self.epoch, self.position = int(state["epoch"]), consumed // global_batch


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
                  dp_rank: int, dp_size: int) -> tuple[TrainLoader, EvalLoader]:
    """Open `dataset_dir` and build this DP rank's training and evaluation loaders."""
    corpus = open_dataset(dataset_dir)
    collate = PadCollator(corpus.special.pad, cfg.pad_to_multiple_of, cfg.max_seq_length)
    train = PretrainingDataset(corpus, "train", cfg, seed)
    train.check_usable()
    train_loader = TrainLoader(train, collate, seed=seed, micro_batch_size=micro_batch_size,
                               dp_rank=dp_rank, dp_size=dp_size, num_workers=cfg.num_workers,
                               prefetch_factor=cfg.prefetch_factor)
    # Fails here, one line, rather than in the first training step.
    train_loader.sampler().require_batches(0)
    heldout = PretrainingDataset(corpus, "heldout", cfg, cfg.eval_seed)
    usable = len(heldout.docs) >= (2 if heldout.pairs else 1)
    batches = eval_batches(heldout.epoch_size(0) if usable else 0, limit=cfg.eval_max_samples,
                           micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
    return train_loader, EvalLoader(heldout, collate, batches)
