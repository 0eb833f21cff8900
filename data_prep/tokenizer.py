"""Train, load and save the WordPiece tokenizer of a prepared corpus.

A trained tokenizer is BERT's: `BertNormalizer` (clean-up, CJK spacing, optional lower-casing
with accent stripping), `BertPreTokenizer` (whitespace and punctuation), WordPiece with `##`
continuations, and the special tokens [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4. When the
corpus is too small to fill `--vocab-size`, the vocabulary is padded with `[unusedN]` entries
(as Google's BERT vocabularies are) so the size the model is configured with is the size asked
for; those entries never occur in text and are never drawn as random replacement tokens.
The vocabulary never exceeds the size asked for: `tokenizers` adds every character of the corpus
(and its `##` continuation) on top of the requested size, so the alphabet is capped at the most
frequent (size - 5) / 2 characters; rarer ones (binary junk, a few stray scripts) become [UNK].

Every tokenizer written (trained or loaded) carries BERT's post-processor, `[CLS] A [SEP]` and
`[CLS] A [SEP] B [SEP]` with token type ids 0 / 1, the inputs the model is trained on; so
`AutoTokenizer.from_pretrained(dataset_dir)` adds them as the model expects. The corpus itself
is encoded without special tokens (`add_special_tokens=False`); the sampler adds them.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import trainers

from data_prep.format import CLS, SEP, SPECIAL_KEYS, SPECIAL_TOKENS, UNK
from mbert_train.errors import UserError

MAX_CHARS_PER_WORD = 100
"""Longer words become [UNK], as in BERT; bounds WordPiece's per-word cost."""


class TokenizerError(UserError):
    """A tokenizer file that cannot serve a BERT corpus; the message names the file and fix."""


def _bert_pipeline(model: models.Model, *, lowercase: bool) -> Tokenizer:
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def train_wordpiece(batches: Iterable[list[str]], *, vocab_size: int, lowercase: bool,
                    min_frequency: int, length: int | None = None,
                    show_progress: bool = True) -> Tokenizer:
    """Train BERT's WordPiece on batches of documents; exactly `vocab_size` entries (padded)."""
    tok = _bert_pipeline(models.WordPiece(unk_token=UNK,
                                          max_input_chars_per_word=MAX_CHARS_PER_WORD),
                         lowercase=lowercase)
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS),
                                        continuing_subword_prefix="##",
                                        # Each character may come as "c" and "##c".
                                        limit_alphabet=(vocab_size - len(SPECIAL_TOKENS)) // 2,
                                        show_progress=show_progress)
    tok.train_from_iterator(batches, trainer=trainer, length=length)
    vocab = tok.get_vocab(with_added_tokens=False)
    if len(vocab) > vocab_size:
        raise TokenizerError(f"the trained vocabulary has {len(vocab)} entries, more than "
                             f"--vocab-size={vocab_size}; raise --vocab-size")
    if len(vocab) < vocab_size:
        for i in range(vocab_size - len(vocab)):
            vocab[f"[unused{i}]"] = len(vocab)
        tok.model = models.WordPiece(vocab, unk_token=UNK,
                                     max_input_chars_per_word=MAX_CHARS_PER_WORD)
    return with_bert_template(tok)


def load_tokenizer(path: str, *, lowercase: bool) -> Tokenizer:
    """A `tokenizer.json`, or a BERT `vocab.txt` wrapped in the BERT pipeline."""
    if not os.path.isfile(path):
        raise TokenizerError(f"--tokenizer {path}: no such file; pass a vocab.txt or "
                             f"tokenizer.json, or leave --tokenizer out to train one")
    try:
        if path.endswith(".json"):
            tok = Tokenizer.from_file(path)
        else:
            vocab = models.WordPiece.read_file(path)
            tok = _bert_pipeline(models.WordPiece(vocab, unk_token=UNK,
                                                  max_input_chars_per_word=MAX_CHARS_PER_WORD),
                                 lowercase=lowercase)
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TokenizerError(f"--tokenizer {path}: cannot be read ({first_line}); pass a "
                             f"vocab.txt (one token a line) or a tokenizers tokenizer.json")
    special_ids(tok, path)
    return with_bert_template(tok)


