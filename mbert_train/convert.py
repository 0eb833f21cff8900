"""mbert-convert: Hugging Face MegatronBERT directories <-> mbert-train model directories.

    mbert-convert from-hf HF_DIR OUT_DIR --tp N    # config.json + weights -> model_config.json + N shards
    mbert-convert to-hf CKPT_DIR OUT_DIR           # any model/step/run dir, any TP -> config.json + model.safetensors

Both go through the *full* form of `mbert_train.model.weights`, which is the same at every TP
degree. Every input is checked (files, JSON, tensor names and shapes against the config, TP
divisibility) before anything is written; errors are one line naming the file or setting and
the fix. Output is built in a hidden temporary directory beside OUT_DIR and renamed into
place at the end, so an interrupted conversion never leaves a half-written OUT_DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mbert_train.checkpoint import CHECKPOINTS_SUBDIR, LATEST_FILE
from mbert_train.model.config import ModelConfig
from mbert_train.model.weights import (MODEL_CONFIG, VOCAB_PARAMS, full_to_hf, hf_to_full, load_full_from_dir,
                                       process_umask, save_shard_tensors, shard_full, template)
from mbert_train.parallel.layout import ParallelDims

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
# Searched in this order; the index files list the shards of a sharded `save_pretrained`.
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# HF ties the MLM decoder to the word embeddings and the decoder bias to `cls.predictions.bias`;
# `torch.save(state_dict())` files still carry the tied copies, which must equal their source.
HF_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
           "cls.predictions.decoder.bias": "cls.predictions.bias"}
# A buffer that transformers 4.x saved; it holds no weights.
HF_BUFFERS = ("bert.embeddings.position_ids",)
HF_MLM_ONLY = "MegatronBertForMaskedLM"


class ConvertError(ValueError):
    """A bad input or output path; the message is one line naming the file or setting and the fix."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def full_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Shape of every tensor of the full form for `cfg` (vocabulary unpadded)."""
    shapes = {}
    for name, tensor in template(cfg).state_dict().items():
        shapes[name] = torch.Size((cfg.vocab_size, *tensor.shape[1:])) if name in VOCAB_PARAMS else tensor.shape
    return shapes


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: Path,
                   config: Path, cfg: ModelConfig) -> None:
    """Same names, same shapes; the first difference becomes a one-line error."""
    dims = (f"vocab_size={cfg.vocab_size}, hidden_size={cfg.hidden_size}, num_layers={cfg.num_layers}, "
            f"intermediate_size={cfg.intermediate_size}")
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ConvertError(f"{source} lacks {len(missing)} tensors that {config} ({dims}) requires (first: "
                           f"{missing[0]}); the weights belong to another model or config")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ConvertError(f"{source} has {len(extra)} tensors {config} does not describe (first: {extra[0]}); "
                           f"the weights belong to another model or config")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise ConvertError(f"{source}: {name} has shape {tuple(tensors[name].shape)} but {config} ({dims}) "
                               f"implies {tuple(shape)}; fix the config or use the matching weights")


def _check_tp(cfg: ModelConfig, tp: int, config: Path) -> None:
    try:
        ParallelDims(world_size=tp, tensor_parallel=tp).check_model(cfg)
    except ValueError as exc:
        raise ConvertError(f"--tp {tp} does not fit {config}: {_first_line(exc)}") from None


