"""Settings of the pretraining data pipeline (the `data` config group)."""

from __future__ import annotations

from dataclasses import dataclass

OBJECTIVES = ("nsp", "sop", "none")


@dataclass
class DataConfig:
    """Which corpus, which objective, and how samples are cut, masked and batched."""

    path: str | None = None
    """Prepared dataset directory from `mbert-prep`; None = the embedded default corpus."""
    objective: str = "nsp"
    """nsp: BERT's next-sentence prediction; sop: ALBERT/Megatron sentence-order prediction;
    none: MLM only, contiguous token segments packed to full length (no sentence-pair label)."""
    max_seq_length: int = 128
    """Tokens per sample including [CLS] and [SEP]s; batches are padded up to at most this."""
    short_seq_prob: float = 0.1
    """Probability that a sample targets a random shorter length (BERT, to match fine-tuning)."""
    masked_lm_prob: float = 0.15
    """Fraction of maskable tokens selected for MLM prediction."""
    max_predictions_per_seq: int = 20
    """Cap on the number of MLM predictions per sample (BERT: 20 at length 128)."""
    whole_word_masking: bool = False
    """Select whole words (a token and its following ## pieces) instead of single pieces."""
    pad_to_multiple_of: int = 8
    """Batch length is the longest sample rounded up to this (capped at max_seq_length)."""
    num_workers: int = 1
    """DataLoader worker processes for training batches; 0 builds them in the main process."""
    prefetch_factor: int = 4
    """Batches each worker prepares ahead (ignored when num_workers is 0)."""
    default_vocab_size: int = 8192
    """Vocabulary size of the WordPiece tokenizer trained for the embedded default corpus."""
    cache_dir: str | None = None
    """Where the embedded corpus is cached; None = $MBERT_CACHE or ~/.cache/mbert_train."""
    eval_seed: int = 1234
    """Seed of the held-out samples and masks: fixed apart from the training seed so that
    evaluations of runs with different seeds score the very same batches."""
    eval_max_samples: int = 2048
    """Upper bound on held-out samples per evaluation (spread evenly over the held-out set)."""
    accept_changed_corpus: bool = False
    """Resume from a checkpoint whose data position was recorded on another corpus (another text,
    sentence split or held-out split of the same settings): its position then counts samples of
    this corpus, which are other samples; the start line says so. False refuses such a resume."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"data.objective={self.objective!r} is not one of "
                             f"{', '.join(OBJECTIVES)}")
        if not 8 <= self.max_seq_length <= 65535:
            raise ValueError(f"data.max_seq_length={self.max_seq_length} must be in [8, 65535]")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ValueError(f"data.short_seq_prob={self.short_seq_prob} must be in [0, 1]")
        if not 0.0 < self.masked_lm_prob < 1.0:
            raise ValueError(f"data.masked_lm_prob={self.masked_lm_prob} must be in (0, 1)")
        for name in ("max_predictions_per_seq", "pad_to_multiple_of", "prefetch_factor",
                     "eval_max_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name}={getattr(self, name)} must be >= 1")
        if self.max_predictions_per_seq > self.max_seq_length:
            raise ValueError(f"data.max_predictions_per_seq={self.max_predictions_per_seq} "
                             f"exceeds data.max_seq_length={self.max_seq_length}; lower it")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.default_vocab_size < 64:
            raise ValueError(f"data.default_vocab_size={self.default_vocab_size} must be >= 64 "
                             f"(WordPiece needs the alphabet plus 5 special tokens)")
        if self.eval_seed < 0:
            raise ValueError(f"data.eval_seed={self.eval_seed} must be >= 0")
