"""The embedded default corpus: the standard library's docstrings, prepared on first use.

Every Python installation carries ~1 MB of English prose in its docstrings, so the trainer's
default configuration runs with no download and no data in the repository. On first use the
text is extracted (`stdlib_docs.py`, in an isolated subprocess) and prepared with the same code
as `mbert-prep` (trained uncased WordPiece, `DataConfig.default_vocab_size` entries); both are
cached under $MBERT_CACHE (default ~/.cache/mbert_train), keyed by the Python version.

Concurrent first use (all torchrun ranks start at once) is safe: a file lock lets one process
build while the others wait, and the build happens in a temporary directory renamed into place,
so a crash never leaves a dataset that looks finished. Should the lock be unusable (some network
filesystems), the rename alone still keeps the result correct: the first rename wins and the
others use it.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile

from filelock import FileLock, Timeout

from data_prep import format as fmt
from data_prep.config import PrepConfig
from mbert_train.data.config import DataConfig
from mbert_train.errors import UserError, describe_os_error

BUILDER_VERSION = 2
"""Bump when the extraction or preparation changes, so stale caches are not reused (2: the
tokenizer is trained on the training documents only and carries the BERT post-processor)."""
HELDOUT_FRACTION = 0.05
"""Share of the default corpus's multi-sentence documents kept for evaluation."""
LOCK_TIMEOUT_S = 600


def cache_root(cfg: DataConfig, *, create: bool = True) -> str:
    root = cfg.cache_dir or os.environ.get("MBERT_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "mbert_train")
    if create:
        os.makedirs(root, exist_ok=True)
    return root


def cached_corpus_dir(cfg: DataConfig) -> str:
    """Where the prepared default corpus for `cfg` lives (whether or not it was built yet)."""
    return os.path.join(cache_root(cfg, create=False), corpus_key(cfg))


def corpus_key(cfg: DataConfig) -> str:
    """Name of the cached dataset: Python build, builder version and vocabulary size."""
    py = f"{platform.python_implementation().lower()}{platform.python_version()}"
    return f"stdlib-docs-{py}-v{BUILDER_VERSION}-uncased-vocab{cfg.default_vocab_size}"


def _extract_text(root: str, key: str) -> str:
    """The docstring text file (cached; the vocabulary size does not change it)."""
    py = f"{platform.python_implementation().lower()}{platform.python_version()}"
    path = os.path.join(root, f"stdlib-docs-{py}-v{BUILDER_VERSION}.txt")
    if os.path.isfile(path):
        return path
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "stdlib_docs.py")
    # -I isolates the child: no user site-packages, no PYTHON* variables, nothing from the
    # current directory shadowing a standard module.
    try:
        done = subprocess.run([sys.executable, "-I", script, path], capture_output=True,
                              text=True, timeout=LOCK_TIMEOUT_S, cwd=root)
    except subprocess.TimeoutExpired:
        raise UserError(f"extracting the default corpus for {key} took over {LOCK_TIMEOUT_S} s; "
                        f"set data.path to a dataset prepared with mbert-prep") from None
    if done.returncode != 0 or not os.path.isfile(path):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"extracting the default corpus for {key} failed ({last}); set "
                        f"data.path to a dataset prepared with mbert-prep")
    return path


def _build(root: str, key: str, cfg: DataConfig) -> str:
    final = os.path.join(root, key)
    text = _extract_text(root, key)
    staging = tempfile.mkdtemp(dir=root, prefix=f".{key}.staging-{os.getpid()}-")
    try:
        built = os.path.join(staging, "dataset")
        from data_prep.prep import prepare  # datasets (1 s to import) only when the cache is built

        prepare(PrepConfig(inputs=[text], output=built, vocab_size=cfg.default_vocab_size,
                           lowercase=True, heldout_fraction=HELDOUT_FRACTION, num_proc=1,
                           quiet=True))
        try:
            os.rename(built, final)
        except OSError:
            # Another process renamed its finished copy first; theirs is identical in
            # content, and readers may already have it open, so keep it.
            if not fmt.is_prepared_dataset(final):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def prepare_default_corpus(cfg: DataConfig) -> str:
    """Directory of the prepared default corpus, building and caching it on first use."""
    try:
        return _prepare_default_corpus(cfg)
    except OSError as exc:  # a read-only or full cache: one line naming the path
        raise UserError(describe_os_error(exc, exc.filename or "the embedded-corpus cache "
                                          "($MBERT_CACHE, data.cache_dir)", "writing")) from None


def _prepare_default_corpus(cfg: DataConfig) -> str:
    root = cache_root(cfg)
    key = corpus_key(cfg)
    final = os.path.join(root, key)
    if fmt.is_prepared_dataset(final):
        return final
    try:
        with FileLock(os.path.join(root, f"{key}.lock"), timeout=LOCK_TIMEOUT_S):
            if fmt.is_prepared_dataset(final):
                return final
            return _build(root, key, cfg)
    except Timeout:
        raise UserError(f"waited {LOCK_TIMEOUT_S} s for another process building {final}; "
                        f"delete {final}.lock if no such process runs") from None