def read_hf_config(hf_dir: Path) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face MegatronBERT directory, with one-line errors."""
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir} does not exist or is not a directory; pass a Hugging Face model directory")
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise ConvertError(f"{path} not found: {hf_dir} is not a Hugging Face model directory "
                           f"(write one with save_pretrained)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path} is not valid JSON ({_first_line(exc)}); re-save it with save_pretrained") from None
    if not isinstance(hf, dict):
        raise ConvertError(f"{path} does not hold a JSON object; re-save it with save_pretrained")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConvertError(f"{path}: position_embedding_type={hf['position_embedding_type']!r} is not supported; "
                           f"only 'absolute' position embeddings")
    if not hf.get("tie_word_embeddings", True):
        raise ConvertError(f"{path}: tie_word_embeddings=false is not supported; the MLM decoder must be the "
                           f"word embeddings")
    try:
        cfg = ModelConfig.from_hf_dict(hf)
    except KeyError as exc:
        raise ConvertError(f"{path} lacks {exc}; it is not a MegatronBERT config.json") from None
    except (ValueError, TypeError) as exc:
        raise ConvertError(f"{path}: {_first_line(exc)}") from None
    if HF_MLM_ONLY in hf.get("architectures", []):
        cfg = dataclasses.replace(cfg, binary_head=False)
    return cfg


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConvertError(f"{path} is missing; copy the complete model directory")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConvertError(f"{path} is truncated or corrupt ({_first_line(exc)}); download or save it "
                           f"again") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path} does not hold a state dict of tensors; save it with torch.save(model.state_dict())")
    return state


def read_hf_weights(hf_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file read, its tensors) from model.safetensors, pytorch_model.bin or their index."""
    found = [hf_dir / name for name in HF_WEIGHT_FILES if (hf_dir / name).is_file()]
    if not found:
        raise ConvertError(f"{hf_dir} holds no weights (looked for {', '.join(HF_WEIGHT_FILES)}); "
                           f"save the model with save_pretrained")
    path = found[0]
    if not path.name.endswith(".index.json"):
        return path, _load_weight_file(path)
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise ConvertError(f"{path} is not a valid weight index ({_first_line(exc)}); save the model "
                           f"again") from None
    tensors: dict[str, torch.Tensor] = {}
    for shard_name in sorted(set(weight_map.values())):
        tensors.update(_load_weight_file(hf_dir / shard_name))
    return path, tensors


def import_hf(hf_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """A Hugging Face MegatronBertForPreTraining (or ForMaskedLM) directory -> (full form, config)."""
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    source, tensors = read_hf_weights(hf_dir)
    for name, origin in HF_TIED.items():
        copy = tensors.pop(name, None)
        if copy is not None and origin in tensors and not torch.equal(copy, tensors[origin]):
            raise ConvertError(f"{source}: {name} differs from {origin}; untied MLM decoders are not supported")
    for name in HF_BUFFERS:
        tensors.pop(name, None)
    expected = full_to_hf({n: torch.empty(s, device="meta") for n, s in full_shapes(cfg).items()}, cfg)
    _check_tensors(tensors, {n: t.shape for n, t in expected.items()}, source, hf_dir / HF_CONFIG, cfg)
    return hf_to_full(tensors, cfg), cfg


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory from itself, a checkpoint step directory, or a run directory (via `latest`)."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{path} does not exist or is not a directory; pass a model, checkpoint step or run "
                           f"directory")
    if (path / MODEL_CONFIG).is_file():
        return path
    checkpoints = path / CHECKPOINTS_SUBDIR
    pointer = checkpoints / LATEST_FILE
    if pointer.is_file():
        step_dir = checkpoints / pointer.read_text().strip()
        if not (step_dir / MODEL_CONFIG).is_file():
            raise ConvertError(f"{pointer} names {step_dir.name!r} but {step_dir / MODEL_CONFIG} is missing; pass "
                               f"a complete step directory under {checkpoints} instead")
        return step_dir
    if checkpoints.is_dir():
        raise ConvertError(f"{pointer} not found; pass one of the step directories under {checkpoints}")
    raise ConvertError(f"{path / MODEL_CONFIG} not found: {path} is not an mbert-train model, checkpoint step "
                       f"or run directory")


