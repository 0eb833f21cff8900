"""Pretraining samples as a pure function of (seed, epoch, index).

`PretrainingDataset[(epoch, index)]` returns one unpadded, masked sample. All randomness of a
sample (random-next document, truncation, SOP swap, masking) comes from a generator seeded
with (seed, epoch, index); the epoch's sample map comes from (seed, epoch). So any rank and any
DataLoader worker produces any sample, and a restart at any step reproduces it exactly.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from mbert_train.data.config import DataConfig
from mbert_train.data.corpus import PreparedCorpus
from mbert_train.data.masking import Masker
from mbert_train.data.samples import PackedMap, PairMap, build_packed_map, build_pair_map
from mbert_train.data.samples import packed_segment, packed_stream_offsets, random_segment
from mbert_train.data.samples import truncate_pair

# Distinct first words keep the three random streams of one (seed, epoch) independent.
SAMPLE_STREAM, MAP_STREAM, SHUFFLE_STREAM = 0, 1, 2
_MAPS_KEPT = 2  # around an epoch boundary, prefetching workers still need the previous map


def stream_rng(stream: int, seed: int, epoch: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([stream, seed, epoch, index])


class PretrainingDataset(torch.utils.data.Dataset):
    """Masked MLM+NSP/SOP (or MLM-only) samples of one split of a prepared corpus."""

    def __init__(self, corpus: PreparedCorpus, split: str, cfg: DataConfig, seed: int):
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.corpus, self.split, self.cfg, self.seed = corpus, split, cfg, seed
        self.docs = corpus.split_docs(split)
        self.special = corpus.special
        self.pairs = cfg.objective in ("nsp", "sop")
        self._stream_offsets = None if self.pairs else packed_stream_offsets(corpus, self.docs)
        self._maps: OrderedDict[int, PairMap | PackedMap] = OrderedDict()
        self.masker = Masker(
            special_ids=self.special.as_array(), mask_id=self.special.mask,
            replacement_ids=corpus.replacement_ids, continuation=corpus.continuation_mask,
            masked_lm_prob=cfg.masked_lm_prob, max_predictions=cfg.max_predictions_per_seq,
            whole_word=cfg.whole_word_masking)

    def check_usable(self) -> None:
        """One-line errors for corpora this objective cannot sample from."""
        where = f"the {self.split} split of {self.corpus.path}"
        if self.pairs and len(self.docs) < 2:
            raise ValueError(
                f"data.objective={self.cfg.objective} needs at least 2 documents, {where} has "
                f"{len(self.docs)}; add documents (blank-line separated in .txt) or set "
                f"data.objective=none")
        if self.epoch_size(0) == 0:
            need = ("a document of 2+ sentences" if self.pairs
                    else f"{self.cfg.max_seq_length} tokens")
            raise ValueError(f"{where} yields no samples for data.objective="
                             f"{self.cfg.objective}: it needs {need}; add text")

    def __getstate__(self) -> dict:
        # Maps are rebuilt per process on demand; shipping them to workers would cost more.
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state

    def epoch_map(self, epoch: int) -> PairMap | PackedMap:
        if epoch not in self._maps:
            rng = stream_rng(MAP_STREAM, self.seed, epoch)
            if self.pairs:
                built = build_pair_map(
                    self.corpus, self.docs, max_tokens=self.cfg.max_seq_length - 3,
                    short_seq_prob=self.cfg.short_seq_prob,
                    random_next_prob=0.5 if self.cfg.objective == "nsp" else 0.0, rng=rng)
            else:
                built = build_packed_map(self._stream_offsets, self.cfg.max_seq_length - 2, rng)
            self._maps[epoch] = built
            while len(self._maps) > _MAPS_KEPT:
                self._maps.popitem(last=False)
        return self._maps[epoch]

    def epoch_size(self, epoch: int) -> int:
        return len(self.epoch_map(epoch))

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        return self.sample(epoch, index)

    def sample(self, epoch: int, index: int, *, with_provenance: bool = False) -> dict:
        """Sample `index` of `epoch`: numpy arrays, unpadded; provenance says where it came from.

        Keys: input_ids, token_type_ids, mlm_labels (int64 [s]), nsp_label (int, pair
        objectives); with_provenance adds `provenance` (document ids and sentence/token ranges,
        the pre-masking `original_ids`).
        """
        emap = self.epoch_map(epoch)
        if not 0 <= index < len(emap):
            raise IndexError(f"sample {index} is outside epoch {epoch} ({len(emap)} samples)")
        rng = stream_rng(SAMPLE_STREAM, self.seed, epoch, index)
        prov = {} if with_provenance else None
        if self.pairs:
            ids, types, label = self._pair(emap, index, rng, prov)
        else:
            ids = self._packed(emap, index, prov)
            types, label = np.zeros_like(ids), None
        masked, labels = self.masker(ids, rng)
        out = {"input_ids": masked, "token_type_ids": types, "mlm_labels": labels}
        if label is not None:
            out["nsp_label"] = label
        if with_provenance:
            prov["original_ids"] = ids
            out["provenance"] = prov
        return out

    def _pair(self, emap: PairMap, i: int, rng: np.random.Generator, prov: dict | None):
        """(ids, token types, label) of pair sample i; fills `prov` when one is given."""
        c = self.corpus
        start, a_len, chunk = int(emap.start[i]), int(emap.a_len[i]), int(emap.chunk_len[i])
        own = int(emap.doc[i])
        tokens_a = c.sentence_span_tokens(start, start + a_len)
        if emap.random_next[i]:
            other, b0, b1 = random_segment(c, self.docs, own, int(emap.target[i]) - len(tokens_a),
                                           rng)
            label = 1
        else:
            other, b0, b1 = own, start + a_len, start + chunk
            label = 0
        tokens_b = c.sentence_span_tokens(b0, b1)
        swapped = self.cfg.objective == "sop" and rng.random() < 0.5
        if swapped:
            # Megatron/ALBERT SOP: label 1 = the two segments are in swapped order.
            tokens_a, tokens_b = tokens_b, tokens_a
            label = 1
        tokens_a, tokens_b = truncate_pair(tokens_a, tokens_b, self.cfg.max_seq_length - 3, rng)
        sp = self.special
        ids = np.concatenate(([sp.cls], tokens_a, [sp.sep], tokens_b, [sp.sep])).astype(np.int64)
        types = np.zeros(len(ids), dtype=np.int64)
        types[len(tokens_a) + 2:] = 1
        if prov is not None:
            prov.update(doc_a=int(self.docs[own]), sentences_a=(start, start + a_len),
                        target_length=int(emap.target[i]), random_next=bool(emap.random_next[i]),
                        swapped=swapped, doc_b=int(self.docs[other]), sentences_b=(b0, b1),
                        tokens_a=tokens_a, tokens_b=tokens_b)
        return ids, types, label

    def _packed(self, emap: PackedMap, i: int, prov: dict | None):
        """The ids of MLM-only sample i; fills `prov` when one is given."""
        segments = [] if prov is not None else None
        body = packed_segment(self.corpus, self.docs, emap, i, self.special.sep, segments)
        if prov is not None:
            prov["segments"] = segments
        return np.concatenate(([self.special.cls], body, [self.special.sep])).astype(np.int64)