def with_bert_template(tok: Tokenizer) -> Tokenizer:
    """`tok` with BERT's post-processor: `[CLS] A [SEP]` (type ids 0) and `[CLS] A [SEP] B [SEP]`
    (B and its [SEP] type id 1), the layout of every training sample. Replaces any other one:
    the model reads exactly this."""
    cls, sep = tok.token_to_id(CLS), tok.token_to_id(SEP)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{CLS}:0 $A:0 {SEP}:0", pair=f"{CLS}:0 $A:0 {SEP}:0 $B:1 {SEP}:1",
        special_tokens=[(CLS, cls), (SEP, sep)])
    return tok


def is_bert_pipeline(tok: Tokenizer) -> bool:
    """Whether `tok` is BERT's pipeline (what transformers' `BertTokenizer` rebuilds from
    vocab.txt and do_lower_case), so a model directory may name that class."""
    spec = json.loads(tok.to_str())
    return ((spec.get("normalizer") or {}).get("type") == "BertNormalizer"
            and (spec.get("pre_tokenizer") or {}).get("type") == "BertPreTokenizer"
            and (spec.get("model") or {}).get("type") == "WordPiece")


def special_ids(tok: Tokenizer, source: str) -> dict[str, int]:
    """{'pad': 0, 'unk': 1, ...}; raises when a special token is missing from the vocab."""
    ids = {}
    missing = []
    for token in SPECIAL_TOKENS:
        tid = tok.token_to_id(token)
        if tid is None:
            missing.append(token)
        else:
            ids[SPECIAL_KEYS[token]] = tid
    if missing:
        raise TokenizerError(f"tokenizer {source} lacks the special token(s) {' '.join(missing)}; "
                             f"use a BERT vocabulary that has {' '.join(SPECIAL_TOKENS)}")
    return ids


def is_lowercasing(tok: Tokenizer) -> bool:
    """Whether the tokenizer's normaliser lower-cases: a `Lowercase` or a lower-casing
    `BertNormalizer`, alone or in a `Sequence`. A byte-level BPE (GPT-2, RoBERTa, ModernBERT)
    normalises with NFC or not at all, and is cased."""
    def lowercases(normalizer: dict) -> bool:
        kind = normalizer.get("type")
        if kind == "Sequence":
            return any(lowercases(n) for n in normalizer.get("normalizers", []))
        return kind == "Lowercase" or (kind == "BertNormalizer" and bool(normalizer.get("lowercase", True)))

    return lowercases(json.loads(tok.to_str()).get("normalizer") or {})


def for_corpus(tok: Tokenizer) -> Tokenizer:
    """A copy that reads "[MASK]" in raw text as characters, never as the special token."""
    copy = Tokenizer.from_str(tok.to_str())
    copy.encode_special_tokens = True
    return copy


def save_tokenizer(tok: Tokenizer, directory: str, tokenizer_file: str, vocab_file: str) -> None:
    """Write `tokenizer.json` and a `vocab.txt` ordered by id."""
    # Written by Python, not `tok.save`, so a full disk raises OSError (ENOSPC) like elsewhere.
    with open(os.path.join(directory, tokenizer_file), "w", encoding="utf-8") as f:
        f.write(tok.to_str(pretty=True))
    with open(os.path.join(directory, vocab_file), "w", encoding="utf-8") as f:
        f.write(vocab_text(tok))


def vocab_text(tok: Tokenizer) -> str:
    """BERT's vocab.txt: one token a line, line i holding id i. transformers 5 reads it with
    `BertTokenizer(vocab=PATH)` or `BertTokenizer.from_pretrained(DIR)`; its `vocab_file=`
    keyword is no longer a parameter and is silently ignored (a 5-token vocabulary)."""
    by_id = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    return "".join(token + "\n" for token, _ in by_id)


def iter_text_batches(dataset, column: str, batch_size: int,
                      skip: np.ndarray | None = None) -> Iterator[list[str]]:
    """Batches of one text column of a `datasets.Dataset`, read lazily from its Arrow file,
    without the rows where the boolean mask `skip` is True (the held-out documents)."""
    start = 0
    for batch in dataset.iter(batch_size=batch_size):
        texts = batch[column]
        if skip is not None:
            texts = [text for i, text in enumerate(texts, start) if not skip[i]]
            start += len(batch[column])
        yield texts
