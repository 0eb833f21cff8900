"""Which samples an epoch has (the sample map) and how one is cut from the corpus.

Sentence pairs (NSP/SOP) follow Google's `create_instances_from_document` with Megatron's
fixes: a chunk accumulates consecutive sentences until it reaches the target length (the full
`max_seq_length - 3`, or with `short_seq_prob` a random length in [2, that]) and holds at least
2 sentences, so a real continuation always exists and the NSP coin is a fair 0.5 (Google's
forces "random" on one-sentence chunks, which skews the label rate). A is the first `a_len`
sentences (uniform in [1, chunk-1]). When B is random, the chunk's remaining sentences go back:
the next chunk starts right after A, as in Google's `i -= num_unused_segments`. A one-sentence
document never starts a chunk; it is only random-next material.

The map is a pure function of (corpus, split, seed, epoch), so each epoch regroups the corpus
differently. The rewinds make it sequential along a document; it is built for all documents at
once, one chunk per document per step with NumPy. To bound the number of steps on corpora of
huge documents, documents are cut into "lanes" of `LANE_SENTENCES` for this walk only (a chunk
never straddles a lane boundary; the document identity, which the NSP "other document" rule
uses, is unchanged).

MLM-only packing (objective `none`) reads the split's documents as one token stream with a
[SEP] after each document (RoBERTa's FULL-SENTENCES) and cuts it into full-length segments at a
per-epoch random offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mbert_train.data.corpus import PreparedCorpus

LANE_SENTENCES = 1024
"""Longest stretch of sentences the vectorised chunk walk treats as one unit."""


@dataclass(frozen=True)
class PairMap:
    """One epoch's sentence-pair samples, sorted by position in the corpus."""

    # 19 bytes a sample: 20M sentences (~6M samples) map to ~115 MB, built in ~4 s.
    doc: np.ndarray          # int32  [n]: index into the split's document list
    start: np.ndarray        # int64  [n]: global sentence index where A starts
    a_len: np.ndarray        # uint16 [n]: sentences in A (< LANE_SENTENCES)
    chunk_len: np.ndarray    # uint16 [n]: sentences in the chunk (A plus the real B)
    target: np.ndarray       # uint16 [n]: target tokens (without [CLS]/[SEP])
    random_next: np.ndarray  # bool   [n]: B comes from another document

    def __len__(self) -> int:
        return len(self.start)


