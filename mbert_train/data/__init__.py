"""Pretraining data: prepared corpora, MLM+NSP/SOP samples, resumable sharded loaders.

The trainer's whole interface::

    dataset_dir = cfg.data.path or prepare_default_corpus(cfg.data)
    metadata = open_dataset(dataset_dir).metadata
    vocab_size = resolve_vocab(metadata, cfg.model.vocab_size, dataset_dir)
    pad_token_id = resolve_pad(metadata, cfg.model.pad_token_id, dataset_dir)
    train_loader, eval_loader = build_loaders(cfg.data, dataset_dir, seed=..., micro_batch_size=...,
                                              dp_rank=..., dp_size=..., grad_accum=...)
"""

from mbert_train.data.config import DataConfig
from mbert_train.data.corpus import PreparedCorpus, SpecialIds, open_dataset, resolve_pad, resolve_vocab
from mbert_train.data.dataset import PretrainingDataset
from mbert_train.data.default_corpus import prepare_default_corpus
from mbert_train.data.loader import EvalLoader, TrainLoader, build_loaders

__all__ = ["DataConfig", "EvalLoader", "PreparedCorpus", "PretrainingDataset", "SpecialIds",
           "TrainLoader", "build_loaders", "open_dataset", "prepare_default_corpus", "resolve_pad",
           "resolve_vocab"]
