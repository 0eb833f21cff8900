"""TP-aware randomness.

- Replicated activations (embeddings, residual branches after a row-parallel reduce) use the
  default generator of their device. All TP ranks of one DP replica are seeded alike, so their
  masks are identical, as they must be for the replicas to stay in sync.
- Sharded activations (attention probabilities, split by heads) need a different mask on every
  TP rank. By default each rank draws them from its own stream, as Megatron's model-parallel
  RNG tracker does: `sharded_stream_seed` takes one number from the replicated default CPU
  generator (the same draw on every TP rank, so the replicated stream stays in sync) and adds
  the TP rank. The draw comes from the default generator, so activation checkpointing (which
  restores that generator before recomputing) redraws the same masks, and a checkpoint's RNG
  state covers it. Only the local heads' mask is drawn, and on CUDA the dropout runs inside
  fused SDPA (flash / memory-efficient kernels).
- `model.tp_invariant_dropout=true` instead draws the mask of the *whole* tensor from the
  default generator and keeps the local slice: the mask of a head then does not depend on the
  TP degree (TP=N with seed s drops exactly what TP=1 drops), at the cost of the explicit
  softmax path and a full-size mask on every rank. Tests use it to prove TP=1 == TP=2 with
  dropout on.
- DP replicas see different data and get different dropout: the training seed is offset by the
  DP rank (`training_seed`), while weight initialisation uses the same seed everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from mbert_train.parallel.mappings import group_rank, group_size

_DP_SEED_STRIDE = 1_000_003


def training_seed(seed: int, dp_rank: int) -> int:
    return seed + _DP_SEED_STRIDE * dp_rank


def seed_for_training(seed: int, dp_rank: int) -> None:
    """Reseed every device generator for the training loop (after the model is built)."""
    torch.manual_seed(training_seed(seed, dp_rank))


def sharded_dropout_mask(shape: tuple[int, ...], p: float, dim: int, group, device) -> torch.Tensor:
    """Keep-mask scaled by 1/(1-p) for the local shard of a tensor split along `dim`."""
    tp = group_size(group)
    full_shape = list(shape)
    full_shape[dim] *= tp
    keep = torch.rand(full_shape, device=device) >= p
    keep = keep.chunk(tp, dim=dim)[group_rank(group)]
    return keep.to(torch.float32).mul_(1.0 / (1.0 - p))


def sharded_stream_seed(group) -> int:
    """Seed of this TP rank's stream for sharded regions; one draw from the default CPU generator."""
    base = int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())
    return base + group_rank(group)


def local_dropout_keep(shape: tuple[int, ...], p: float, group, device) -> torch.Tensor:
    """Boolean keep-mask of this rank's shard, from the rank's own stream."""
    gen = torch.Generator(device=device)
    gen.manual_seed(sharded_stream_seed(group))
    return torch.rand(shape, device=device, generator=gen) >= p


@contextmanager
def sharded_cuda_rng(device: torch.device, group) -> Iterator[None]:
    """Run kernels that draw from the default CUDA generator (fused SDPA dropout) on this
    rank's stream, then put the replicated stream back untouched."""
    saved = torch.cuda.get_rng_state(device)
    torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()] \
        .manual_seed(sharded_stream_seed(group))
    try:
        yield
    finally:
        torch.cuda.set_rng_state(saved, device)
