"""Tensor parallelism: layout and groups, autograd collectives, parallel layers, vocab-parallel
cross-entropy and TP-aware randomness."""

from mbert_train.arithmetic import padded_vocab_size
from mbert_train.parallel.cross_entropy import vocab_parallel_argmax, vocab_parallel_cross_entropy
from mbert_train.parallel.layers import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                         shard, unshard)
from mbert_train.parallel.layout import ParallelDims, ParallelState, init_parallel
from mbert_train.parallel.mappings import copy_to_tp, gather_from_tp, reduce_from_tp, scatter_to_tp

__all__ = [
    "ColumnParallelLinear", "RowParallelLinear", "VocabParallelEmbedding", "ParallelDims", "ParallelState",
    "init_parallel", "padded_vocab_size", "copy_to_tp", "gather_from_tp", "reduce_from_tp", "scatter_to_tp",
    "vocab_parallel_cross_entropy", "vocab_parallel_argmax", "shard", "unshard",
]
