"""`mbert-prep`: raw text -> a tokenised, memory-mappable corpus for MLM+NSP/SOP pretraining.

    mbert-prep corpus/*.txt --output data/wiki --vocab-size 30522 --num-proc 8
    mbert-prep docs.jsonl --text-field body --tokenizer bert-base-uncased/vocab.txt --output d
    mbert-prep corpus/ --heldout valid.txt --output data/wiki   # held out: exactly valid.txt
    mbert-prep my-bert_text_sentence --vocab-file vocab.txt -o d   # Megatron .bin/.idx, ids kept

Steps: check everything cheap first (inputs, text fields, tokenizer file, output path), then
read and repair documents into an Arrow spool, choose the held-out documents (`--heldout`
files, or `--heldout-fraction` of the documents), train the WordPiece tokenizer on the training
documents only (or load one), sentence-split and tokenise with a multi-process `datasets.map`,
and stream the arrays of `data_prep.format`. All of it happens in a hidden temporary directory
beside the output (`mbert_train.staging`), fsynced and renamed into place only when complete,
so an interrupted run leaves nothing at the output path that looks finished; a later run
removes the leftovers of dead runs (and puts back a previous dataset a kill caught in
mid-swap).

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
from data_prep.from_indexed import IndexedInputs, TokenizedView, heldout_copies, open_indexed
from data_prep.sources import ReadStats, Source, read_documents, resolve_sources
from data_prep.sources import total_local_bytes
from data_prep.split import get_splitter
from data_prep.tokenizer import for_corpus, is_lowercasing, load_tokenizer
from data_prep.tokenizer import iter_text_batches, save_tokenizer, special_ids, train_wordpiece
from data_prep.writer import CorpusCounts, choose_heldout, count_corpus, count_sentences
from data_prep.writer import spool_documents
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
    for item in [*cfg.inputs, *cfg.heldout]:
        if os.path.isdir(item) and _inside(out, item):
            raise PrepError(f"--output {cfg.output} is inside the input folder {item}, whose "
                            f"files are all read as input; choose an --output outside it")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _summary_lines(summary: dict, output: str) -> list[str]:
    s = summary
    copies = s.get("heldout_copies_dropped", 0)
    held_note = f", {copies:,} training copies of held-out documents dropped" if copies else ""
    return [
        f"mbert-prep: wrote {output}",
        f"  documents  {s['documents']:,} (train {s['train_documents']:,}, "
        f"held-out {s['heldout_documents']:,}{held_note}); one-sentence documents "
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


def _build_tokenizer(cfg: PrepConfig, spool, heldout_inputs: np.ndarray) -> Tokenizer:
    """The given tokenizer, or one trained on the training documents only."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, lowercase=cfg.lowercase)
    skip = np.zeros(len(spool), dtype=bool)
    skip[heldout_inputs] = True
    return train_wordpiece(iter_text_batches(spool, "text", 1000, skip), vocab_size=cfg.vocab_size,
                           lowercase=cfg.lowercase, min_frequency=cfg.min_frequency,
                           length=len(spool) - len(heldout_inputs), show_progress=not cfg.quiet)


def _no_documents(stats: ReadStats, tokenless: int = 0) -> PrepError:
    return PrepError(
        f"no documents in the inputs ({stats.files} file(s) read; skipped: empty files "
        f"{stats.empty_files}, empty records {stats.empty_records}, records without text "
        f"{stats.records_without_text}, bad JSON lines {stats.bad_json_lines}, files of unknown "
        f"type {stats.unknown_files}, documents without a token {tokenless}); nothing was "
        f"written: check the inputs and --text-field")


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", errors="replace"), digest_size=16).digest()


