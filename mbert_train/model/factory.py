"""The one place that turns `model.arch` into a model class."""

from __future__ import annotations

from torch import nn

from mbert_train.model.bert import MegatronBert
from mbert_train.model.config import ModelConfig
from mbert_train.model.modernbert import ModernBert

MODEL_CLASSES: dict[str, type[nn.Module]] = {"megatron_bert": MegatronBert, "modernbert": ModernBert}


def build_model(cfg: ModelConfig, tp=None, **kwargs) -> nn.Module:
    """The model of `cfg.arch`; `tp` and the keyword options as `MegatronBert` takes them."""
    return MODEL_CLASSES[cfg.arch](cfg, tp, **kwargs)
