"""Samples on real text (the embedded corpus): structure, NSP/SOP labels, provenance, masking."""

from __future__ import annotations

import numpy as np
import pytest

from data_prep.split import get_splitter, split_paragraph
from mbert_train.data import DataConfig, PretrainingDataset, open_dataset
from mbert_train.data.masking import IGNORE_INDEX, Masker
from mbert_train.data.samples import truncate_pair
from tests.test_data_corpus import embedded_corpus

N_MIN = 2000


@pytest.fixture(scope="module")
def embedded_dir(corpus_cache) -> str:
    return embedded_corpus(corpus_cache)


def samples(directory: str, **overrides) -> tuple[PretrainingDataset, list[dict]]:
    """At least N_MIN samples with provenance, from as many epochs as it takes."""
    ds = PretrainingDataset(open_dataset(directory), "train", DataConfig(**overrides), seed=7)
    out, epoch = [], 0
    while len(out) < N_MIN:
        out += [ds.sample(epoch, i, with_provenance=True) for i in range(ds.epoch_size(epoch))]
        epoch += 1
    return ds, out


def check_masking(ds: PretrainingDataset, batch: list[dict]) -> None:
    sp = ds.special
    special = set(sp.as_array().tolist())
    chosen = candidates = n_mask = n_same = 0
    for s in batch:
        orig, ids, labels = s["provenance"]["original_ids"], s["input_ids"], s["mlm_labels"]
        predicted = labels != IGNORE_INDEX
        maskable = ~np.isin(orig, sp.as_array())
        assert not (predicted & ~maskable).any(), "a special token was selected"
        assert np.array_equal(labels[predicted], orig[predicted])
        assert np.array_equal(ids[~predicted], orig[~predicted])
        assert predicted.sum() <= ds.cfg.max_predictions_per_seq
        assert not set(ids[predicted & (ids != orig)].tolist()) & (special - {sp.mask})
        chosen += predicted.sum()
        candidates += maskable.sum()
        n_mask += (ids[predicted] == sp.mask).sum()
        n_same += (ids[predicted] == orig[predicted]).sum()
    assert 0.13 <= chosen / candidates <= 0.16
    assert abs(n_mask / chosen - 0.8) < 0.02
    assert abs(n_same / chosen - 0.1) < 0.02
    assert abs(1 - (n_mask + n_same) / chosen - 0.1) < 0.02


def test_nsp_samples_are_bert_shaped_with_honest_labels(embedded_dir):
    ds, batch = samples(embedded_dir)
    corpus, sp = ds.corpus, ds.special
    random_next = short = 0
    for s in batch:
        p = s["provenance"]
        ids, types, orig = s["input_ids"], s["token_type_ids"], p["original_ids"]
        assert len(ids) == len(types) == len(s["mlm_labels"]) <= ds.cfg.max_seq_length
        assert orig[0] == sp.cls and orig[-1] == sp.sep and (orig == sp.sep).sum() == 2
        first_sep = 1 + len(p["tokens_a"])
        assert orig[first_sep] == sp.sep and len(p["tokens_a"]) >= 1 and len(p["tokens_b"]) >= 1
        assert not types[:first_sep + 1].any() and types[first_sep + 1:].all()
        for seg, span in (("tokens_a", "sentences_a"), ("tokens_b", "sentences_b")):
            whole = corpus.sentence_span_tokens(*p[span])
            # Truncation trims the ends only: the segment is a contiguous slice of its span.
            windows = np.lib.stride_tricks.sliding_window_view(whole, len(p[seg]))
            assert (windows == p[seg]).all(axis=1).any()
        doc_a, doc_b = p["doc_a"], p["doc_b"]
        assert corpus.doc_of_sentence(p["sentences_a"][0]) == doc_a
        assert corpus.doc_of_sentence(p["sentences_b"][1] - 1) == doc_b
        assert s["nsp_label"] == int(p["random_next"])
        if p["random_next"]:
            random_next += 1
            assert doc_b != doc_a
        else:
            assert doc_b == doc_a and p["sentences_b"][0] == p["sentences_a"][1]
        assert np.diff(corpus.doc_sentences(doc_a))[0] >= 2
        short += p["target_length"] < ds.cfg.max_seq_length - 3
    assert abs(random_next / len(batch) - 0.5) <= 0.03
    assert 0.06 <= short / len(batch) <= 0.14
    check_masking(ds, batch)


def test_whole_word_masking_masks_whole_words(embedded_dir):
    ds, batch = samples(embedded_dir, whole_word_masking=True)
    cont = ds.corpus.continuation_mask
    special = ds.special.as_array()
    saw_multi_piece = False
    for s in batch:
        orig = s["provenance"]["original_ids"]
        predicted = s["mlm_labels"] != IGNORE_INDEX
        real = ~np.isin(orig, special)
        for i in range(1, len(orig)):
            # A ## piece belongs to the word of the real token before it: same fate.
            if real[i] and real[i - 1] and cont[orig[i]]:
                assert predicted[i] == predicted[i - 1]
                saw_multi_piece |= bool(predicted[i])
        assert 1 <= predicted.sum() <= ds.cfg.max_predictions_per_seq
    assert saw_multi_piece
    # Words that would overflow the budget are skipped, so slightly fewer than 15% get chosen.
    chosen = sum((s["mlm_labels"] != IGNORE_INDEX).sum() for s in batch)
    maskable = sum((~np.isin(s["provenance"]["original_ids"], special)).sum() for s in batch)
    assert 0.12 <= chosen / maskable <= 0.16