def _lanes(corpus: PreparedCorpus, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(split-local doc index, first sentence, end sentence) of every lane of 2+ sentences."""
    first = corpus.doc_offsets[docs].astype(np.int64)
    end = corpus.doc_offsets[docs + 1].astype(np.int64)
    n_sent = end - first
    local = np.flatnonzero(n_sent >= 2)
    per_doc = -(-n_sent[local] // LANE_SENTENCES)
    lane_doc = np.repeat(local, per_doc)
    within = np.arange(len(lane_doc)) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc)
    lane_start = first[lane_doc] + within * LANE_SENTENCES
    lane_end = np.minimum(lane_start + LANE_SENTENCES, end[lane_doc])
    return lane_doc.astype(np.int64), lane_start, lane_end


def build_pair_map(corpus: PreparedCorpus, docs: np.ndarray, *, max_tokens: int,
                   short_seq_prob: float, random_next_prob: float,
                   rng: np.random.Generator) -> PairMap:
    """Walk every lane chunk by chunk, all lanes in lock-step (see the module doc)."""
    offsets = corpus.sentence_offsets
    lane_doc, pos, lane_end = _lanes(corpus, docs)
    pos = pos.copy()
    active = np.flatnonzero(lane_end - pos >= 2)
    parts: list[tuple[np.ndarray, ...]] = []
    while active.size:
        p, end = pos[active], lane_end[active]
        m = active.size
        short = rng.random(m) < short_seq_prob
        target = np.where(short, rng.integers(2, max_tokens + 1, size=m), max_tokens)
        # First sentence boundary at or past the target, at least 2 sentences, within the lane.
        stop = np.searchsorted(offsets, np.asarray(offsets[p]) + target, side="left")
        stop = np.minimum(np.maximum(stop, p + 2), end)
        chunk = stop - p
        a_len = rng.integers(1, chunk)
        random_next = rng.random(m) < random_next_prob
        parts.append((lane_doc[active], p, a_len, chunk, target, random_next))
        pos[active] = np.where(random_next, p + a_len, stop)
        active = active[lane_end[active] - pos[active] >= 2]
    dtypes = (np.int32, np.int64, np.uint16, np.uint16, np.uint16, bool)
    if not parts:
        return PairMap(*(np.zeros(0, dtype) for dtype in dtypes))
    cols = [np.concatenate(c) for c in zip(*parts)]
    order = np.argsort(cols[1], kind="stable")
    return PairMap(*(c[order].astype(dtype) for c, dtype in zip(cols, dtypes)))


def truncate_pair(a: np.ndarray, b: np.ndarray, max_tokens: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Google's `truncate_seq_pair` in closed form.

    The reference removes one token at a time from the longer side (B on ties), each from the
    front or the back by a fair coin. The per-side counts are therefore fixed by the lengths,
    and the number taken from the front is Binomial(count, 0.5).
    """
    excess = len(a) + len(b) - max_tokens
    if excess <= 0:
        return a, b
    gap = abs(len(a) - len(b))
    first = min(excess, gap)
    rest = excess - first
    cut_a = (first if len(a) > len(b) else 0) + rest // 2
    cut_b = (first if len(b) > len(a) else 0) + rest - rest // 2
    front_a = rng.binomial(cut_a, 0.5) if cut_a else 0
    front_b = rng.binomial(cut_b, 0.5) if cut_b else 0
    return a[front_a:len(a) - (cut_a - front_a)], b[front_b:len(b) - (cut_b - front_b)]


def random_segment(corpus: PreparedCorpus, docs: np.ndarray, own: int, min_tokens: int,
                   rng: np.random.Generator) -> tuple[int, int, int]:
    """(document, first sentence, end sentence) of a random-next B: another document.

    Drawing from the n-1 other documents directly (no retry loop) makes "never the same
    document" exact, and terminates whatever the documents look like.
    """
    other = int(rng.integers(len(docs) - 1))
    other += other >= own
    first, end = corpus.doc_sentences(int(docs[other]))
    start = first + int(rng.integers(end - first))
    offsets = corpus.sentence_offsets
    stop = int(np.searchsorted(offsets, offsets[start] + max(1, min_tokens), side="left"))
    return other, start, min(max(stop, start + 1), end)


@dataclass(frozen=True)
class PackedMap:
    """One epoch's MLM-only segments: `count` windows of `length` over the virtual stream."""

    stream_offsets: np.ndarray  # int64 [n_docs + 1]: doc d spans [o[d], o[d+1]) incl. its [SEP]
    offset: int
    length: int
    count: int

    def __len__(self) -> int:
        return self.count


def packed_stream_offsets(corpus: PreparedCorpus, docs: np.ndarray) -> np.ndarray:
    """Start of each document in the split's token stream (each followed by one [SEP])."""
    tokens = (corpus.sentence_offsets[corpus.doc_offsets[docs + 1]]
              - corpus.sentence_offsets[corpus.doc_offsets[docs]])
    return np.concatenate(([0], np.cumsum(np.asarray(tokens, np.int64) + 1)))


def build_packed_map(stream_offsets: np.ndarray, length: int,
                     rng: np.random.Generator) -> PackedMap:
    total = int(stream_offsets[-1])
    offset = int(rng.integers(length)) if total > 2 * length else 0
    return PackedMap(stream_offsets, offset, length, max(0, (total - offset) // length))


def packed_segment(corpus: PreparedCorpus, docs: np.ndarray, pmap: PackedMap, index: int, sep_id: int,
                   provenance: list[tuple[int, int, int]] | None = None) -> np.ndarray:
    """Tokens of window `index`; where they come from, [(doc id, first token, end token), ...],
    is appended to `provenance` when one is given."""
    lo = pmap.offset + index * pmap.length
    hi = lo + pmap.length
    so = pmap.stream_offsets
    d = int(np.searchsorted(so, lo, side="right") - 1)
    pieces: list[np.ndarray] = []
    while lo < hi:
        doc = int(docs[d])
        base = int(corpus.sentence_offsets[corpus.doc_offsets[doc]])
        n_tokens = int(so[d + 1] - so[d]) - 1
        a, b = lo - int(so[d]), min(hi - int(so[d]), n_tokens + 1)
        if a < n_tokens:
            real_end = min(b, n_tokens)
            pieces.append(np.array(corpus.tokens[base + a:base + real_end], dtype=np.int64))
            if provenance is not None:
                provenance.append((doc, a, real_end))
        if b == n_tokens + 1:
            pieces.append(np.array([sep_id], dtype=np.int64))
        lo = int(so[d]) + b
        d += 1
    return np.concatenate(pieces)
