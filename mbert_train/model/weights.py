"""Weights in three forms and the maps between them.

- *sharded*: this rank's `model.state_dict()` (vocab padded for its TP degree).
- *full*: our parameter names, whole tensors, vocabulary trimmed to `cfg.vocab_size`; the same
  for every TP degree, so checkpoints move between degrees through it.
- *hf*: `transformers.MegatronBertForPreTraining` names and layout (Q, K, V separate).

On disk a model directory holds `model_config.json` and one `model_tp{r}-of-{N}.safetensors`
per TP rank: what `mbert-convert` writes and `trainer.init_from` reads (`load_shard_from_dir`,
each rank its own rows). Training checkpoints are not model directories
(`mbert_train.checkpoint`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mbert_train.arithmetic import padded_vocab_size
from mbert_train.model.config import ModelConfig
from mbert_train.model.factory import build_model
from mbert_train.parallel.layers import shard, sharding, unshard
from mbert_train.parallel.mappings import group_rank, group_size
from mbert_train.staging import process_umask

VOCAB_PARAMS = ("word_embeddings.weight", "mlm_bias")
MODEL_CONFIG = "model_config.json"


def shard_spec(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """name -> (partition dim, stride) for every sharded parameter (the same at every TP)."""
    return {n: (sh.dim, sh.stride) for n, p in model.named_parameters() if (sh := sharding(p)).sharded}


def template(cfg: ModelConfig) -> torch.nn.Module:
    """A TP=1 model on the meta device: names, shapes and partition attributes, no memory."""
    with torch.device("meta"):
        return build_model(cfg)


def full_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Shape of every tensor of the full form for `cfg` (vocabulary unpadded)."""
    shapes = {}
    for name, tensor in template(cfg).state_dict().items():
        shapes[name] = torch.Size((cfg.vocab_size, *tensor.shape[1:])) if name in VOCAB_PARAMS else tensor.shape
    return shapes


def pad_vocab(tensor: torch.Tensor, vocab_size: int, tp: int) -> torch.Tensor:
    """A tensor of `VOCAB_PARAMS` with `vocab_size` rows, padded with zero rows to
    `padded_vocab_size(vocab_size, tp)`."""
    pad = padded_vocab_size(vocab_size, tp) - vocab_size
    return torch.cat([tensor, tensor.new_zeros((pad, *tensor.shape[1:]))]) if pad else tensor


def shard_full(full: dict[str, torch.Tensor], cfg: ModelConfig, tp: int, rank: int) -> dict[str, torch.Tensor]:
    """TP rank `rank`'s tensors of a TP=`tp` model from the full form, with no process group:
    vocabulary rows padded with zeros to `padded_vocab_size(vocab, tp)`, then cut."""
    spec = shard_spec(template(cfg))
    out = {}
    for name, tensor in full.items():
        if name in VOCAB_PARAMS:
            if tensor.shape[0] != cfg.vocab_size:
                raise ValueError(f"checkpoint tensor {name} has {tensor.shape[0]} vocabulary rows but "
                                 f"model.vocab_size={cfg.vocab_size}; set model.vocab_size to the checkpoint's")
            tensor = pad_vocab(tensor, cfg.vocab_size, tp)
        if name in spec:
            dim, stride = spec[name]
            tensor = shard(tensor, dim, tp, rank, stride=stride)
        out[name] = tensor.contiguous()
    return out


def full_state_dict(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Gather the TP shards of `model` (or of `tensors` named like its parameters, e.g. their
    gradients) into the full form. A collective over the model's TP group."""
    group, cfg = model.group, model.cfg
    spec, out = shard_spec(model), {}
    tensors = model.state_dict() if tensors is None else tensors
    for name, tensor in tensors.items():
        tensor = tensor.detach()
        if name in spec and group_size(group) > 1:
            parts = [torch.empty_like(tensor) for _ in range(group_size(group))]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            dim, stride = spec[name]
            tensor = unshard(parts, dim, stride=stride)
        if name in VOCAB_PARAMS:
            tensor = tensor[: cfg.vocab_size]
        out[name] = tensor.cpu().clone()
    return out


def shard_state_dict(full: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's state dict for `model` from the full form, checked against the model."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(full))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors (first: {missing[0]}); it was saved from a "
                         f"different model (binary_head or num_layers differ?) - check model.* against it")
    tensors = shard_full({k: full[k] for k in expected}, model.cfg, group_size(model.group), group_rank(model.group))
    for name, target in expected.items():
        if tensors[name].shape != target.shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensors[name].shape)} but model.* gives "
                             f"{tuple(target.shape)}; make the model config match the checkpoint")
        tensors[name] = tensors[name].to(target.dtype)
    return tensors


