"""MegatronBERT and ModernBERT with tensor-parallel layers, and the maps to and from Hugging Face weights."""

from mbert_train.model.bert import MegatronBert, PretrainOutput
from mbert_train.model.config import ModelConfig
from mbert_train.model.factory import build_model
from mbert_train.model.modernbert import ModernBert

__all__ = ["MegatronBert", "ModelConfig", "ModernBert", "PretrainOutput", "build_model"]
