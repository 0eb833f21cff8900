"""Pad a list of samples into the batch the trainer consumes (the contract: `mbert_train.batch`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mbert_train.batch import IGNORE_INDEX, Packing


@dataclass(frozen=True)
class PadCollator:
    """Right-pads to the batch's longest sample, rounded up to a multiple (capped at max).

    Output: input_ids, token_type_ids, attention_mask (1 real / 0 pad), mlm_labels
    (IGNORE_INDEX on padding and unpredicted tokens), all int64 [b, s]; nsp_labels int64 [b]
    when the samples carry a sentence-pair label; and the batch's `Packing`, built here, in the
    DataLoader workers, so that the model never works it out on the device.
    """

    pad_id: int
    """Id written into padded input positions."""
    pad_to_multiple_of: int
    """Round the padded length up to this (8 suits tensor cores)."""
    max_length: int
    """Never pad beyond this (the model's sequence length)."""

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor | Packing]:
        lengths = [len(s["input_ids"]) for s in samples]
        m = self.pad_to_multiple_of
        width = min(self.max_length, -(-max(lengths) // m) * m)
        b = len(samples)
        ids = np.full((b, width), self.pad_id, dtype=np.int64)
        types = np.zeros((b, width), dtype=np.int64)
        mask = np.zeros((b, width), dtype=np.int64)
        labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
        for row, (s, n) in enumerate(zip(samples, lengths)):
            ids[row, :n] = s["input_ids"]
            types[row, :n] = s["token_type_ids"]
            mask[row, :n] = 1
            labels[row, :n] = s["mlm_labels"]
        batch = {
            "input_ids": torch.from_numpy(ids),
            "token_type_ids": torch.from_numpy(types),
            "attention_mask": torch.from_numpy(mask),
            "mlm_labels": torch.from_numpy(labels),
        }
        if "nsp_label" in samples[0]:
            batch["nsp_labels"] = torch.tensor([s["nsp_label"] for s in samples],
                                               dtype=torch.long)
        batch["packing"] = Packing.from_masks(batch["attention_mask"], batch["mlm_labels"])
        return batch
