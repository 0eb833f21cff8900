"""Model hyper-parameters, mirrored one-to-one with `transformers.MegatronBertConfig` (and, for
`arch=modernbert`, with `transformers.ModernBertConfig`: model/modernbert_hf.py maps them)."""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any

# config.json key of each field (`transformers.MegatronBertConfig` names); the first five are required.
_HF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
            "layer_norm_eps": "layer_norm_eps", "hidden_dropout": "hidden_dropout_prob",
            "attention_dropout": "attention_probs_dropout_prob", "initializer_range": "initializer_range",
            "pad_token_id": "pad_token_id"}
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
ARCHS = ("megatron_bert", "modernbert")


def _type_problem(kind: str, value: Any) -> str | None:
    """Why `value` cannot be a field annotated `kind` (JSON and YAML readers let floats, strings
    and booleans through where integers belong), or None."""
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        return "must be an integer"
    if kind == "float" and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                            or not math.isfinite(value)):
        return "must be a finite number"
    if kind == "bool" and not isinstance(value, bool):
        return "must be true or false"
    return None


@dataclass
class ModelConfig:
    """Shape and regularisation of a MegatronBERT (or ModernBERT) encoder with its pretraining heads."""

    vocab_size: int | None = None
    """Real vocabulary size (the tokenizer's); the embedding is padded beyond it for TP. None (every
    preset): taken from the dataset's tokenizer at start-up; set by hand it must match it."""
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
    tp_invariant_dropout: bool = False
    """Masks that do not depend on the TP or SP degree, so TP=N drops exactly what TP=1 drops:
    on CUDA attention leaves fused SDPA for the blockwise path (per-head streams), and under
    sequence parallelism residual-stream masks are drawn for the whole sequence and sliced. Off:
    CUDA draws each TP rank's heads' masks inside fused SDPA from the rank's own stream (on CPU
    attention masks are per head, hence TP-invariant, either way)."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of weights."""
    pad_token_id: int | None = 0
    """Id of [PAD]; its embedding row starts at zero and gets no gradient from the input side, as in
    the reference. A run's config leaves it null (every preset): it is then taken from the dataset's
    tokenizer at start-up, as `vocab_size` is; set by hand it must match it. None in a model built
    directly means no padding row (transformers' `pad_token_id=None`)."""
    binary_head: bool = True
    """Pooler + NSP/SOP head; False gives the MLM-only (RoBERTa-style) model."""
    arch: str = "megatron_bert"
    """Model family: `megatron_bert` (this class's other fields) or `modernbert` (Warner et al.
    2024, `transformers.ModernBertForMaskedLM`: RoPE, GeGLU, alternating global and sliding-window
    attention, no biases; `hidden_dropout` is its embedding and MLP dropout; MLM only)."""
    global_attn_every_n_layers: int = 3
    """modernbert: layer i attends globally where i % n == 0, else within the local window."""
    local_attention: int = 128
    """modernbert: width of the sliding window; a token sees the tokens at most half of it away."""
    global_rope_theta: float = 160_000.0
    """modernbert: RoPE base of the global layers."""
    local_rope_theta: float = 10_000.0
    """modernbert: RoPE base of the sliding-window layers."""

    def __post_init__(self) -> None:
        for f in fields(self):
            problem = _type_problem(f.type, getattr(self, f.name))
            if problem:
                raise ValueError(f"model.{f.name}={getattr(self, f.name)!r} {problem}")
        for name in ("vocab_size", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and _type_problem("int", value):
                raise ValueError(f"model.{name}={value!r} {_type_problem('int', value)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
                f"{self.num_heads}; choose num_heads dividing hidden_size (e.g. "
                f"{self.hidden_size // 64 or 1})")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be in [0, 1)")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"model.layer_norm_eps={self.layer_norm_eps} must be > 0")
        if self.initializer_range < 0:
            raise ValueError(f"model.initializer_range={self.initializer_range} must be >= 0")
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch={self.arch!r} is not a model family; choose one of {', '.join(ARCHS)}")
        if self.arch == "modernbert":
            self._check_modernbert()
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < (self.vocab_size or self.pad_token_id + 1):
            raise ValueError(f"model.pad_token_id={self.pad_token_id} must be a token id below model.vocab_size="
                             f"{self.vocab_size}")

    def _check_modernbert(self) -> None:
        if self.binary_head:
            raise ValueError("model.arch=modernbert has no NSP/SOP head; set model.binary_head=false "
                             "(and data.objective=none)")
        if self.head_dim % 2:
            raise ValueError(f"model.arch=modernbert rotates pairs of dimensions (RoPE), but hidden_size/num_heads="
                             f"{self.head_dim} is odd; choose an even head size")
        for name in ("global_attn_every_n_layers", "local_attention", "global_rope_theta", "local_rope_theta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name}={getattr(self, name)} must be positive")
        if self.local_attention % 2:
            raise ValueError(f"model.local_attention={self.local_attention} must be even (a window of "
                             f"+-local_attention/2 tokens)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` of the equivalent `MegatronBertForPreTraining` (ModernBERT's:
        `model.modernbert_hf.hf_config`)."""
        if self.arch != "megatron_bert":
            raise ValueError(f"model.arch={self.arch}: its config.json comes from model/modernbert_hf.py (hf_config)")
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
        """From a `config.json`; a missing required key raises KeyError, a wrong type ValueError
        naming the config.json key."""
        if hf.get("model_type") == "modernbert":
            raise ValueError("model_type=modernbert: read it with model/modernbert_hf.py (config_from_hf)")
        act = hf.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"config.json hidden_act={act!r} is not supported; only 'gelu' (exact erf GELU)")
        kinds, kwargs = {f.name: f.type for f in fields(cls)}, {}
        for name, key in _HF_KEYS.items():
            if name in _HF_REQUIRED and key not in hf:
                raise KeyError(key)
            if hf.get(key) is None:  # absent, or null as HF writes an unset pad_token_id
                continue
            problem = _type_problem(kinds[name], hf[key])
            if problem:
                raise ValueError(f"{key}={hf[key]!r} {problem}")
            kwargs[name] = hf[key]
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