def _spool(cfg: PrepConfig, sources: list[Source], heldout: list[Source], cache: str,
           stats: ReadStats):
    """Read the held-out sources, then the training sources (dropping documents identical to a
    held-out one), into Arrow spool files; returns (all documents, training first, the number
    of training documents, the number dropped as copies)."""
    held_digests: set[bytes] = set()
    copies = 0

    def remember(docs):
        for doc in docs:
            held_digests.add(_digest(doc))
            yield doc

    def without_copies(docs):
        nonlocal copies
        for doc in docs:
            if held_digests and _digest(doc) in held_digests:
                copies += 1
            else:
                yield doc

    def read(srcs, name, wrap):
        with tqdm(total=total_local_bytes(srcs) or None, unit="B", unit_scale=True,
                  desc=f"reading {name}", disable=cfg.quiet) as bar:
            docs = read_documents(srcs, text_field=cfg.text_field, hf_split=cfg.hf_split,
                                  hf_config=cfg.hf_config, cache_dir=cache, stats=stats,
                                  max_line_chars=cfg.max_line_chars,
                                  max_doc_chars=cfg.max_doc_chars, progress=bar.update)
            path = os.path.join(cache, f"{name}.arrow")
            return path, spool_documents(wrap(docs), path)

    if heldout:
        held_path, n_held = read(heldout, "heldout", remember)
        if n_held == 0:
            raise PrepError(f"--heldout {' '.join(cfg.heldout)}: no documents in these files; "
                            f"pass files with text, or leave --heldout out")
    train_path, n_train = read(sources, "documents", without_copies)
    if n_train == 0:
        raise _no_documents(stats)
    spool = datasets.Dataset.from_file(train_path)
    if heldout:
        spool = datasets.concatenate_datasets([spool, datasets.Dataset.from_file(held_path)])
    return spool, n_train, copies


def _heldout_inputs(cfg: PrepConfig, spool, n_train: int, cache: str) -> np.ndarray:
    """Input-document ids of the held-out split, chosen before the tokenizer is trained."""
    if cfg.heldout:
        return np.arange(n_train, len(spool), dtype=np.int64)
    if cfg.heldout_fraction == 0:
        return np.zeros(0, np.int64)
    counted = spool.map(
        count_sentences, batched=True, batch_size=cfg.batch_docs,
        num_proc=cfg.num_proc if cfg.num_proc > 1 else None, remove_columns=["text"],
        features=datasets.Features({"sentences": datasets.Value("int32")}),
        fn_kwargs=dict(splitter=cfg.splitter),
        cache_file_name=os.path.join(cache, "sentences.arrow"),
        new_fingerprint="mbert-prep-sentences", desc="count sentences")
    sentences = counted.with_format("arrow")[:]["sentences"].to_numpy(zero_copy_only=False)
    return choose_heldout(sentences, cfg.heldout_fraction, cfg.split_seed)


def _heldout_kept(cfg: PrepConfig, counts: CorpusCounts, heldout_inputs: np.ndarray, *,
                  check: bool = True) -> np.ndarray:
    """The held-out input documents that kept a token, as ids among kept documents."""
    kept = counts.kept
    heldout = (np.cumsum(kept) - 1)[heldout_inputs[kept[heldout_inputs]]].astype(np.int64)
    if check and cfg.heldout and len(heldout) == 0:
        raise PrepError(f"--heldout {' '.join(cfg.heldout)}: no document of these files has a "
                        f"token; pass files with text, or leave --heldout out")
    if len(heldout) == int(kept.sum()):
        raise PrepError("every document with a token is held out, none is left to train on; "
                        "check the inputs")
    return heldout


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
             seconds: float, copies: int) -> dict:
    kept_sentences = counts.sentences_per_doc[counts.kept]
    return {
        "documents": int(counts.kept.sum()),
        "train_documents": int(counts.kept.sum()) - len(heldout),
        "heldout_documents": len(heldout),
        "heldout_copies_dropped": copies,
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
              heldout: list[Source], stats: ReadStats, summary: dict, max_token_id: int) -> dict:
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
        "lowercase": is_lowercasing(tok),
        "token_dtype": dtype.name,
        "splitter": cfg.splitter,
        "num_documents": summary["documents"],
        "num_sentences": summary["sentences"],
        "num_tokens": summary["tokens"],
        "splits": {"train": summary["train_documents"], "heldout": summary["heldout_documents"]},
        "sources": [{"path": s.path, "kind": s.kind, "sha256": stats.checksums.get(s.path),
                     "split": split} for split, group in (("train", sources), ("heldout", heldout))
                    for s in group],
        # A trained vocabulary has seen the training split only.
        "tokenizer_trained_on": None if cfg.tokenizer else "train",
        # Where it was written and how verbosely says nothing about the data.
        "config": {k: v for k, v in cfg.as_dict().items()
                   if k not in ("output", "overwrite", "quiet")},
        "summary": summary,
    }


