"""BERT's dynamic masked-LM corruption, applied per sample at load time.

Selection follows Devlin et al. (2019) and Google's `create_pretraining_data.py`: of the
maskable positions (every real token: never [CLS]/[SEP]/[PAD]/[UNK]/[MASK]), exactly
`min(max_predictions, max(1, round(n * masked_lm_prob)))` are chosen; each chosen token is
replaced by [MASK] with probability 0.8, by a random real token with 0.1, kept with 0.1.
Whole-word masking chooses words (a piece plus its following `##` pieces) in random order,
skipping a word that would overflow the budget, as Google's `--do_whole_word_mask` does; the
80/10/10 draw stays per token, as there.

Because the random generator is derived from (seed, epoch, index), the masks differ every
epoch (RoBERTa's dynamic masking) yet are reproducible after a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mbert_train.batch import IGNORE_INDEX


@dataclass(frozen=True)
class Masker:
    """Chooses and corrupts MLM positions of one unpadded sample."""

    special_ids: np.ndarray
    """Ids that are never masked (the five BERT special tokens)."""
    mask_id: int
    """Id of [MASK]."""
    replacement_ids: np.ndarray
    """Ids the 10% random replacement draws from (real tokens only)."""
    continuation: np.ndarray
    """bool [vocab]: True for `##` pieces; used by whole-word masking."""
    masked_lm_prob: float
    """Fraction of maskable tokens to predict."""
    max_predictions: int
    """Cap on predictions per sample."""
    whole_word: bool
    """Choose whole words instead of single pieces."""

    def budget(self, n_candidates: int) -> int:
        """Number of positions to predict among `n_candidates` maskable ones."""
        if n_candidates == 0:
            return 0
        return min(self.max_predictions, n_candidates,
                   max(1, int(round(n_candidates * self.masked_lm_prob))))

    def _choose_words(self, ids: np.ndarray, cand: np.ndarray, budget: int,
                      rng: np.random.Generator) -> np.ndarray:
        is_cont = self.continuation[ids[cand]]
        adjacent = np.concatenate(([False], np.diff(cand) == 1))
        # A word starts at a non-## piece, or at a ## piece cut off from its head (after a
        # [SEP], or at the front of a segment truncated from the front).
        starts = np.flatnonzero(~is_cont | ~adjacent)
        ends = np.append(starts[1:], len(cand))
        chosen: list[np.ndarray] = []
        total = 0
        for w in rng.permutation(len(starts)):
            size = ends[w] - starts[w]
            if total + size > budget:
                continue
            chosen.append(cand[starts[w]:ends[w]])
            total += size
            if total == budget:
                break
        return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """(corrupted input ids, labels with IGNORE_INDEX where nothing is predicted)."""
        cand = np.flatnonzero(~np.isin(ids, self.special_ids))
        labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
        budget = self.budget(len(cand))
        if budget == 0:
            return ids.copy(), labels
        if self.whole_word:
            chosen = self._choose_words(ids, cand, budget, rng)
        else:
            chosen = rng.permutation(cand)[:budget]
        chosen.sort()
        labels[chosen] = ids[chosen]
        out = ids.copy()
        u = rng.random(len(chosen))
        out[chosen[u < 0.8]] = self.mask_id
        swap = chosen[(u >= 0.8) & (u < 0.9)]
        out[swap] = self.replacement_ids[rng.integers(len(self.replacement_ids), size=len(swap))]
        return out, labels
