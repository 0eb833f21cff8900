"""Settings of one `mbert-prep` run, validated before any heavy work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mbert_train.errors import UserError


class PrepError(UserError):
    """A setting that cannot work; the one-line message names the flag and the fix."""


@dataclass
class PrepConfig:
    """Everything `mbert-prep` needs; field names match the command-line flags."""

    inputs: list[str] = field(default_factory=list)
    """Files (.txt/.jsonl/.parquet), directories of them, or `datasets` names/directories."""
    output: str = ""
    """Dataset directory to create; must be new, empty, or (with `overwrite`) a prepared dataset."""
    text_field: str = "text"
    """Column holding the document text in .jsonl/.parquet/`datasets` inputs."""
    hf_split: str = "train"
    """Split to read from a `datasets.load_dataset` input."""
    hf_config: str | None = None
    """Configuration name of a `datasets.load_dataset` input (e.g. wikitext-103-raw-v1)."""
    splitter: str = "rules"
    """Sentence splitter: a registered name (`data_prep.split`) or `module:function`."""
    tokenizer: str | None = None
    """Existing vocab.txt or tokenizer.json; None trains a WordPiece vocabulary."""
    vocab_size: int = 30522
    """Size of the trained vocabulary: padded with [unusedN] when the corpus is small, and never
    exceeded (the alphabet is capped at the most frequent characters; rarer ones become [UNK])."""
    lowercase: bool = True
    """Lower-case and strip accents (uncased BERT); False keeps case (cased BERT)."""
    min_frequency: int = 2
    """A word piece must occur this often to enter the trained vocabulary."""
    num_proc: int = 1
    """Processes for sentence splitting and tokenisation (`datasets.map(num_proc=...)`)."""
    batch_docs: int = 256
    """Documents per `map` batch: larger amortises overhead, smaller bounds memory."""
    heldout: list[str] = field(default_factory=list)
    """Files (same kinds as `inputs`) whose documents are the held-out split, and only those:
    never in training samples, never seen by the trained tokenizer. A held-out file inside an
    input folder is read as held-out only; training documents identical to a held-out one are
    dropped."""
    heldout_fraction: float | None = None
    """Fraction of multi-sentence documents held out for evaluation (at least 2 when > 0);
    None = 0.01, or 0 with `heldout`. The tokenizer is trained on the other documents only."""
    split_seed: int = 0
    """Seed of the deterministic held-out document choice."""
    max_line_chars: int = 100_000
    """Longer lines are cut into pieces of this size (bytes for .txt); counted."""
    max_doc_chars: int = 10_000_000
    """Longer documents are cut into several documents; counted."""
    max_sentence_tokens: int = 512
    """Longer sentences are cut into pieces of this many tokens; counted."""
    overwrite: bool = False
    """Replace an existing prepared dataset at `output` (only after the new one is complete);
    never anything that lacks the dataset's format marker."""
    quiet: bool = False
    """No progress bars and no closing summary (the summary still goes to metadata.json)."""

    def __post_init__(self) -> None:
        if not self.inputs:
            raise PrepError("no inputs; pass one or more files, directories or dataset names")
        if not self.output:
            raise PrepError("--output is empty; pass the dataset directory to create")
        positive = ("vocab_size", "min_frequency", "num_proc", "batch_docs", "max_line_chars",
                    "max_doc_chars", "max_sentence_tokens")
        for name in positive:
            if getattr(self, name) < 1:
                raise PrepError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.tokenizer is None and self.vocab_size < 64:
            raise PrepError(f"--vocab-size={self.vocab_size} is too small for WordPiece (it "
                            f"needs the alphabet plus 5 special tokens); use at least 64")
        if self.heldout and self.heldout_fraction:
            raise PrepError(f"--heldout and --heldout-fraction={self.heldout_fraction} both choose "
                            f"the held-out documents; pass only one of them")
        if self.heldout_fraction is None:
            self.heldout_fraction = 0.0 if self.heldout else 0.01
        if not 0.0 <= self.heldout_fraction <= 0.5:
            raise PrepError(f"--heldout-fraction={self.heldout_fraction} must be in [0, 0.5]")
        if self.split_seed < 0:
            raise PrepError(f"--split-seed={self.split_seed} must be >= 0")
        if self.max_line_chars > self.max_doc_chars:
            raise PrepError(f"--max-line-chars={self.max_line_chars} exceeds --max-doc-chars="
                            f"{self.max_doc_chars}; raise --max-doc-chars")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)
