"""`mbert-prep`: raw text -> a tokenised, memory-mappable corpus for MLM+NSP/SOP pretraining.

    mbert-prep corpus/*.txt --output data/wiki --vocab-size 30522 --num-proc 8
    mbert-prep docs.jsonl --text-field body --tokenizer bert-base-uncased/vocab.txt --output d

Steps: check everything cheap first (inputs, text fields, tokenizer file, output path), then
read and repair documents into an Arrow spool, train (or load) the WordPiece tokenizer,
sentence-split and tokenise with a multi-process `datasets.map`, and stream the arrays of
`data_prep.format`. All of it happens in a hidden temporary directory beside the output
(`mbert_train.staging`), fsynced and renamed into place only when complete, so an interrupted
run leaves nothing at the output path that looks finished; a later run removes the leftovers of
dead runs (and puts back a previous dataset a kill caught in mid-swap).

`--overwrite` replaces only a folder that is recognisably a prepared dataset (its metadata.json
carries the format marker) and holds nothing but the dataset's own files; nothing else is ever
deleted.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import sys
import time

import datasets
import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from data_prep import format as fmt
from data_prep.config import PrepConfig, PrepError
from data_prep.sources import ReadStats, Source, read_documents, resolve_sources
from data_prep.sources import total_local_bytes
from data_prep.split import get_splitter
from data_prep.tokenizer import for_corpus, is_lowercasing, load_tokenizer
from data_prep.tokenizer import iter_text_batches, save_tokenizer, special_ids, train_wordpiece
from data_prep.writer import CorpusCounts, choose_heldout, count_corpus, spool_documents
from data_prep.writer import tokenize_batch, tokenized_features, write_arrays
from mbert_train.errors import UserError, describe_os_error, first_line
from mbert_train.staging import clean_leftovers, staged_dir

PAUSE_ENV = "MBERT_PREP_TEST_PAUSE_S"
"""Test hook: seconds to sleep after everything is written but before the final rename."""


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def check_output(cfg: PrepConfig) -> None:
    """Refuse to clobber anything that is not an old dataset the user asked to replace."""
    out = os.path.abspath(cfg.output)
    if os.path.islink(out):
        raise PrepError(f"--output {cfg.output} is a symbolic link (to {os.readlink(out)}); "
                        f"mbert-prep neither writes through nor replaces links; pass a real "
                        f"directory path")
    if os.path.exists(out) and not os.path.isdir(out):
        raise PrepError(f"--output {cfg.output} exists and is not a directory; choose a new "
                        f"directory path")
    if fmt.is_prepared_dataset(out):
        if not cfg.overwrite:
            raise PrepError(f"--output {cfg.output} already holds a prepared dataset; pass "
                            f"--overwrite to replace it or choose another --output")
        foreign = sorted(set(os.listdir(out)) - fmt.DATASET_FILES)
        if foreign:
            raise PrepError(f"--output {cfg.output} holds a prepared dataset plus other files "
                            f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                            f"mbert-prep deletes only its own files: move them out or choose "
                            f"another --output")
    elif os.path.isdir(out) and os.listdir(out):
        raise PrepError(f"--output {cfg.output} is a non-empty directory that is not a prepared "
                        f"dataset ({fmt.not_a_dataset_reason(out)}); mbert-prep never deletes "
                        f"it: choose a new or empty --output directory")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise PrepError(f"--output {cfg.output}: parent directory {parent} does not exist; "
                        f"create it")
    for item in cfg.inputs:
        if os.path.isdir(item) and _inside(out, item):
            raise PrepError(f"--output {cfg.output} is inside the input folder {item}, whose "
                            f"files are all read as input; choose an --output outside it")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _summary_lines(summary: dict, output: str) -> list[str]:
    s = summary
    return [
        f"mbert-prep: wrote {output}",
        f"  documents  {s['documents']:,} (train {s['train_documents']:,}, "
        f"held-out {s['heldout_documents']:,}); one-sentence documents "
        f"{s['one_sentence_documents']:,} (kept as random-next material only)",
        f"  sentences  {s['sentences']:,}   tokens {s['tokens']:,}   vocab {s['vocab_size']:,}",
        f"  skipped    empty files {s['empty_files']}, empty documents {s['empty_documents']}, "
        f"records without text {s['records_without_text']}, bad JSON lines "
        f"{s['bad_json_lines']}, files of unknown type {s['unknown_files']}",
        f"  repaired   undecodable bytes {s['undecodable_bytes']} and lone surrogates "
        f"{s['lone_surrogates']} (-> U+FFFD), long lines split {s['long_lines_split']}, long "
        f"documents split {s['long_documents_split']}, long sentences split "
        f"{s['long_sentences_split']}",
        f"  read       {s['bytes_read'] / 1e6:.2f} MB in {s['seconds']:.1f} s = "
        f"{s['mb_per_s']:.2f} MB/s",
    ]


def _build_tokenizer(cfg: PrepConfig, spool, n_docs: int) -> Tokenizer:
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, lowercase=cfg.lowercase)
    return train_wordpiece(iter_text_batches(spool, "text", 1000), vocab_size=cfg.vocab_size,
                           lowercase=cfg.lowercase, min_frequency=cfg.min_frequency,
                           length=n_docs, show_progress=not cfg.quiet)


def _no_documents(stats: ReadStats, tokenless: int = 0) -> PrepError:
    return PrepError(
        f"no documents in the inputs ({stats.files} file(s) read; skipped: empty files "
        f"{stats.empty_files}, empty records {stats.empty_records}, records without text "
        f"{stats.records_without_text}, bad JSON lines {stats.bad_json_lines}, files of unknown "
        f"type {stats.unknown_files}, documents without a token {tokenless}); nothing was "
        f"written: check the inputs and --text-field")


def _spool(cfg: PrepConfig, sources: list[Source], cache: str, stats: ReadStats):
    """Read every source into an Arrow spool file; returns (dataset, document count)."""
    path = os.path.join(cache, "documents.arrow")
    with tqdm(total=total_local_bytes(sources) or None, unit="B", unit_scale=True,
              desc="reading", disable=cfg.quiet) as bar:
        docs = read_documents(sources, text_field=cfg.text_field, hf_split=cfg.hf_split,
                              hf_config=cfg.hf_config, cache_dir=cache, stats=stats,
                              max_line_chars=cfg.max_line_chars,
                              max_doc_chars=cfg.max_doc_chars, progress=bar.update)
        count = spool_documents(docs, path)
    return datasets.Dataset.from_file(path), count


def _tokenize(cfg: PrepConfig, spool, tok: Tokenizer, dtype: np.dtype, cache: str):
    return spool.map(
        tokenize_batch, batched=True, batch_size=cfg.batch_docs,
        # num_proc=1 would still start a worker pool; None tokenises in this process.
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
        remove_columns=["text"], features=tokenized_features(dtype),
        fn_kwargs=dict(tokenizer_json=for_corpus(tok).to_str(), splitter=cfg.splitter,
                       max_sentence_tokens=cfg.max_sentence_tokens, dtype=dtype.name),
        cache_file_name=os.path.join(cache, "tokenized.arrow"), new_fingerprint="mbert-prep",
        desc="split+tokenize")


def _summary(counts: CorpusCounts, heldout: np.ndarray, stats: ReadStats, vocab_size: int,
             seconds: float) -> dict:
    kept_sentences = counts.sentences_per_doc[counts.kept]
    return {
        "documents": int(counts.kept.sum()),
        "train_documents": int(counts.kept.sum()) - len(heldout),
        "heldout_documents": len(heldout),
        "sentences": int(kept_sentences.sum()),
        "tokens": counts.tokens,
        "vocab_size": vocab_size,
        "one_sentence_documents": int((kept_sentences == 1).sum()),
        "empty_documents": stats.empty_records + int((~counts.kept).sum()),
        "long_sentences_split": counts.long_sentences,
        **{k: v for k, v in stats.counts().items() if k != "empty_records"},
        "seconds": round(seconds, 3),
        "mb_per_s": round(stats.bytes_read / 1e6 / max(seconds, 1e-9), 3),
    }


def _metadata(cfg: PrepConfig, tok: Tokenizer, tmp: str, dtype: np.dtype, sources: list[Source],
              stats: ReadStats, summary: dict, max_token_id: int) -> dict:
    return {
        "format": fmt.FORMAT_NAME,
        "format_version": fmt.FORMAT_VERSION,
        "tokenizer_file": fmt.TOKENIZER_FILE,
        # Lets ranks on different nodes check they read the same vocabulary.
        "tokenizer_sha256": _sha256(os.path.join(tmp, fmt.TOKENIZER_FILE)),
        "vocab_file": fmt.VOCAB_FILE,
        "vocab_size": summary["vocab_size"],
        # Readers check it against the model's vocabulary without scanning tokens.npy.
        "max_token_id": max_token_id,
        "special_ids": special_ids(tok, cfg.tokenizer or "trained"),
        "lowercase": is_lowercasing(tok, cfg.lowercase),
        "token_dtype": dtype.name,
        "splitter": cfg.splitter,
        "num_documents": summary["documents"],
        "num_sentences": summary["sentences"],
        "num_tokens": summary["tokens"],
        "splits": {"train": summary["train_documents"], "heldout": summary["heldout_documents"]},
        "sources": [{"path": s.path, "kind": s.kind, "sha256": stats.checksums.get(s.path)}
                    for s in sources],
        # Where it was written and how verbosely says nothing about the data.
        "config": {k: v for k, v in cfg.as_dict().items()
                   if k not in ("output", "overwrite", "quiet")},
        "summary": summary,
    }


def _run(cfg: PrepConfig, sources: list[Source], stats: ReadStats, tmp: str,
         started: float) -> dict:
    """Everything heavy, inside the temporary directory `tmp`."""
    cache = os.path.join(tmp, "cache")
    os.makedirs(cache)
    spool, n_input_docs = _spool(cfg, sources, cache, stats)
    if n_input_docs == 0:
        raise _no_documents(stats)
    tok = _build_tokenizer(cfg, spool, n_input_docs)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = fmt.token_dtype(vocab_size)
    tokenized = _tokenize(cfg, spool, tok, dtype, cache)
    counts = count_corpus(tokenized)
    if not counts.kept.any():  # documents of control characters only, say
        raise _no_documents(stats, len(counts.kept))
    heldout = choose_heldout(counts.sentences_per_doc[counts.kept], cfg.heldout_fraction,
                             cfg.split_seed)
    with tqdm(total=len(tokenized), unit="doc", desc="writing", disable=cfg.quiet) as bar:
        max_token_id = write_arrays(tokenized, counts, heldout, tmp, dtype, bar.update)
    save_tokenizer(tok, tmp, fmt.TOKENIZER_FILE, fmt.VOCAB_FILE)
    del spool, tokenized
    shutil.rmtree(cache)
    summary = _summary(counts, heldout, stats, vocab_size, time.perf_counter() - started)
    metadata = _metadata(cfg, tok, tmp, dtype, sources, stats, summary, max_token_id)
    # metadata.json last: its format marker is what marks a finished dataset.
    with open(os.path.join(tmp, fmt.METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    return summary


def _os_error(exc: OSError, cfg: PrepConfig) -> PrepError:
    """One line for a full disk (naming the output), a read-only or unreadable path, ..."""
    out_of_space = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    if exc.errno in out_of_space or "No space left" in str(exc) or not exc.filename:
        return PrepError(describe_os_error(exc, cfg.output, "writing"))
    return PrepError(describe_os_error(exc, exc.filename, "accessing"))


def prepare(cfg: PrepConfig) -> dict:
    """Run the whole preparation; returns the summary that metadata.json also records."""
    try:
        return _prepare(cfg)
    except OSError as exc:
        raise _os_error(exc, cfg) from None


def _prepare(cfg: PrepConfig) -> dict:
    started = time.perf_counter()
    out = os.path.abspath(cfg.output)
    # First: a previous dataset that a kill caught in mid-swap is put back before any check.
    clean_leftovers(out)
    check_output(cfg)
    get_splitter(cfg.splitter)
    stats = ReadStats()
    sources = resolve_sources(cfg.inputs, cfg.text_field, stats)
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer, lowercase=cfg.lowercase)
    bars_were_on = datasets.is_progress_bar_enabled()
    if cfg.quiet:
        datasets.disable_progress_bars()
    try:
        # check_output has refused anything but a new path, an empty folder, or (with
        # --overwrite) a dataset holding only its own files.
        with staged_dir(out, replace=cfg.overwrite) as tmp:
            summary = _run(cfg, sources, stats, str(tmp), started)
            pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
            if pause > 0:
                print(f"mbert-prep: pausing {pause} s before the final rename", flush=True)
                time.sleep(pause)
            # A long run: check again that what the rename replaces is still ours to replace.
            check_output(cfg)
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
    if not cfg.quiet:
        print("\n".join(_summary_lines(summary, cfg.output)), flush=True)
    return summary


def parse_args(argv: list[str] | None = None) -> PrepConfig:
    p = argparse.ArgumentParser(prog="mbert-prep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = PrepConfig(inputs=["-"], output="-")
    p.add_argument("inputs", nargs="+", help="files (.txt/.jsonl/.parquet), directories of "
                   "them, a save_to_disk directory, or a datasets.load_dataset name")
    p.add_argument("--output", "-o", required=True, help="dataset directory to create")
    p.add_argument("--text-field", default=d.text_field, help="text column of jsonl/parquet/HF")
    p.add_argument("--hf-split", default=d.hf_split, help="split of a datasets input")
    p.add_argument("--hf-config", default=None, help="configuration of a datasets input")
    p.add_argument("--splitter", default=d.splitter, help="sentence splitter name or mod:fn")
    p.add_argument("--tokenizer", default=None, help="existing vocab.txt or tokenizer.json")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="trained vocab size")
    case = p.add_mutually_exclusive_group()
    case.add_argument("--lowercase", dest="lowercase", action="store_true", default=d.lowercase)
    case.add_argument("--cased", dest="lowercase", action="store_false")
    p.add_argument("--min-frequency", type=int, default=d.min_frequency)
    p.add_argument("--num-proc", type=int, default=d.num_proc, help="tokenising processes")
    p.add_argument("--batch-docs", type=int, default=d.batch_docs)
    p.add_argument("--heldout-fraction", type=float, default=d.heldout_fraction)
    p.add_argument("--split-seed", type=int, default=d.split_seed)
    p.add_argument("--max-line-chars", type=int, default=d.max_line_chars)
    p.add_argument("--max-doc-chars", type=int, default=d.max_doc_chars)
    p.add_argument("--max-sentence-tokens", type=int, default=d.max_sentence_tokens)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary")
    args = vars(p.parse_args(argv))
    return PrepConfig(**args)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        prepare(cfg)
    except UserError as exc:
        print(f"mbert-prep: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mbert-prep: interrupted; nothing was written to the output", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