def load_model_dir(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(full form, config) of any of our model directories, checked against its model_config.json."""
    model_dir = resolve_model_dir(path)
    config = model_dir / MODEL_CONFIG
    try:
        full, cfg = load_full_from_dir(model_dir)
    except (OSError, ValueError) as exc:
        message = _first_line(exc)  # weights.py names the file; ModelConfig names only the setting
        raise ConvertError(message if str(model_dir) in message else f"{config}: {message}") from None
    _check_tensors(full, full_shapes(cfg), model_dir, config, cfg)
    return full, cfg


def _check_out_dir(out_dir: Path, *, overwrite: bool, source: Path | None = None) -> None:
    if source is not None and out_dir.resolve() == source.resolve():
        raise ConvertError(f"OUT_DIR {out_dir} is the input directory; write the conversion somewhere else")
    if (out_dir.exists() or out_dir.is_symlink()) and not overwrite:
        raise ConvertError(f"{out_dir} already exists; choose another OUT_DIR or pass --overwrite")


@contextmanager
def _staged_dir(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield a fresh directory beside `out_dir`; on success it replaces `out_dir`, on error it is removed."""
    _check_out_dir(out_dir, overwrite=overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    staging.mkdir()
    try:
        yield staging
        # safetensors >= 0.8 creates files 0600; give them the permissions the user's umask asks for.
        for path in staging.iterdir():
            os.chmod(path, 0o666 & ~process_umask())
        if out_dir.exists() or out_dir.is_symlink():
            old = out_dir.parent / f".{out_dir.name}.old-{tag}"
            os.rename(out_dir, old)
            try:
                os.rename(staging, out_dir)
            except OSError:
                os.rename(old, out_dir)
                raise
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
        else:
            os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def hf_config_dict(cfg: ModelConfig) -> dict:
    """config.json for `cfg`; the MLM-only model (no pooler/NSP) loads as MegatronBertForMaskedLM."""
    hf = cfg.to_hf_dict()
    if not cfg.binary_head:
        hf["architectures"] = [HF_MLM_ONLY]
    return hf


def export_hf(full_state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike, *,
              overwrite: bool = False) -> Path:
    """Write `config.json` + `model.safetensors` that `MegatronBertForPreTraining.from_pretrained` loads."""
    out_dir = Path(out_dir)
    hf = full_to_hf(full_state, cfg)
    with _staged_dir(out_dir, overwrite=overwrite) as staging:
        save_file(hf, str(staging / HF_WEIGHTS), metadata={"format": "pt"})
        (staging / HF_CONFIG).write_text(json.dumps(hf_config_dict(cfg), indent=2) + "\n")
    return out_dir


def write_model_dir(full_state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike, tp: int,
                    *, overwrite: bool = False) -> Path:
    """Write the full form as a TP=`tp` model directory (what `trainer.init_from` reads)."""
    out_dir = Path(out_dir)
    with _staged_dir(out_dir, overwrite=overwrite) as staging:
        for rank in range(tp):
            save_shard_tensors(staging, shard_full(full_state, cfg, tp, rank), cfg, rank, tp)
    return out_dir


def from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int, *, overwrite: bool = False) -> Path:
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    _check_out_dir(out_dir, overwrite=overwrite, source=hf_dir)
    cfg = read_hf_config(hf_dir)
    _check_tp(cfg, tp, hf_dir / HF_CONFIG)
    full, cfg = import_hf(hf_dir)
    return write_model_dir(full, cfg, out_dir, tp, overwrite=overwrite)


def to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    _check_out_dir(out_dir, overwrite=overwrite, source=ckpt_dir)
    full, cfg = load_model_dir(ckpt_dir)
    return export_hf(full, cfg, out_dir, overwrite=overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbert-convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  mbert-convert from-hf ./megatron-bert-hf ./init_tp2 --tp 2\n"
               "  mbert-train trainer.init_from=./init_tp2 parallel.tensor_parallel=2 ...\n"
               "  mbert-convert to-hf runs/my_run ./my_run_hf     # follows checkpoints/latest")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{from-hf,to-hf}")
    p = sub.add_parser("from-hf", help="Hugging Face directory -> mbert-train model directory with TP shards",
                       description="Read HF_DIR/config.json and model.safetensors (or model.safetensors.index.json, "
                                   "pytorch_model.bin) of a MegatronBertForPreTraining / ForMaskedLM and write "
                                   "OUT_DIR/model_config.json + model_tpRR-of-NN.safetensors for every TP rank.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory written by save_pretrained")
    p.add_argument("out_dir", metavar="OUT_DIR", help="model directory to create (trainer.init_from)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel degree to shard for; must divide num_heads and intermediate_size "
                        "(default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p = sub.add_parser("to-hf", help="mbert-train model/checkpoint/run directory -> Hugging Face directory",
                       description="Gather the TP shards of CKPT_DIR (any TP degree) and write OUT_DIR/config.json "
                                   "+ model.safetensors for MegatronBertForPreTraining.from_pretrained.")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR",
                   help="a from-hf output, a checkpoint step dir RUN/checkpoints/step_XXXXXXXX, or a run dir RUN "
                        "(its checkpoints/latest is used)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="Hugging Face directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "from-hf":
            out = from_hf(args.hf_dir, args.out_dir, args.tp, overwrite=args.overwrite)
            print(f"wrote {out} (tensor_parallel={args.tp}); train from it with trainer.init_from={out}")
        else:
            out = to_hf(args.ckpt_dir, args.out_dir, overwrite=args.overwrite)
            print(f"wrote {out}; load it with MegatronBertForPreTraining.from_pretrained({str(out)!r})")
    except ConvertError as exc:
        print(f"mbert-convert: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
