"""TP-aware randomness.

- Replicated activations (embeddings, residual branches after a row-parallel reduce) use the
  default generator of their device. All TP ranks of one DP replica are seeded alike, so their
  masks are identical, as they must be for the replicas to stay in sync.
- Sharded activations (attention probabilities, split by heads) need a different mask on every
  TP rank.
  - CPU (`model.blockwise.dropout_attention`): every (sample, global head) slab draws from its
    own generator, seeded from one draw of the replicated default generator plus the slab's
    global index. Ranks holding different heads get different masks, and a head's mask does not
    depend on the TP degree: TP-invariant at no cost.
  - CUDA: fused SDPA draws the local heads' mask from the default CUDA generator, reseeded for
    the call with `sharded_stream_seed` (one replicated draw plus the TP rank), as Megatron's
    model-parallel RNG tracker does; the replicated stream is put back afterwards.
  Every stream starts from a draw of the default generator, so activation checkpointing (which
  restores it before recomputing) redraws the same masks, and a checkpoint's RNG state covers
  them.
- `model.tp_invariant_dropout=true` draws the masks of *whole* tensors from the replicated
  stream and keeps the local slice (residual-stream dropout under sequence parallelism; on CUDA
  attention leaves fused SDPA for the blockwise path above), so the TP and SP degrees do not
  change which elements are dropped. Tests use it to prove TP=1 == TP=2 with dropout on.
- Masks come from `keep_mask`: 15-bit lanes of 64-bit random words (see below).
- DP replicas see different data and get different dropout: the training seed is offset by the
  DP rank (`training_seed`), while weight initialisation uses the same seed everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from mbert_train.parallel.mappings import group_rank, group_size

_DP_SEED_STRIDE = 1_000_003


def training_seed(seed: int, dp_rank: int) -> int:
    return seed + _DP_SEED_STRIDE * dp_rank


def seed_for_training(seed: int, dp_rank: int) -> None:
    """Reseed every device generator for the training loop (after the model is built)."""
    torch.manual_seed(training_seed(seed, dp_rank))


def seed_after_reshard(seed: int, step: int, dp_rank: int) -> None:
    """Fresh streams for a run resumed at another layout, whose RNG states cannot be carried
    over rank by rank: derived from the seed and the step, so the continuation is reproducible."""
    seed_for_training(seed + _DP_SEED_STRIDE * step, dp_rank)


# Keep-masks come from 15-bit lanes of 64-bit random words: four lanes per draw of the
# generator, about 6x faster on CPU than `bernoulli_` (1.8 against 11 ns per element). The
# dropout rate is p rounded to a multiple of 2^-15 (0.1 -> 0.100006), and kept values are scaled
# by the exact 1 / (1 - that rate), so the expectation is unchanged. Masks are 0/1 bytes
# (viewed as bool where a boolean is wanted): on CPU, multiplying by them is vectorised where
# comparisons producing bools and `masked_fill` are not (about 5x slower).
_LANE = 1 << 15


def _drop_threshold(p: float) -> int:
    return round(p * _LANE)


def keep_scale(p: float) -> float:
    """1 / (1 - the rate `keep_mask` drops at)."""
    return _LANE / (_LANE - _drop_threshold(p))


def _keep_bytes(lanes: torch.Tensor, p: float) -> torch.Tensor:
    """0/1 uint8 keep-mask of 16-bit random lanes: 1 where the low 15 bits >= the threshold."""
    lanes = torch.bitwise_and(lanes, _LANE - 1)
    return lanes.sub_(_drop_threshold(p) - 1).clamp_(0, 1).to(torch.uint8)


def keep_bytes(shape: Sequence[int], p: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """0/1 uint8 keep-mask (1 with probability 1 - p) from `generator` (default: the device's)."""
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(generator=generator)
    return _keep_bytes(words.view(torch.int16)[:numel], p).view(tuple(shape))


def keep_mask(shape: Sequence[int], p: float, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Boolean keep-mask (True with probability 1 - p): `keep_bytes` viewed as bool."""
    return keep_bytes(shape, p, device, generator).view(torch.bool)


def keep_bytes_from_seeds(seeds: Sequence[int], shape: Sequence[int], p: float, device) -> torch.Tensor:
    """0/1 uint8 keep-mask of `shape` (len(seeds), ...), whose slab i is drawn from a generator
    seeded seeds[i] (the same draw as `keep_bytes` from that generator)."""
    per_slab = math.prod(shape[1:])
    words = torch.empty(len(seeds), (per_slab + 3) // 4, dtype=torch.int64, device=device)
    gen = torch.Generator(device=device)
    for i, seed in enumerate(seeds):
        gen.manual_seed(seed)
        words[i].random_(generator=gen)
    return _keep_bytes(words.view(torch.int16)[:, :per_slab], p).view(tuple(shape))


def apply_keep(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout with a given keep-mask (bool or 0/1 bytes; autograd saves only the mask)."""
    return (x * keep.view(torch.uint8)).mul_(keep_scale(p))


def replicated_seed() -> int:
    """One draw from the replicated default CPU generator (the same on every TP rank): the root
    of every stream of sharded regions."""
    return int(torch.randint(0, 2**62, (1,), dtype=torch.int64).item())


def sharded_keep_mask(shape: tuple[int, ...], p: float, dim: int, group, device) -> torch.Tensor:
    """Keep-mask of the local shard of a tensor split along `dim`: drawn for the whole tensor from
    the default generator (the same on every TP rank) and sliced, so it does not depend on TP."""
    tp = group_size(group)
    full_shape = list(shape)
    full_shape[dim] *= tp
    return keep_mask(full_shape, p, device).chunk(tp, dim=dim)[group_rank(group)]


def sharded_stream_seed(group) -> int:
    """Seed of this TP rank's stream for sharded regions: `replicated_seed()` plus the TP rank."""
    return replicated_seed() + group_rank(group)


def local_dropout_keep(shape: tuple[int, ...], p: float, group, device) -> torch.Tensor:
    """Boolean keep-mask of this rank's shard, from the rank's own stream."""
    gen = torch.Generator(device=device)
    gen.manual_seed(sharded_stream_seed(group))
    return keep_mask(shape, p, device, gen)


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