def _run(cfg: PrepConfig, sources: list[Source], heldout_sources: list[Source], stats: ReadStats,
         tmp: str, started: float) -> dict:
    """Everything heavy, inside the temporary directory `tmp`."""
    cache = os.path.join(tmp, "cache")
    os.makedirs(cache)
    spool, n_train, copies = _spool(cfg, sources, heldout_sources, cache, stats)
    heldout_inputs = _heldout_inputs(cfg, spool, n_train, cache)
    tok = _build_tokenizer(cfg, spool, heldout_inputs)
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = fmt.token_dtype(vocab_size)
    tokenized = _tokenize(cfg, spool, tok, dtype, cache)
    counts = count_corpus(tokenized)
    if not counts.kept.any():  # documents of control characters only, say
        raise _no_documents(stats, len(counts.kept))
    heldout = _heldout_kept(cfg, counts, heldout_inputs)
    with tqdm(total=len(tokenized), unit="doc", desc="writing", disable=cfg.quiet) as bar:
        max_token_id = write_arrays(tokenized, counts, heldout, tmp, dtype, bar.update)
    save_tokenizer(tok, tmp, fmt.TOKENIZER_FILE, fmt.VOCAB_FILE)
    del spool, tokenized
    shutil.rmtree(cache)
    summary = _summary(counts, heldout, stats, vocab_size, time.perf_counter() - started, copies)
    metadata = _metadata(cfg, tok, tmp, dtype, sources, heldout_sources, stats, summary,
                         max_token_id)
    # metadata.json last: its format marker is what marks a finished dataset.
    with open(os.path.join(tmp, fmt.METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    return summary


def _run_indexed(cfg: PrepConfig, indexed: IndexedInputs, stats: ReadStats, tmp: str,
                 started: float) -> dict:
    """A Megatron indexed dataset: its token ids and boundaries kept (`data_prep.from_indexed`)."""
    tok, counts = indexed.tokenizer, indexed.counts
    vocab_size = tok.get_vocab_size(with_added_tokens=True)
    dtype = fmt.token_dtype(vocab_size)
    heldout_inputs = indexed.heldout_inputs
    if heldout_inputs is None:
        heldout_inputs = choose_heldout(counts.sentences_per_doc, cfg.heldout_fraction,
                                        cfg.split_seed)
    heldout = _heldout_kept(cfg, counts, heldout_inputs)
    copies = heldout_copies(indexed)
    copies = _heldout_kept(cfg, counts, copies, check=False)  # as ids among the kept documents
    if len(copies) and len(copies) + len(heldout) >= int(counts.kept.sum()):
        raise PrepError(f"--heldout {' '.join(cfg.heldout)}: every training document is also a held-out one "
                        f"(the same token ids); pass a held-out set that is not the training data")
    view = TokenizedView(indexed, cfg.max_sentence_tokens)
    with tqdm(total=len(view), unit="doc", desc="writing", disable=cfg.quiet) as bar:
        max_token_id = write_arrays(view, counts, heldout, tmp, dtype, bar.update, not_trained=copies)
    save_tokenizer(tok, tmp, fmt.TOKENIZER_FILE, fmt.VOCAB_FILE)
    summary = _summary(counts, heldout, stats, vocab_size, time.perf_counter() - started, len(copies))
    summary["train_documents"] -= len(copies)  # their tokens stay in the files, outside both splits
    metadata = _metadata(cfg, tok, tmp, dtype, indexed.sources, indexed.heldout_sources, stats,
                         summary, max_token_id)
    metadata["splitter"] = "megatron-sequences"  # one sentence per sequence of the .idx
    with open(os.path.join(tmp, fmt.METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
    return summary


def _os_error(exc: OSError, cfg: PrepConfig) -> PrepError:
    """One line for a full disk (naming the output), a read-only or unreadable path, ..."""
    out_of_space = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
    if exc.errno in out_of_space or "No space left" in str(exc) or not exc.filename:
        return PrepError(describe_os_error(exc, cfg.output, "writing"))
    return PrepError(describe_os_error(exc, exc.filename, "accessing"))


def _resolve_all(cfg: PrepConfig, stats: ReadStats) -> tuple[list[Source], list[Source]]:
    """(training sources, held-out sources); a held-out file is never also read for training
    (it may lie inside an input folder)."""
    heldout = resolve_sources(cfg.heldout, cfg.text_field, ReadStats()) if cfg.heldout else []
    held_paths = {os.path.realpath(s.path) for s in heldout}
    sources = [s for s in resolve_sources(cfg.inputs, cfg.text_field, stats)
               if os.path.realpath(s.path) not in held_paths]
    if not sources:
        raise PrepError("every input is also a --heldout file; pass training inputs besides the "
                        "held-out ones")
    return sources, heldout


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
    indexed = open_indexed(cfg, stats)  # None unless the inputs are Megatron .bin/.idx pairs
    sources, heldout_sources = (_resolve_all(cfg, stats) if indexed is None
                                else (indexed.sources, indexed.heldout_sources))
    if cfg.tokenizer:
        load_tokenizer(cfg.tokenizer, lowercase=cfg.lowercase)
    bars_were_on = datasets.is_progress_bar_enabled()
    if cfg.quiet:
        datasets.disable_progress_bars()
    try:
        # check_output has refused anything but a new path, an empty folder, or (with
        # --overwrite) a dataset holding only its own files.
        with staged_dir(out, replace=cfg.overwrite) as tmp:
            summary = (_run(cfg, sources, heldout_sources, stats, str(tmp), started)
                       if indexed is None else _run_indexed(cfg, indexed, stats, str(tmp), started))
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
                   "them, a save_to_disk directory, a datasets.load_dataset name, or Megatron "
                   ".bin/.idx prefixes (token ids kept; needs --vocab-file)")
    p.add_argument("--output", "-o", required=True, help="dataset directory to create")
    p.add_argument("--text-field", default=d.text_field, help="text column of jsonl/parquet/HF")
    p.add_argument("--hf-split", default=d.hf_split, help="split of a datasets input")
    p.add_argument("--hf-config", default=None, help="configuration of a datasets input")
    p.add_argument("--splitter", default=d.splitter, help="sentence splitter name or mod:fn")
    p.add_argument("--tokenizer", "--vocab-file", default=None, help="existing vocab.txt or "
                   "tokenizer.json (for Megatron .bin/.idx inputs: the vocab they hold ids of)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="trained vocab size")
    case = p.add_mutually_exclusive_group()
    case.add_argument("--lowercase", dest="lowercase", action="store_true", default=d.lowercase)
    case.add_argument("--cased", dest="lowercase", action="store_false")
    p.add_argument("--min-frequency", type=int, default=d.min_frequency)
    p.add_argument("--num-proc", type=int, default=d.num_proc, help="tokenising processes")
    p.add_argument("--batch-docs", type=int, default=d.batch_docs)
    held = p.add_mutually_exclusive_group()
    held.add_argument("--heldout", nargs="+", default=[], metavar="FILE",
                      help="files or folders (same kinds as the inputs) whose documents are the "
                      "held-out split, and only those: never in training samples and never seen "
                      "by the trained tokenizer (a held-out file inside an input folder is read "
                      "as held-out only; identical training documents are dropped)")
    held.add_argument("--heldout-fraction", type=float, default=None,
                      help="fraction of multi-sentence documents held out for evaluation, chosen "
                      "before the tokenizer, which is trained on the other documents only "
                      # %(default).0s prints nothing; it stops argparse adding "(default: None)"
                      "(default%(default).0s: 0.01, or 0 with --heldout)")
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
