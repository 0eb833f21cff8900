"""MegatronBERT with tensor-parallel layers, and the maps to and from Hugging Face weights."""

from mbert_train.model.bert import MegatronBert, PretrainOutput
from mbert_train.model.config import ModelConfig

__all__ = ["MegatronBert", "ModelConfig", "PretrainOutput"]