def test_sop_swaps_adjacent_segments_of_one_document(embedded_dir):
    ds, batch = samples(embedded_dir, objective="sop")
    swapped = 0
    for s in batch:
        p = s["provenance"]
        assert p["doc_a"] == p["doc_b"] and not p["random_next"]
        assert p["sentences_b"][0] == p["sentences_a"][1]
        assert s["nsp_label"] == int(p["swapped"])
        assert (p["original_ids"] == ds.special.sep).sum() == 2
        swapped += p["swapped"]
    assert abs(swapped / len(batch) - 0.5) <= 0.03
    check_masking(ds, batch)


def test_mlm_only_packs_full_length_segments(embedded_dir):
    ds, batch = samples(embedded_dir, objective="none", max_seq_length=64)
    sp = ds.special
    for s in batch:
        orig = s["provenance"]["original_ids"]
        assert len(orig) == 64 and orig[0] == sp.cls and orig[-1] == sp.sep
        assert "nsp_label" not in s and not s["token_type_ids"].any()
        c = ds.corpus
        pieces = []
        for doc, a, b in s["provenance"]["segments"]:
            first = int(c.sentence_offsets[c.doc_offsets[doc]])
            pieces.append(np.asarray(c.tokens[first + a:first + b]))
        body = orig[1:-1]
        assert np.array_equal(body[body != sp.sep], np.concatenate(pieces))
    check_masking(ds, batch)


def test_samples_are_pure_and_vary_across_epochs(embedded_dir):
    ds = PretrainingDataset(open_dataset(embedded_dir), "train", DataConfig(), seed=3)
    a = ds.sample(0, 11)
    ds._maps.clear()
    b = ds.sample(0, 11)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    other = [ds.sample(1, i)["input_ids"] for i in range(20)]
    assert not all(np.array_equal(a["input_ids"], o) for o in other)
    with pytest.raises(IndexError):
        ds.sample(0, ds.epoch_size(0))


def toy_masker(masked_lm_prob: float, max_predictions: int) -> Masker:
    """Ids 0-4 special (4 = [MASK]), 5-99 real tokens."""
    return Masker(special_ids=np.arange(5), mask_id=4, replacement_ids=np.arange(5, 100),
                  continuation=np.zeros(100, dtype=bool), masked_lm_prob=masked_lm_prob,
                  max_predictions=max_predictions, whole_word=False)


# BERT's rule (Google's create_pretraining_data.py): min(max_predictions_per_seq,
# max(1, int(round(n * masked_lm_prob)))), here with n the maskable tokens. Written out by
# hand, away from exact halves: rounding down instead (int(n * p)) differs at 10, 13, 17, ...
BUDGETS = [  # (masked_lm_prob, max_predictions, n maskable, budget)
    (0.15, 20, 0, 0), (0.15, 20, 1, 1), (0.15, 20, 3, 1), (0.15, 20, 6, 1), (0.15, 20, 10, 2),
    (0.15, 20, 13, 2), (0.15, 20, 17, 3), (0.15, 20, 20, 3), (0.15, 20, 46, 7), (0.15, 20, 100, 15),
    (0.15, 20, 126, 19), (0.15, 20, 133, 20), (0.15, 20, 140, 20), (0.15, 20, 500, 20),
    (0.5, 3, 3, 2), (0.5, 3, 7, 3), (0.9, 20, 1, 1), (0.9, 20, 2, 2),
]


@pytest.mark.parametrize("prob, cap, n, expected", BUDGETS)
def test_mask_budget_rounds_to_nearest_as_bert(prob, cap, n, expected):
    masker = toy_masker(prob, cap)
    assert masker.budget(n) == expected
    # And the masker predicts exactly that many positions of a [CLS] ... [SEP] sample.
    ids = np.concatenate(([2], np.arange(n) % 95 + 5, [3])).astype(np.int64)
    _, labels = masker(ids, np.random.default_rng(n))
    assert (labels != IGNORE_INDEX).sum() == expected


def reference_truncate(la: int, lb: int, max_tokens: int) -> tuple[int, int]:
    """Google's truncate_seq_pair, lengths only."""
    while la + lb > max_tokens:
        if la > lb:
            la -= 1
        else:
            lb -= 1
    return la, lb


def test_truncation_matches_bert_and_keeps_contiguous_slices():
    rng = np.random.default_rng(0)
    fronts = 0
    for _ in range(500):
        la, lb, m = rng.integers(1, 200), rng.integers(1, 200), rng.integers(2, 130)
        a, b = np.arange(la), np.arange(1000, 1000 + lb)
        ta, tb = truncate_pair(a, b, int(m), rng)
        assert (len(ta), len(tb)) == reference_truncate(int(la), int(lb), int(m))
        for full, cut in ((a, ta), (b, tb)):
            if len(cut):
                assert np.array_equal(cut, np.arange(cut[0], cut[0] + len(cut)))
                fronts += cut[0] != full[0]
    assert fronts > 100  # tokens do get removed from the front, not only the back


def test_sentence_splitter_rules():
    split = get_splitter("rules")
    text = ("Dr. Smith met J. R. R. Tolkien in 1950. They talked, e.g. about trees! Did it "
            "rain? Yes.\nA new line is a new paragraph")
    assert split(text) == ["Dr. Smith met J. R. R. Tolkien in 1950.",
                           "They talked, e.g. about trees!", "Did it rain?", "Yes.",
                           "A new line is a new paragraph"]
    assert split_paragraph("It grows to 60 cm ( 24 in ) . In life , it is blue . ") == [
        "It grows to 60 cm ( 24 in ) .", "In life , it is blue ."]
    assert split_paragraph("version 3.5 is out. \"Quoted.\" Next one.") == [
        "version 3.5 is out.", "\"Quoted.\"", "Next one."]
    assert get_splitter("lines")("a b\n\n c d \n") == ["a b", "c d"]
    assert get_splitter("rules_unwrap")("A wrapped\nsentence. Next") == [
        "A wrapped sentence.", "Next"]
