"""Which samples each data-parallel rank reads, epoch after epoch, from any resume point.

The unit of the data stream is the global batch, GB = micro_batch_size x grad_accum x dp_size
samples: one optimizer step. Epoch e is shuffled by a permutation drawn from (seed, e), and
the step that starts at sample s of the epoch uses `perm[s:s+GB]`; in it, micro-step a uses
`[a*mb*dp:(a+1)*mb*dp]` and DP rank r reads `[r*mb:(r+1)*mb]` of that. So chunk k = a*dp + r
of a step is `[k*mb:(k+1)*mb]`: which samples a step uses depends on GB alone, and which rank
and micro-step reads them on mb alone. Steps start at s = 0, GB, 2*GB, ... (from a resume at
a different GB: at the sample offset reached, then every GB on); the epoch ends when fewer
than GB samples remain, a tail that is dropped, so no step straddles two epochs and every rank
gets the same number of micro-batches (none waits on a collective). With grad_accum=1 this is
one global micro-batch per step. All tensor-parallel ranks of one DP group pass the same
dp_rank and so read the same batch.

The sampler is infinite and yields `(epoch, index)` keys, so one DataLoader iterator spans
epochs; where it starts is (epoch, sample offset of the step, micro-step), the whole
resumable state.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from mbert_train.data.dataset import SHUFFLE_STREAM, stream_rng


class ShardedBatchSampler:
    """Infinite micro-batch sampler over epochs of varying size, resumable at any micro-step."""

    def __init__(self, epoch_size: Callable[[int], int], *, seed: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, grad_accum: int = 1, start_epoch: int = 0,
                 start_sample: int = 0, start_micro: int = 0):
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size={micro_batch_size} must be >= 1")
        if grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum} must be >= 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if not 0 <= start_micro < grad_accum:
            raise ValueError(f"start_micro={start_micro} must be in [0, grad_accum={grad_accum})")
        self.epoch_size = epoch_size
        self.seed, self.mb, self.dp_rank, self.dp_size = seed, micro_batch_size, dp_rank, dp_size
        self.grad_accum = grad_accum
        self.start_epoch, self.start_sample, self.start_micro = start_epoch, start_sample, start_micro

    @property
    def micro_global(self) -> int:
        """Samples of one micro-step over all DP ranks."""
        return self.mb * self.dp_size

    @property
    def global_batch(self) -> int:
        """Samples of one optimizer step over all DP ranks and micro-steps."""
        return self.mb * self.grad_accum * self.dp_size

    def steps_in_epoch(self, epoch: int, start_sample: int = 0) -> int:
        """Optimizer steps left in `epoch` from the step starting at `start_sample`."""
        return max(self.epoch_size(epoch) - start_sample, 0) // self.global_batch

    def batches_in_epoch(self, epoch: int) -> int:
        """Micro-batches per rank in a whole `epoch`."""
        return self.steps_in_epoch(epoch) * self.grad_accum

    def require_batches(self, epoch: int) -> int:
        """Micro-batches per rank in `epoch`; a one-line error when there is not even one step."""
        n = self.batches_in_epoch(epoch)
        if n == 0:
            raise ValueError(
                f"epoch {epoch} has {self.epoch_size(epoch)} samples, fewer than one global "
                f"batch (micro_batch_size={self.mb} x grad_accum={self.grad_accum} x "
                f"dp_size={self.dp_size}); use more data or a smaller batch")
        return n

    def epoch_batches(self, epoch: int, start_sample: int = 0,
                      first_micro: int = 0) -> Iterator[list[tuple[int, int]]]:
        """This rank's micro-batches of `epoch`, from micro-step `first_micro` of the step that
        starts at sample `start_sample`."""
        self.require_batches(epoch)
        perm = stream_rng(SHUFFLE_STREAM, self.seed, epoch).permutation(self.epoch_size(epoch))
        lo = self.dp_rank * self.mb
        for step in range(self.steps_in_epoch(epoch, start_sample)):
            base = start_sample + step * self.global_batch
            for a in range(first_micro if step == 0 else 0, self.grad_accum):
                first = base + a * self.micro_global + lo
                yield [(epoch, int(i)) for i in perm[first:first + self.mb]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, sample, micro = self.start_epoch, self.start_sample, self.start_micro
        while True:
            yield from self.epoch_batches(epoch, sample, micro)
            epoch, sample, micro = epoch + 1, 0, 0


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
