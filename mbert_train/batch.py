"""The batch contract between the data pipeline and the model: what a micro-batch holds.

The collator (`mbert_train.data.collate.PadCollator`) builds a micro-batch in the DataLoader
workers, and `MegatronBert.forward` reads it:

- `input_ids`, `token_type_ids`, `attention_mask` (1 on real tokens, which come first in each
  row) and `mlm_labels` (the original id where a token is predicted, `IGNORE_INDEX` elsewhere
  and on padding): int64 (b, s);
- `nsp_labels`: int64 (b,), where the samples carry a sentence-pair label;
- `packing`: a `Packing`, where the real tokens and the read positions are, worked out from
  `attention_mask` and `mlm_labels` on the host.

The model decides from the packing alone, with no device tensor read back, which layout a batch
runs in and which rows the heads read: on a GPU each read-back (`.item()`, `.tolist()`,
`nonzero`, a boolean index, `bool(tensor)`) would stall the launch queue once per micro-batch.
On CUDA runs the DataLoader pins the packing's tensors with the others, and the trainer moves
them all with `.to(device, non_blocking=True)`.

A batch without `packing` (a user's, the Hugging Face checks', a benchmark's hand-made one)
works too: the model then builds the packing itself with `Packing.from_masks`, one read-back.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100
"""`mlm_labels` of a position with nothing to predict (padding, unmasked tokens): the value
`torch.nn.functional.cross_entropy` and transformers ignore by default."""

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels", "packing")

@dataclass(frozen=True)
class Packing:
    """The layout of a padded (b, s) batch's real tokens and of the positions the heads read.

    Packed, the real tokens of the samples lie end to end, as NVIDIA's BERT recipe and MosaicBERT
    run them, so the dense layers do no work on padding: the hidden states are (1, T, h) and
    every layer but attention, which keeps each sample to its own stretch, sees one long sample.
    The heads read each sample's [CLS] (position 0, for the pooler) and its predicted tokens: the
    "read tokens", M of them, K of which are predicted.

    Tensors (int64; on the host when built, then on the batch's device):
    `index` (T,), the flat positions (sample * s + position) of the real tokens, ascending;
    `offsets` (b + 1,), `starts` as a tensor: sample i's tokens are [starts[i], starts[i + 1])
    of the packed sequence; `read_rows` (M,), the packed positions of the read tokens, ascending;
    `read_offsets` (b + 1,), `read_starts` as a tensor, likewise bounding each sample's read
    tokens; `predicted` (K,), which of the M read tokens are predicted, ascending (so sample
    after sample, in the order of `mlm_labels[mlm_labels != IGNORE_INDEX]`).

    Python ints, which kernels need on the host: `starts`, `read_starts` and `seq` (s). Tensors
    and ints describe the same batch; only `from_masks` makes one."""

    index: torch.Tensor
    offsets: torch.Tensor
    read_rows: torch.Tensor
    read_offsets: torch.Tensor
    predicted: torch.Tensor
    starts: tuple[int, ...]
    read_starts: tuple[int, ...]
    seq: int

    @classmethod
    def from_masks(cls, attention_mask: torch.Tensor, mlm_labels: torch.Tensor) -> Packing:
        """From the (b, s) `attention_mask` and `mlm_labels` of a batch, on any device; the
        packing is on the host."""
        real = attention_mask.detach().to("cpu", torch.bool)
        predicted = (mlm_labels.detach().cpu() != IGNORE_INDEX) & real
        read = predicted.clone()
        read[:, 0] = real[:, 0]  # [CLS]
        flat_real, flat_read = real.view(-1), read.view(-1)
        packed_position = flat_real.cumsum(0) - 1  # of each real token
        starts = (0, *real.sum(1).cumsum(0).tolist())
        read_starts = (0, *read.sum(1).cumsum(0).tolist())
        return cls(index=flat_real.nonzero().view(-1), offsets=torch.tensor(starts),
                   read_rows=packed_position[flat_read], read_offsets=torch.tensor(read_starts),
                   predicted=predicted.view(-1)[flat_read].nonzero().view(-1), starts=starts,
                   read_starts=read_starts, seq=real.shape[1])

    @property
    def batch(self) -> int:
        return len(self.starts) - 1

    @property
    def padded(self) -> bool:
        """Whether the batch has padding (else packed and padded layouts hold the same tokens)."""
        return self.starts[-1] < self.batch * self.seq

    @property
    def lengths(self) -> tuple[int, ...]:
        """Real tokens per sample."""
        return tuple(b - a for a, b in zip(self.starts, self.starts[1:]))

    @property
    def read_counts(self) -> tuple[int, ...]:
        """Read tokens per sample (at least 1: its [CLS])."""
        return tuple(b - a for a, b in zip(self.read_starts, self.read_starts[1:]))

    def padded_read_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For the padded layout: (b, m) read positions of each sample (m = its most read
        tokens; shorter rows repeat position 0), and where each of the M read tokens is in those
        rows flattened, (M,). Device ops only."""
        m = max(self.read_counts)
        flat = self.index[self.read_rows]  # (M,) sample * s + position
        sample = flat.div(self.seq, rounding_mode="floor")
        slots = sample * m + torch.arange(self.read_starts[-1], device=flat.device) - self.read_offsets[sample]
        rows = torch.zeros(self.batch * m, dtype=flat.dtype, device=flat.device)
        return rows.index_copy_(0, slots, flat - sample * self.seq).view(self.batch, m), slots

    def predicted_positions(self) -> torch.Tensor:
        """(K,) flat positions (sample * s + position) of the predicted tokens."""
        return self.index[self.read_rows[self.predicted]]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Packing:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Packing:
        """Called by the DataLoader's pinning thread, as for a tensor."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> Packing:
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})
