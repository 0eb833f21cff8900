"""Which samples each data-parallel rank reads, epoch after epoch, from any resume point.

Epoch e is shuffled by a permutation drawn from (seed, e). Global batch j of the epoch is
`perm[j*G:(j+1)*G]` with G = micro_batch_size * dp_size, and DP rank r reads its slice
`[r*mb:(r+1)*mb]`: the ranks' batches are disjoint, every rank gets the same number of
batches (the tail shorter than G is dropped, so no rank waits on a collective), and together
they cover the epoch. All tensor-parallel ranks of one DP group pass the same dp_rank and so
read the same batch.

The sampler is infinite and yields `(epoch, index)` keys, so one DataLoader iterator spans
epochs; where it starts is (epoch, batch position), the whole resumable state.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from mbert_train.data.dataset import SHUFFLE_STREAM, stream_rng


class ShardedBatchSampler:
    """Infinite batch sampler over epochs of varying size, resumable at any batch."""

    def __init__(self, epoch_size: Callable[[int], int], *, seed: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, start_epoch: int = 0, start_batch: int = 0):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        self.epoch_size = epoch_size
        self.seed, self.mb, self.dp_rank, self.dp_size = seed, micro_batch_size, dp_rank, dp_size
        self.start_epoch, self.start_batch = start_epoch, start_batch

    @property
    def global_batch(self) -> int:
        return self.mb * self.dp_size

    def batches_in_epoch(self, epoch: int) -> int:
        return self.epoch_size(epoch) // self.global_batch

    def require_batches(self, epoch: int) -> int:
        """Batches in `epoch`; a one-line error when there is not even one."""
        n = self.batches_in_epoch(epoch)
        if n == 0:
            raise ValueError(
                f"epoch {epoch} has {self.epoch_size(epoch)} samples, fewer than one global "
                f"batch (micro_batch_size={self.mb} x dp_size={self.dp_size}); use more data "
                f"or a smaller batch")
        return n

    def epoch_batches(self, epoch: int, first_batch: int = 0) -> Iterator[list[tuple[int, int]]]:
        """This rank's batches of `epoch`, starting at batch `first_batch`."""
        n = self.require_batches(epoch)
        perm = stream_rng(SHUFFLE_STREAM, self.seed, epoch).permutation(self.epoch_size(epoch))
        lo = self.dp_rank * self.mb
        for j in range(first_batch, n):
            block = perm[j * self.global_batch + lo:j * self.global_batch + lo + self.mb]
            yield [(epoch, int(i)) for i in block]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, first = self.start_epoch, self.start_batch
        while True:
            yield from self.epoch_batches(epoch, first)
            epoch, first = epoch + 1, 0


def eval_batches(n_samples: int, *, limit: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int) -> list[list[tuple[int, int]]]:
    """This rank's fixed evaluation batches of epoch 0, in order.

    At most `limit` samples, spread evenly over the held-out map so every held-out document is
    represented; split into equal per-rank shares (the < dp_size remainder is dropped), each in
    micro-batches with a shorter last one, so all ranks run the same number of equal batches.
    """
    n = min(n_samples, limit)
    chosen = (np.arange(n, dtype=np.int64) * n_samples) // max(n, 1)
    share = n // dp_size
    mine = chosen[dp_rank * share:(dp_rank + 1) * share]
    return [[(0, int(i)) for i in mine[k:k + micro_batch_size]]
            for k in range(0, share, micro_batch_size)]