def hf_to_full(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Hugging Face MegatronBertForPreTraining tensors -> our full form."""
    def take(key: str) -> torch.Tensor:
        if key not in hf:
            raise ValueError(f"Hugging Face checkpoint lacks tensor {key}; is it a MegatronBertForPreTraining?")
        return hf[key]

    full = {
        "word_embeddings.weight": take("bert.embeddings.word_embeddings.weight"),
        "position_embeddings.weight": take("bert.embeddings.position_embeddings.weight"),
        "token_type_embeddings.weight": take("bert.embeddings.token_type_embeddings.weight"),
    }
    for i in range(cfg.num_layers):
        src, dst = f"bert.encoder.layer.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            full[dst + f"attn_norm.{kind}"] = take(src + f"attention.ln.{kind}")
            full[dst + f"attn.qkv.{kind}"] = torch.cat(
                [take(src + f"attention.self.{p}.{kind}") for p in ("query", "key", "value")])
            full[dst + f"attn.out.{kind}"] = take(src + f"attention.output.dense.{kind}")
            full[dst + f"mlp_norm.{kind}"] = take(src + f"ln.{kind}")
            full[dst + f"mlp.fc1.{kind}"] = take(src + f"intermediate.dense.{kind}")
            full[dst + f"mlp.fc2.{kind}"] = take(src + f"output.dense.{kind}")
    for kind in ("weight", "bias"):
        full[f"final_norm.{kind}"] = take(f"bert.encoder.ln.{kind}")
        full[f"mlm_dense.{kind}"] = take(f"cls.predictions.transform.dense.{kind}")
        full[f"mlm_norm.{kind}"] = take(f"cls.predictions.transform.LayerNorm.{kind}")
        if cfg.binary_head:
            full[f"pooler.{kind}"] = take(f"bert.pooler.dense.{kind}")
            full[f"nsp.{kind}"] = take(f"cls.seq_relationship.{kind}")
    full["mlm_bias"] = take("cls.predictions.bias")
    return {k: v.float().contiguous() for k, v in full.items()}


def full_to_hf(full: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our full form -> Hugging Face names (tied decoder weight/bias omitted, as HF saves them)."""
    h = cfg.hidden_size
    hf = {
        "bert.embeddings.word_embeddings.weight": full["word_embeddings.weight"],
        "bert.embeddings.position_embeddings.weight": full["position_embeddings.weight"],
        "bert.embeddings.token_type_embeddings.weight": full["token_type_embeddings.weight"],
        "cls.predictions.bias": full["mlm_bias"],
    }
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"bert.encoder.layer.{i}."
        for kind in ("weight", "bias"):
            hf[dst + f"attention.ln.{kind}"] = full[src + f"attn_norm.{kind}"]
            for j, p in enumerate(("query", "key", "value")):
                hf[dst + f"attention.self.{p}.{kind}"] = full[src + f"attn.qkv.{kind}"][j * h:(j + 1) * h]
            hf[dst + f"attention.output.dense.{kind}"] = full[src + f"attn.out.{kind}"]
            hf[dst + f"ln.{kind}"] = full[src + f"mlp_norm.{kind}"]
            hf[dst + f"intermediate.dense.{kind}"] = full[src + f"mlp.fc1.{kind}"]
            hf[dst + f"output.dense.{kind}"] = full[src + f"mlp.fc2.{kind}"]
    for kind in ("weight", "bias"):
        hf[f"bert.encoder.ln.{kind}"] = full[f"final_norm.{kind}"]
        hf[f"cls.predictions.transform.dense.{kind}"] = full[f"mlm_dense.{kind}"]
        hf[f"cls.predictions.transform.LayerNorm.{kind}"] = full[f"mlm_norm.{kind}"]
        if cfg.binary_head:
            hf[f"bert.pooler.dense.{kind}"] = full[f"pooler.{kind}"]
            hf[f"cls.seq_relationship.{kind}"] = full[f"nsp.{kind}"]
    return {k: v.contiguous().clone() for k, v in hf.items()}


def shard_file(tp: int, rank: int) -> str:
    return f"model_tp{rank:02d}-of-{tp:02d}.safetensors"


def save_shard_tensors(directory: str | os.PathLike, tensors: dict[str, torch.Tensor], cfg: ModelConfig,
                       tp_rank: int, tp: int) -> list[Path]:
    """Write one TP rank's tensors (and, from TP rank 0, the model config) into `directory`;
    returns the files written."""
    directory = Path(directory)
    path = directory / shard_file(tp, tp_rank)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    os.chmod(path, 0o666 & ~process_umask())  # safetensors creates 0600 files; shared clusters need the umask's
    if tp_rank != 0:
        return [path]
    meta = {"model": cfg.to_dict(), "tensor_parallel": tp, "padded_vocab": padded_vocab_size(cfg.vocab_size, tp)}
    (directory / MODEL_CONFIG).write_text(json.dumps(meta, indent=2))
    return [path, directory / MODEL_CONFIG]


def read_model_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / MODEL_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {directory} is not an mbert-train model or checkpoint directory")
    try:
        meta = json.loads(path.read_text())
        ModelConfig(**meta["model"])
        int(meta["tensor_parallel"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} is corrupt or from another tool ({str(exc).splitlines()[0]}); "
                         f"use another checkpoint") from None
    return meta


def load_full_from_dir(directory: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Read every TP shard of a saved model and assemble the full form (any saved TP degree)."""
    directory = Path(directory)
    meta = read_model_meta(directory)
    cfg, tp = ModelConfig(**meta["model"]), meta["tensor_parallel"]
    shards = []
    for r in range(tp):
        path = directory / shard_file(tp, r)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the checkpoint at {directory} is incomplete")
        try:
            shards.append(load_file(str(path)))
        except Exception as exc:
            raise ValueError(f"{path} is truncated or corrupt ({str(exc).splitlines()[0]}); "
                             f"use another checkpoint") from None
    model = template(cfg)
    spec, expected = shard_spec(model), model.state_dict()
    full = {}
    for name, like in expected.items():
        if any(name not in s for s in shards):
            raise ValueError(f"{directory} lacks tensor {name} in some shard; the checkpoint is incomplete "
                             f"or from another model")
        if name in spec and tp > 1:
            tensor = unshard([s[name] for s in shards], *spec[name][:1], stride=spec[name][1])
        else:
            tensor = shards[0][name]
            for r in range(1, tp):  # replicated over TP: every shard holds the same copy
                if not torch.equal(shards[r][name], tensor):
                    raise ValueError(f"{directory}: {name} differs between {shard_file(tp, 0)} and {shard_file(tp, r)}, "
                                     f"but every TP shard holds the same copy of it; the shards come from different "
                                     f"models or steps")
        want = (padded_vocab_size(cfg.vocab_size, tp), *like.shape[1:]) if name in VOCAB_PARAMS else like.shape
        if tuple(tensor.shape) != tuple(want):
            raise ValueError(f"{directory}: {name} has shape {tuple(tensor.shape)} but its {MODEL_CONFIG} implies "
                             f"{tuple(want)}; the checkpoint is corrupt")
        full[name] = tensor[: cfg.vocab_size] if name in VOCAB_PARAMS else tensor
    return full, cfg


def _blocks(length: int, stride: int, tp: int, rank: int) -> list[tuple[int, int, int]]:
    """(local start, full start, length) of the `stride` blocks of a shard of `length` along its
    partition dim (`shard`): block k of rank r is rows [k*b*tp + r*b, +b) of the full dim."""
    b = length // stride
    return [(k * b, k * b * tp + rank * b, b) for k in range(stride)]


@torch.no_grad()
def load_shard_from_dir(directory: str | os.PathLike, model: torch.nn.Module) -> None:
    """Fill `model`'s parameters (its TP rank's shards) from a model directory of any TP degree,
    reading only the rows of the saved shards that overlap this rank's (safetensors slices);
    vocabulary rows beyond `vocab_size` are zeroed (padding). `trainer.init_from`'s reader."""
    directory = Path(directory)
    meta = read_model_meta(directory)
    cfg, saved_tp = ModelConfig(**meta["model"]), int(meta["tensor_parallel"])
    tp, rank = group_size(model.group), group_rank(model.group)
    paths = [directory / shard_file(saved_tp, r) for r in range(saved_tp)]
    try:
        files = [safe_open(str(path), "pt") for path in paths]
        names = [set(f.keys()) for f in files]
    except (SafetensorError, OSError) as exc:
        missing = next((p for p in paths if not p.is_file()), None)
        if missing is not None:
            raise FileNotFoundError(f"{missing} is missing: the checkpoint at {directory} is incomplete") from None
        raise ValueError(f"{directory}: a weight file is truncated or corrupt ({str(exc).splitlines()[0]}); "
                         f"use another checkpoint") from None
    for name, p in model.named_parameters():
        if any(name not in held for held in names):
            raise ValueError(f"{directory} lacks tensor {name} in some shard; the checkpoint is incomplete or "
                             f"from another model")
        sh = sharding(p)
        if not sh.sharded:
            saved = files[0].get_tensor(name)
            if saved.shape != p.shape:
                raise ValueError(f"{directory}: {name} has shape {tuple(saved.shape)}, this model needs "
                                 f"{tuple(p.shape)}; make the model config match the checkpoint")
            p.copy_(saved)
            continue
        full_len = cfg.vocab_size if name in VOCAB_PARAMS else p.shape[sh.dim] * tp
        p.zero_()  # vocabulary padding stays zero
        for r, f in enumerate(files):
            piece = f.get_slice(name)
            saved_len = piece.get_shape()[sh.dim]
            for lo, g, n in _blocks(p.shape[sh.dim], sh.stride, tp, rank):
                for slo, sg, sn in _blocks(saved_len, sh.stride, saved_tp, r):
                    a, b = max(g, sg), min(g + n, sg + sn, full_len)
                    if a < b:
                        index = [slice(None)] * p.dim()
                        index[sh.dim] = slice(slo + a - sg, slo + b - sg)
                        p.narrow(sh.dim, lo + a - g, b - a).copy_(piece[tuple(index)])

