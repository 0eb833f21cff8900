"""`transformers.ModernBertForMaskedLM`'s config and weights, to and from ours (model.arch=modernbert).

The weights' *full* form is weights.py's (our parameter names, whole tensors, vocabulary trimmed
to `cfg.vocab_size`); `weights.shard_state_dict` cuts it for any TP degree. Our names differ from
transformers' only in name: Wqkv is [Q; K; V] stacked and Wi is [W_in; W_gate] stacked in both.
"""

from __future__ import annotations

from typing import Any

import torch

from mbert_train.model.config import ModelConfig
from mbert_train.model.weights import shard_state_dict

# config.json key of each ModelConfig field that ModernBertConfig has under another name or alone.
_HF_KEYS = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings", "layer_norm_eps": "norm_eps",
            "hidden_dropout": "mlp_dropout", "attention_dropout": "attention_dropout",
            "initializer_range": "initializer_range", "pad_token_id": "pad_token_id",
            "local_attention": "local_attention"}
_HF_REQUIRED = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size")
# What our model has fixed: a config.json saying otherwise describes another model.
_HF_FIXED = {"hidden_activation": "gelu", "classifier_activation": "gelu", "norm_bias": False,
             "attention_bias": False, "mlp_bias": False, "decoder_bias": True, "tie_word_embeddings": True}


def layer_types(cfg: ModelConfig) -> list[str]:
    return ["full_attention" if i % cfg.global_attn_every_n_layers == 0 else "sliding_attention"
            for i in range(cfg.num_layers)]


def hf_config(cfg: ModelConfig, *, cls_token_id: int | None = None, sep_token_id: int | None = None
              ) -> dict[str, Any]:
    """The `config.json` of the equivalent `ModernBertForMaskedLM`; [CLS] and [SEP] are the
    tokenizer's, when one is exported beside it (the published config makes them BOS and EOS too)."""
    return {
        "architectures": ["ModernBertForMaskedLM"],
        "model_type": "modernbert",
        **{key: getattr(cfg, name) for name, key in _HF_KEYS.items()},
        "embedding_dropout": cfg.hidden_dropout,
        "global_attn_every_n_layers": cfg.global_attn_every_n_layers,
        "layer_types": layer_types(cfg),
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": cfg.global_rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.local_rope_theta}},
        "initializer_cutoff_factor": 2.0,
        "dtype": "float32",  # what every export holds
        # The model reads none of these (only [PAD]: `pad_token_id`, from _HF_KEYS).
        "bos_token_id": cls_token_id, "eos_token_id": sep_token_id, "cls_token_id": cls_token_id,
        "sep_token_id": sep_token_id,
        **_HF_FIXED,
    }


def _rope_theta(hf: dict[str, Any], kind: str, old_key: str) -> Any:
    """A RoPE base from transformers 5's `rope_parameters` or the Hub's older `*_rope_theta`."""
    params = (hf.get("rope_parameters") or {}).get(kind) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"config.json rope_parameters.{kind}.rope_type={params['rope_type']!r} is not supported; "
                         f"only 'default' RoPE")
    return params.get("rope_theta", hf.get(old_key))


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """From a ModernBERT `config.json` (the Hub's, or transformers 5's); a missing required key
    raises KeyError, an unsupported variant or a wrong type ValueError."""
    for key, want in _HF_FIXED.items():
        if key in hf and hf[key] != want:
            raise ValueError(f"config.json {key}={hf[key]!r} is not supported; only {want!r}")
    if hf.get("embedding_dropout", 0.0) != hf.get("mlp_dropout", 0.0):
        raise ValueError(f"config.json embedding_dropout={hf.get('embedding_dropout')} differs from mlp_dropout="
                         f"{hf.get('mlp_dropout')}; model.hidden_dropout is both, so they must be equal")
    kwargs: dict[str, Any] = {"arch": "modernbert", "binary_head": False}
    for name, key in _HF_KEYS.items():  # ModelConfig checks the types
        if name in _HF_REQUIRED and key not in hf:
            raise KeyError(key)
        if hf.get(key) is not None:
            kwargs[name] = hf[key]
    for name, kind, old_key in (("global_rope_theta", "full_attention", "global_rope_theta"),
                                ("local_rope_theta", "sliding_attention", "local_rope_theta")):
        if (theta := _rope_theta(hf, kind, old_key)) is not None:
            kwargs[name] = float(theta)
    if hf.get("global_attn_every_n_layers") is not None:
        kwargs["global_attn_every_n_layers"] = hf["global_attn_every_n_layers"]
    cfg = ModelConfig(**kwargs)
    if hf.get("layer_types") is not None and list(hf["layer_types"]) != layer_types(cfg):
        raise ValueError(f"config.json layer_types={hf['layer_types']} is not global attention every "
                         f"{cfg.global_attn_every_n_layers} layers from layer 0, the only pattern supported")
    return cfg


def _layer_names(cfg: ModelConfig, i: int) -> dict[str, str]:
    """Our full-form name -> transformers' name, for layer i."""
    ours, theirs = f"layers.{i}.", f"model.layers.{i}."
    names = {"attn.qkv.weight": "attn.Wqkv.weight", "attn.out.weight": "attn.Wo.weight",
             "mlp_norm.weight": "mlp_norm.weight", "mlp.fc1.weight": "mlp.Wi.weight", "mlp.fc2.weight": "mlp.Wo.weight"}
    if i > 0:  # transformers' layer 0 has no attention LayerNorm (nn.Identity)
        names["attn_norm.weight"] = "attn_norm.weight"
    return {ours + a: theirs + b for a, b in names.items()}


def hf_names(cfg: ModelConfig) -> dict[str, str]:
    """Our full-form name -> `ModernBertForMaskedLM` state-dict name, for every tensor (the tied
    decoder weight, `decoder.weight`, is the word embedding's and has no entry)."""
    names = {"word_embeddings.weight": "model.embeddings.tok_embeddings.weight",
             "embedding_norm.weight": "model.embeddings.norm.weight",
             "final_norm.weight": "model.final_norm.weight", "mlm_dense.weight": "head.dense.weight",
             "mlm_norm.weight": "head.norm.weight", "mlm_bias": "decoder.bias"}
    for i in range(cfg.num_layers):
        names.update(_layer_names(cfg, i))
    return names


def hf_to_full(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`ModernBertForMaskedLM` tensors -> our full form (fp32)."""
    full = {}
    for ours, theirs in hf_names(cfg).items():
        if theirs not in hf:
            raise ValueError(f"Hugging Face checkpoint lacks tensor {theirs}; is it a ModernBertForMaskedLM "
                             f"with {cfg.num_layers} layers?")
        full[ours] = hf[theirs].float().contiguous()
    decoder = hf.get("decoder.weight")
    if decoder is not None and not torch.equal(decoder.float(), full["word_embeddings.weight"]):
        raise ValueError("Hugging Face checkpoint's decoder.weight differs from its word embeddings; untied MLM "
                         "decoders are not supported")
    return full


def full_to_hf(full: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full form -> `ModernBertForMaskedLM` names (the tied `decoder.weight` omitted, as
    transformers saves it)."""
    return {theirs: full[ours].contiguous().clone() for ours, theirs in hf_names(cfg).items()}


def load_hf_state_dict(model: torch.nn.Module, hf: dict[str, torch.Tensor]) -> None:
    """Load a `ModernBertForMaskedLM` state dict (whole tensors) into `model`, this rank's shards
    of it at the model's TP degree (no communication)."""
    model.load_state_dict(shard_state_dict(hf_to_full(hf, model.cfg), model))
