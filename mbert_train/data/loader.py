"""The loaders the trainer pulls from: an infinite resumable training stream, a fixed eval set."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader

from mbert_train.data.collate import PadCollator
from mbert_train.data.config import DataConfig
from mbert_train.data.corpus import open_dataset
from mbert_train.data.dataset import PretrainingDataset
from mbert_train.data.sampler import ShardedBatchSampler, eval_batches

Batch = dict[str, torch.Tensor]


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
                            persistent_workers=False)
        return iter(loader)

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

    def close(self) -> None:
        """Stop the worker processes; the next `next()` restarts them at the current state."""
        self._iterator = None

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
