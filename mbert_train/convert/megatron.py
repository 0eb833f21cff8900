"""Megatron-LM BERT checkpoints (the legacy `torch` format) <-> mbert-train model directories.

    mbert-convert from-megatron MEGATRON_DIR OUT_DIR --tp N   # any source TP -> model_config.json + N shards
    mbert-convert to-megatron CKPT_DIR OUT_DIR --tp N         # any model/step/run dir -> release/mp_rank_XX/...

Layout read (Megatron-LM `megatron/training/checkpointing.py`): DIR/latest_checkpointed_iteration.txt
names an iteration (-> DIR/iter_%07d) or `release` (-> DIR/release); there one
`mp_rank_XX/model_optim_rng.pt` per TP rank holds {'model': {'language_model': {'embedding',
'encoder' (older: 'transformer'), 'pooler'}, 'lm_head', 'binary_head'}, 'checkpoint_version',
'args', ...}. An iteration directory, an `mp_rank_XX` directory or a single `model_optim_rng.pt`
(NVIDIA's published MegatronBERT 345M is `release/mp_rank_00/model_optim_rng.pt` without 'args')
may be passed too.

Fused QKV rows of one TP rank (np heads on that rank, hn = head size), per checkpoint_version as
Megatron's `fix_query_key_value_ordering` / `_transpose_first_dim` define them:
    0:        [3, np, hn]   (Q of all heads, then K, then V)
    1.0:      [np, hn, 3]
    2.0, 3.0: [np, 3, hn]   (3.0 only renamed args.model_parallel_size)
Our full form is [3, heads, hn] over all heads (`[Q; K; V]`). The vocabulary is padded to a
multiple of make_vocab_size_divisible_by (128) x TP, contiguous rows per rank; Megatron's
LayerNorm epsilon defaults to 1e-5.

Unpickling is restricted: the globals a file pickles are listed without executing anything
(`torch.serialization.get_unsafe_globals_in_checkpoint`) and must be on `ALLOWED_GLOBALS`
(argparse.Namespace and numpy's array/dtype reconstructors, for the RNG states) or be a
`megatron.*` name (enums in args), which loads as an inert placeholder and never imports
Megatron; the file is then read with `torch.load(weights_only=True)` under that allow-list.
Anything else is refused with one line naming the file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch

from mbert_train.arithmetic import VOCAB_MULTIPLE, padded_vocab_size
from mbert_train.convert.common import (MEGATRON_RELEASE, MEGATRON_TRACKER, WEIGHT_DTYPES, ConvertError,
                                        check_out_dir, check_tensors, check_tp, load_model_dir, resolve_model_dir,
                                        staged_output, write_marker, write_model_dir)
from mbert_train.errors import first_line
from mbert_train.model.config import ModelConfig
from mbert_train.model.weights import VOCAB_PARAMS, full_shapes, pad_vocab

SHARD_FILE = "model_optim_rng.pt"
VERSIONS = (0, 1.0, 2.0, 3.0)
WRITE_VERSION = 3.0
MEGATRON_LN_EPS = 1e-5  # Megatron-LM's --norm-epsilon (older: --layernorm-epsilon) default
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})$")
_PP_RANK_DIR = re.compile(r"^mp_rank_\d{2}_\d{3}$")
_ITER_DIR = re.compile(r"^iter_\d{7}$")


# ---- safe loading ---------------------------------------------------------------------------

def _numpy_globals() -> list[tuple[object, str]]:
    """numpy's reconstructors under the names numpy 1.x and 2.x pickle them by (np.random
    state tuples in 'np_rng_state'); they build arrays and dtypes, nothing else."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    out = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out += [(multiarray._reconstruct, f"{module}._reconstruct"), (multiarray.scalar, f"{module}.scalar")]
    out += [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    out += [(type(np.dtype(t)), f"numpy.dtypes.{type(np.dtype(t)).__name__}")
            for t in (np.uint32, np.int64, np.float64, np.float32, np.bool_)]
    return out


ALLOWED_GLOBALS: list[tuple[object, str]] = [(argparse.Namespace, "argparse.Namespace"), *_numpy_globals()]


class MegatronPlaceholder:
    """Stands in for a `megatron.*` class pickled inside args (e.g. an enum such as AttnBackend):
    keeps its constructor arguments and state, runs no Megatron code."""

    def __init__(self, *args):
        self.args = args

    def __repr__(self) -> str:
        return f"{type(self).__qualname__}{self.args!r}"


def _placeholder(full_name: str) -> tuple[type, str]:
    module, _, name = full_name.rpartition(".")
    return type(name, (MegatronPlaceholder,), {"__module__": module, "__qualname__": name}), full_name


def _refused(path: Path, name: str) -> ConvertError:
    return ConvertError(f"{path} pickles {name}, which is not on the allow-list (argparse.Namespace, numpy "
                        f"arrays, megatron enums); refusing to unpickle it: re-save the model from a trusted source")


def load_megatron_file(path: Path) -> dict:
    """One `model_optim_rng.pt`, refusing any pickled global that is not on the allow-list."""
    if not path.is_file():
        raise ConvertError(f"{path} is missing; copy the complete Megatron checkpoint")
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        found = []  # the pre-1.6 (non-zip) format: torch's weights_only unpickler below still refuses
    allowed = {name for _, name in ALLOWED_GLOBALS}
    refused = sorted(g for g in found if g not in allowed and not g.startswith("megatron."))
    if refused:
        raise _refused(path, refused[0])
    extra = [_placeholder(g) for g in found if g.startswith("megatron.")]
    try:
        with torch.serialization.safe_globals([*ALLOWED_GLOBALS, *extra]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        name = re.search(r"GLOBAL (\S+)", str(exc))
        if name:
            raise _refused(path, name.group(1)) from None
        raise ConvertError(f"{path} is truncated or not a torch checkpoint ({first_line(exc)}); copy it "
                           f"again") from None
    if not isinstance(state, dict):
        raise ConvertError(f"{path} does not hold a Megatron checkpoint dictionary")
    return state


# ---- locating the shards --------------------------------------------------------------------

def find_shards(source: Path) -> list[Path]:
    """The `model_optim_rng.pt` of every TP rank, in rank order."""
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise ConvertError(f"{source} does not exist; pass a Megatron checkpoint directory (with "
                           f"{MEGATRON_TRACKER}) or a {SHARD_FILE}")
    if (source / SHARD_FILE).is_file():
        return [source / SHARD_FILE]
    tracker = source / MEGATRON_TRACKER
    if tracker.is_file():
        text = tracker.read_text(errors="replace").strip()
        if text == MEGATRON_RELEASE:
            source = source / MEGATRON_RELEASE
        elif text.isdigit():
            source = source / f"iter_{int(text):07d}"
        else:
            raise ConvertError(f"{tracker} holds {text[:40]!r}, neither an iteration number nor 'release'; "
                               f"fix it or pass the iter_XXXXXXX directory")
        if not source.is_dir():
            raise ConvertError(f"{tracker} names {source.name}, but {source} does not exist; copy that "
                               f"iteration or fix {MEGATRON_TRACKER}")
    else:  # no tracker (e.g. NVIDIA's 345M zip holds only release/): a single release or iteration dir
        found = sorted(p.name for p in source.iterdir()
                       if p.is_dir() and (p.name == MEGATRON_RELEASE or _ITER_DIR.match(p.name)))
        if len(found) > 1:
            raise ConvertError(f"{source} holds {len(found)} checkpoints ({', '.join(found[:3])}, ...) and no "
                               f"{MEGATRON_TRACKER}; pass one of them")
        source = source / found[0] if found else source
    names = sorted(p.name for p in source.iterdir() if p.is_dir())
    if any(_PP_RANK_DIR.match(n) for n in names):
        raise ConvertError(f"{source} holds a pipeline-parallel checkpoint (mp_rank_XX_YYY); merge it to "
                           f"pipeline size 1 with Megatron's tools/checkpoint first")
    ranks = sorted(int(m.group(1)) for m in map(_RANK_DIR.match, names) if m)
    if not ranks:
        hint = (" (a distributed torch_dist checkpoint: save it with --ckpt-format torch)"
                if (source / ".metadata").exists() or (source / "common.pt").exists() else "")
        raise ConvertError(f"{source} holds no mp_rank_XX directories{hint}; pass a Megatron checkpoint "
                           f"directory (with {MEGATRON_TRACKER}), an iteration directory or a {SHARD_FILE}")
    if ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise ConvertError(f"{source} has mismatched shards: mp_rank_{missing[0]:02d} is missing among "
                           f"{len(ranks)} TP ranks; copy the complete checkpoint")
    return [source / f"mp_rank_{r:02d}" / SHARD_FILE for r in ranks]


# ---- reading one shard ----------------------------------------------------------------------

def _tensor_dict(value, path: Path, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(value, dict) or not all(isinstance(v, torch.Tensor) for v in value.values()):
        raise ConvertError(f"{path}: {where} is not a dictionary of tensors; not a legacy Megatron BERT "
                           f"checkpoint")
    return value


def _canonical_layer_key(key: str) -> str:
    """Both namings Megatron has saved -> 'layernorm' / 'self_attention' (the ones it still loads)."""
    key = key.replace(".attention.", ".self_attention.")
    return re.sub(r"(input|post_attention|final)_norm\.", r"\1_layernorm.", key)


def flatten_shard(state: dict, path: Path) -> dict[str, torch.Tensor]:
    """{'model': {'language_model': ..., 'lm_head': ..., 'binary_head': ...}} -> flat names
    'embedding.word_embeddings.weight', 'encoder.layers.0.self_attention.query_key_value.weight',
    'pooler.dense.weight', 'lm_head.layernorm.weight', 'binary_head.weight', ..."""
    model = state.get("model")
    if model is None:
        extra = " (virtual pipeline stages: merge them first)" if "model0" in state else ""
        raise ConvertError(f"{path} has no 'model' entry{extra}; it is not a Megatron model checkpoint")
    if not isinstance(model, dict) or not isinstance(model.get("language_model"), dict):
        raise ConvertError(f"{path}: 'model' has no 'language_model'; not a legacy Megatron BERT checkpoint "
                           f"(megatron-core BERT state dicts are not supported)")
    lm, flat = model["language_model"], {}
    embedding = lm.get("embedding")
    if not isinstance(embedding, dict):
        raise ConvertError(f"{path}: 'language_model' has no 'embedding'; not a legacy Megatron BERT checkpoint")
    for name in ("word_embeddings", "position_embeddings", "tokentype_embeddings"):
        if name not in embedding:
            raise ConvertError(f"{path} lacks embedding/{name}; only BERT with learned absolute positions and "
                               f"token types is supported")
        flat[f"embedding.{name}.weight"] = _tensor_dict(embedding[name], path, f"embedding/{name}")["weight"]
    encoder = lm.get("encoder", lm.get("transformer"))
    for key, value in _tensor_dict(encoder, path, "language_model/encoder").items():
        flat[f"encoder.{_canonical_layer_key(key)}"] = value
    if "pooler" in lm:
        flat.update({f"pooler.{k}": v for k, v in _tensor_dict(lm["pooler"], path, "pooler").items()})
    if "lm_head" not in model:
        raise ConvertError(f"{path} has no 'lm_head'; a checkpoint without the MLM head cannot be converted")
    flat.update({f"lm_head.{re.sub(r'^norm[.]', 'layernorm.', k)}": v  # newer Megatron renamed it 'norm'
                 for k, v in _tensor_dict(model["lm_head"], path, "lm_head").items()})
    if "binary_head" in model:
        flat.update({f"binary_head.{k}": v for k, v in _tensor_dict(model["binary_head"], path,
                                                                     "binary_head").items()})
    return flat


# ---- Megatron names <-> ours ----------------------------------------------------------------

def name_map(num_layers: int, *, binary_head: bool) -> dict[str, tuple[str, int | None]]:
    """Megatron flat name -> (our full-form name, TP partition dim or None if replicated).
    The fused QKV (partition dim 0, but reordered per version) is marked with dim -1."""
    names = {"embedding.word_embeddings.weight": ("word_embeddings.weight", 0),
             "embedding.position_embeddings.weight": ("position_embeddings.weight", None),
             "embedding.tokentype_embeddings.weight": ("token_type_embeddings.weight", None)}
    for i in range(num_layers):
        src, dst = f"encoder.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            names[src + f"input_layernorm.{kind}"] = (dst + f"attn_norm.{kind}", None)
            names[src + f"self_attention.query_key_value.{kind}"] = (dst + f"attn.qkv.{kind}", -1)
            names[src + f"self_attention.dense.{kind}"] = (dst + f"attn.out.{kind}", 1 if kind == "weight" else None)
            names[src + f"post_attention_layernorm.{kind}"] = (dst + f"mlp_norm.{kind}", None)
            names[src + f"mlp.dense_h_to_4h.{kind}"] = (dst + f"mlp.fc1.{kind}", 0)
            names[src + f"mlp.dense_4h_to_h.{kind}"] = (dst + f"mlp.fc2.{kind}", 1 if kind == "weight" else None)
    for kind in ("weight", "bias"):
        names[f"encoder.final_layernorm.{kind}"] = (f"final_norm.{kind}", None)
        names[f"lm_head.dense.{kind}"] = (f"mlm_dense.{kind}", None)
        names[f"lm_head.layernorm.{kind}"] = (f"mlm_norm.{kind}", None)
        if binary_head:
            names[f"pooler.dense.{kind}"] = (f"pooler.{kind}", None)
            names[f"binary_head.{kind}"] = (f"nsp.{kind}", None)
    names["lm_head.bias"] = ("mlm_bias", 0)
    return names


def qkv_to_blocks(t: torch.Tensor, version: float, heads: int) -> torch.Tensor:
    """One rank's fused QKV rows in `version`'s order -> (3, heads * hn, ...)."""
    rest, hn = t.shape[1:], t.shape[0] // (3 * heads)
    if version == 0:
        x = t.reshape(3, heads, hn, *rest)
    elif version == 1.0:
        x = t.reshape(heads, hn, 3, *rest).permute(2, 0, 1, *range(3, 3 + len(rest)))
    else:
        x = t.reshape(heads, 3, hn, *rest).transpose(0, 1)
    return x.reshape(3, heads * hn, *rest)


def blocks_to_qkv(blocks: torch.Tensor, heads: int) -> torch.Tensor:
    """(3, heads * hn, ...) -> one rank's fused QKV rows in version 2.0/3.0 order [np, 3, hn]."""
    rest = blocks.shape[2:]
    x = blocks.reshape(3, heads, -1, *rest).transpose(0, 1)
    return x.reshape(-1, *rest).contiguous()


# ---- from-megatron --------------------------------------------------------------------------

def _arg(args, *names, default=None):
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            return value
    return default


def _check_args(args, path: Path) -> None:
    """Architecture switches our model does not have; each would convert silently into another model."""
    unsupported = [("position_embedding_type", lambda v: v not in (None, "learned_absolute")),
                   ("add_position_embedding", lambda v: v is False),
                   ("openai_gelu", bool), ("swiglu", bool), ("squared_relu", bool), ("group_query_attention", bool),
                   ("apply_residual_connection_post_layernorm", bool),
                   ("untie_embeddings_and_output_weights", bool),
                   ("normalization", lambda v: v not in (None, "LayerNorm")),
                   ("add_bias_linear", lambda v: v is False)]
    for name, bad in unsupported:
        value = getattr(args, name, None)
        if value is not None and bad(value):
            raise ConvertError(f"{path} was trained with args.{name}={value!r}, which mbert-train's model does "
                               f"not have (pre-LN BERT, exact GELU, LayerNorm, learned positions, biases)")


def _merge(shards: list[dict[str, torch.Tensor]], names, version, heads: int, paths: list[Path]
           ) -> dict[str, torch.Tensor]:
    tp, full = len(shards), {}
    for src, (dst, dim) in names.items():
        parts = [s[src] for s in shards]
        if any(p.dtype not in WEIGHT_DTYPES for p in parts):
            raise ConvertError(f"{paths[0]}: {src} has dtype {parts[0].dtype}, not a weight dtype (float16, "
                               f"bfloat16, float32); the file is not a model's weights")
        try:
            if dim == -1:
                full[dst] = torch.cat([qkv_to_blocks(p, version, heads // tp) for p in parts], dim=1).flatten(0, 1)
            elif dim is None or tp == 1:
                if any(p.shape != parts[0].shape for p in parts):
                    raise RuntimeError(f"shapes {[tuple(p.shape) for p in parts]}")
                for path, part in zip(paths[1:], parts[1:]):
                    if not torch.equal(part, parts[0]):  # replicated over TP: one tensor in every shard
                        raise ConvertError(f"{src} differs between {paths[0]} and {path}, but every TP shard holds "
                                           f"the same copy of it; the shards come from different models or steps")
                full[dst] = parts[0]
            else:
                full[dst] = torch.cat(parts, dim=dim)
        except RuntimeError as exc:
            raise ConvertError(f"the TP shards {paths[0].parent.parent} do not fit together at {src} "
                               f"({first_line(exc)}); they come from different models") from None
    return {k: v.float().contiguous() for k, v in full.items()}


def read_megatron(source: str | os.PathLike, *, num_heads: int | None = None, vocab_size: int | None = None
                  ) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(full form, config) of a legacy Megatron-LM BERT checkpoint at any TP degree."""
    paths = find_shards(Path(source))
    states = [load_megatron_file(p) for p in paths]
    first, path = states[0], paths[0]
    version = first.get("checkpoint_version", 0)
    if isinstance(version, bool) or not isinstance(version, (int, float)) or version not in VERSIONS:
        raise ConvertError(f"{path}: checkpoint_version={version!r} is unknown (supported: 0, 1.0, 2.0, 3.0); "
                           f"re-save it with a Megatron-LM that writes one of them")
    for p, s in zip(paths[1:], states[1:]):
        if s.get("checkpoint_version", 0) != version:
            raise ConvertError(f"{p} has checkpoint_version {s.get('checkpoint_version', 0)!r} but {path} has "
                               f"{version!r}; the shards are mismatched")
    args = first.get("args")
    tp = len(paths)
    if args is not None:
        _check_args(args, path)
        saved_tp = _arg(args, "tensor_model_parallel_size", "model_parallel_size", default=tp)
        if saved_tp != tp:
            raise ConvertError(f"{path}: args say tensor-parallel size {saved_tp} but {tp} shard(s) were found; "
                               f"pass the checkpoint directory holding all mp_rank_XX shards")
        if _arg(args, "pipeline_model_parallel_size", default=1) != 1:
            raise ConvertError(f"{path} is one stage of a pipeline-parallel checkpoint; merge it to pipeline size "
                               f"1 with Megatron's tools/checkpoint first")
    flats = [flatten_shard(s, p) for s, p in zip(states, paths)]
    layers = {int(m.group(1)) for m in map(re.compile(r"^encoder\.layers\.(\d+)\.").match, flats[0]) if m}
    if layers != set(range(len(layers))) or not layers:
        raise ConvertError(f"{path}: the encoder holds layers {sorted(layers)[:5]}, not 0..L-1; not a complete "
                           f"Megatron BERT checkpoint")
    binary_head = "binary_head.weight" in flats[0]
    if binary_head and "pooler.dense.weight" not in flats[0]:
        raise ConvertError(f"{path} has a binary_head but no pooler; not a Megatron BERT checkpoint")
    names = name_map(len(layers), binary_head=binary_head)
    for p, flat in zip(paths, flats):
        missing, extra = sorted(set(names) - set(flat)), sorted(set(flat) - set(names))
        if missing or extra:
            what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which a Megatron BERT does not"
            raise ConvertError(f"{p} {what}; not a legacy Megatron BERT checkpoint of the supported kind")
    hidden = flats[0]["embedding.word_embeddings.weight"].shape[1]
    heads = _num_heads(args, num_heads, hidden, path)
    if heads % tp:
        raise ConvertError(f"{path}: {heads} attention heads cannot be split over the {tp} TP shards; pass the "
                           f"right --num-heads")
    full = _merge(flats, names, version, heads, paths)
    cfg = _config(full, args, heads, vocab_size, len(layers), binary_head, path)
    for name in VOCAB_PARAMS:
        full[name] = full[name][: cfg.vocab_size]
    check_tensors(full, full_shapes(cfg), path, path, cfg)
    return full, cfg


def _num_heads(args, num_heads: int | None, hidden: int, path: Path) -> int:
    saved = _arg(args, "num_attention_heads")
    if num_heads is not None and saved is not None and num_heads != saved:
        raise ConvertError(f"--num-heads {num_heads} contradicts {path}: args.num_attention_heads={saved}; drop "
                           f"--num-heads")
    heads = num_heads or saved
    if heads is None:
        heads = max(hidden // 64, 1)
        print(f"mbert-convert: warning: {path} stores no args; assuming num_heads={heads} (hidden_size/64, as in "
              f"NVIDIA's MegatronBERT 345M); pass --num-heads if that is wrong", file=sys.stderr)
    if not isinstance(heads, int) or heads < 1 or hidden % heads:
        raise ConvertError(f"num_heads={heads!r} does not divide hidden_size={hidden} of {path}; pass the right "
                           f"--num-heads")
    kv = _arg(args, "kv_channels")
    if kv is not None and kv != hidden // heads:
        raise ConvertError(f"{path}: args.kv_channels={kv} is not hidden_size/num_heads={hidden // heads}; "
                           f"mbert-train's attention needs that")
    return heads


def _config(full, args, heads, vocab_size, num_layers, binary_head, path: Path) -> ModelConfig:
    padded, hidden = full["word_embeddings.weight"].shape
    saved_padded = _arg(args, "padded_vocab_size")
    if saved_padded is not None and saved_padded != padded:
        raise ConvertError(f"{path}: args.padded_vocab_size={saved_padded} but the word embeddings have {padded} "
                           f"rows; the shards are mismatched")
    saved = _arg(args, "vocab_size")  # the size before padding, where the checkpoint records it
    recorded = saved if isinstance(saved, int) and 0 < saved <= padded else None
    if vocab_size is None:
        vocab_size = recorded or padded
    if not 0 < vocab_size <= padded:
        raise ConvertError(f"--vocab-size {vocab_size} must be in 1..{padded} (the checkpoint's padded "
                           f"vocabulary)")
    if recorded is not None and vocab_size < recorded:  # allowed (a smaller tokenizer), never silent
        print(f"mbert-convert: note: --vocab-size {vocab_size} keeps the first {vocab_size} of the "
              f"{recorded} vocabulary rows the checkpoint records (args.vocab_size); the other "
              f"{recorded - vocab_size} are dropped", file=sys.stderr, flush=True)
    for name, value in (("hidden_size", hidden), ("num_layers", num_layers),
                        ("ffn_hidden_size", full["layers.0.mlp.fc1.weight"].shape[0]),
                        ("max_position_embeddings", full["position_embeddings.weight"].shape[0])):
        saved = _arg(args, name)
        if saved is not None and saved != value:
            raise ConvertError(f"{path}: args.{name}={saved} but the weights give {value}; the checkpoint is "
                               f"inconsistent")
    try:
        return ModelConfig(
            vocab_size=vocab_size, hidden_size=hidden, num_layers=num_layers, num_heads=heads,
            intermediate_size=full["layers.0.mlp.fc1.weight"].shape[0],
            max_position_embeddings=full["position_embeddings.weight"].shape[0],
            type_vocab_size=full["token_type_embeddings.weight"].shape[0],
            layer_norm_eps=float(_arg(args, "norm_epsilon", "layernorm_epsilon", default=MEGATRON_LN_EPS)),
            hidden_dropout=float(_arg(args, "hidden_dropout", default=0.1)),
            attention_dropout=float(_arg(args, "attention_dropout", default=0.1)),
            initializer_range=float(_arg(args, "init_method_std", default=0.02)), binary_head=binary_head)
    except (ValueError, TypeError) as exc:
        raise ConvertError(f"{path}: {first_line(exc)}") from None


def from_megatron(source: str | os.PathLike, out_dir: str | os.PathLike, tp: int, *, num_heads: int | None = None,
                  vocab_size: int | None = None, overwrite: bool = False) -> tuple[Path, ModelConfig]:
    source, out_dir = Path(source), Path(out_dir)
    if tp < 1:
        raise ConvertError(f"--tp {tp} must be >= 1 (the tensor-parallel degree to shard for)")
    check_out_dir(out_dir, overwrite=overwrite, inputs=(source,))
    full, cfg = read_megatron(source, num_heads=num_heads, vocab_size=vocab_size)
    check_tp(cfg, tp, source)
    return write_model_dir(full, cfg, out_dir, tp, overwrite=overwrite), cfg


# ---- to-megatron ----------------------------------------------------------------------------

def megatron_args(cfg: ModelConfig, tp: int, tokenizer_type: str) -> argparse.Namespace:
    """The args Megatron-LM compares on load (`check_checkpoint_args`) and converters read."""
    return argparse.Namespace(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_heads, kv_channels=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, seq_length=cfg.max_position_embeddings,
        vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab_size(cfg.vocab_size, tp),
        make_vocab_size_divisible_by=VOCAB_MULTIPLE, tokenizer_type=tokenizer_type,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, num_tokentypes=cfg.type_vocab_size,
        layernorm_epsilon=cfg.layer_norm_eps, norm_epsilon=cfg.layer_norm_eps, hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout, init_method_std=cfg.initializer_range,
        bert_binary_head=cfg.binary_head, add_position_embedding=True, position_embedding_type="learned_absolute",
        add_bias_linear=True, openai_gelu=False, swiglu=False, apply_residual_connection_post_layernorm=False,
        untie_embeddings_and_output_weights=False, consumed_train_samples=0, consumed_valid_samples=0)


def megatron_shard(full: dict[str, torch.Tensor], cfg: ModelConfig, tp: int, rank: int, dtype: torch.dtype) -> dict:
    """TP rank `rank`'s {'model': ...} in checkpoint_version 3.0 layout and Megatron's key order
    (layers first, then final_layernorm; QKV weight before bias)."""
    flat = {}
    for src, (dst, dim) in name_map(cfg.num_layers, binary_head=cfg.binary_head).items():
        tensor = pad_vocab(full[dst], cfg.vocab_size, tp) if dst in VOCAB_PARAMS else full[dst]
        if dim == -1:
            blocks = tensor.reshape(3, cfg.hidden_size, *tensor.shape[1:]).chunk(tp, dim=1)[rank]
            tensor = blocks_to_qkv(blocks, cfg.num_heads // tp)
        elif dim is not None:
            tensor = tensor.chunk(tp, dim=dim)[rank]
        flat[src] = tensor.to(dtype).contiguous().clone()

    def group(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}

    embedding = {name: {"weight": flat[f"embedding.{name}.weight"]}
                 for name in ("word_embeddings", "position_embeddings", "tokentype_embeddings")}
    language_model = {"embedding": embedding, "encoder": group("encoder.")}
    model = {"language_model": language_model, "lm_head": group("lm_head.")}
    if cfg.binary_head:
        language_model["pooler"] = group("pooler.")
        model["binary_head"] = group("binary_head.")
    return model


def to_megatron(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int, *, dtype: str = "float32",
                tokenizer_type: str = "BertWordPieceLowerCase", overwrite: bool = False) -> Path:
    """Write OUT_DIR/latest_checkpointed_iteration.txt ('release') and
    OUT_DIR/release/mp_rank_XX/model_optim_rng.pt, loadable by Megatron-LM's legacy BERT."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    if tp < 1:
        raise ConvertError(f"--tp {tp} must be >= 1 (the tensor-parallel degree to shard for)")
    inputs = (ckpt_dir,) if not ckpt_dir.is_dir() else (ckpt_dir, resolve_model_dir(ckpt_dir))
    check_out_dir(out_dir, overwrite=overwrite, inputs=inputs)
    full, cfg = load_model_dir(inputs[-1])
    if cfg.arch != "megatron_bert":
        raise ConvertError(f"{inputs[-1]} holds a model.arch={cfg.arch} model, which Megatron-LM's BERT is not; "
                           f"export it with mbert-convert to-hf instead")
    check_tp(cfg, tp, inputs[-1])
    args = megatron_args(cfg, tp, tokenizer_type)
    with staged_output(out_dir, overwrite=overwrite) as staging:
        for rank in range(tp):
            shard_dir = staging / MEGATRON_RELEASE / f"mp_rank_{rank:02d}"
            shard_dir.mkdir(parents=True)
            state = {"model": megatron_shard(full, cfg, tp, rank, DTYPES[dtype]), "checkpoint_version": WRITE_VERSION,
                     "args": args, "iteration": 0}
            torch.save(state, shard_dir / SHARD_FILE)
        (staging / MEGATRON_TRACKER).write_text(MEGATRON_RELEASE + "\n")
        write_marker(staging, "megatron")
    return out_dir
