"""TP-aware randomness.

- Replicated activations (embeddings, residual branches after a row-parallel reduce) use the
  default generator of their device. All TP ranks of one DP replica are seeded alike, so their
  masks are identical, as they must be for the replicas to stay in sync.
- Sharded activations (attention probabilities, split by heads) draw the mask of the *whole*
  tensor and keep their slice. Ranks therefore get different masks (different heads), the draw
  advances every rank's generator identically, and the mask of a head does not depend on the
  TP degree: TP=N with seed s drops exactly what TP=1 with seed s drops.
- DP replicas see different data and get different dropout: the training seed is offset by the
  DP rank (`training_seed`), while weight initialisation uses the same seed everywhere.
"""

from __future__ import annotations

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
