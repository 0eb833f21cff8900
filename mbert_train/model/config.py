"""Model hyper-parameters, mirrored one-to-one with `transformers.MegatronBertConfig`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class ModelConfig:
    """Shape and regularisation of a MegatronBERT encoder with its pretraining heads."""

    vocab_size: int = 30522
    """Real vocabulary size (the tokenizer's); the embedding is padded beyond it for TP."""
    hidden_size: int = 768
    """Width of the residual stream."""
    num_layers: int = 12
    """Number of pre-LayerNorm transformer layers."""
    num_heads: int = 12
    """Attention heads; must divide `hidden_size`, and be divisible by the TP degree."""
    intermediate_size: int = 3072
    """MLP width; must be divisible by the TP degree."""
    max_position_embeddings: int = 512
    """Longest sequence the learned position table covers."""
    type_vocab_size: int = 2
    """Number of token types (segments A and B)."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon; the HF reference defaults to 1e-12, Megatron-LM uses 1e-5."""
    hidden_dropout: float = 0.1
    """Dropout on embeddings and on each residual branch."""
    attention_dropout: float = 0.1
    """Dropout on attention probabilities."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of weights."""
    pad_token_id: int = 0
    """Id of [PAD]; its embedding row starts at zero as in the reference."""
    binary_head: bool = True
    """Pooler + NSP/SOP head; False gives the MLM-only (RoBERTa-style) model."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
                f"{self.num_heads}; choose num_heads dividing hidden_size (e.g. "
                f"{self.hidden_size // 64 or 1})")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` of the equivalent `MegatronBertForPreTraining`."""
        return {
            "architectures": ["MegatronBertForPreTraining"],
            "model_type": "megatron-bert",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "hidden_act": "gelu",
            "hidden_dropout_prob": self.hidden_dropout,
            "attention_probs_dropout_prob": self.attention_dropout,
            "max_position_embeddings": self.max_position_embeddings,
            "type_vocab_size": self.type_vocab_size,
            "initializer_range": self.initializer_range,
            "layer_norm_eps": self.layer_norm_eps,
            "pad_token_id": self.pad_token_id,
            "tie_word_embeddings": True,
        }

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "ModelConfig":
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"config.json hidden_act={act!r} is not supported; only 'gelu' (exact erf GELU)")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            intermediate_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
            attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
            initializer_range=hf.get("initializer_range", 0.02),
            pad_token_id=hf.get("pad_token_id") or 0,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
