"""mbert-convert: Hugging Face MegatronBERT directories <-> mbert-train model directories.

    mbert-convert from-hf HF_DIR OUT_DIR --tp N    # config.json + weights -> model_config.json + N shards
    mbert-convert to-hf CKPT_DIR OUT_DIR           # any model/step/run dir, any TP -> config.json + model.safetensors
                                                   # + the run's tokenizer and a model card README.md
    mbert-convert from-megatron DIR OUT_DIR --tp N # Megatron-LM BERT checkpoint (mbert_train.megatron)
    mbert-convert to-megatron CKPT_DIR OUT_DIR --tp N

Both go through the *full* form of `mbert_train.model.weights`, which is the same at every TP
degree. Every input is checked (files, JSON, tensor names and shapes against the config, TP
divisibility) before anything is written; errors are one line naming the file or setting and
the fix. Output is built in a hidden temporary directory beside OUT_DIR, fsynced and renamed
into place at the end (`mbert_train.staging`), so an interrupted conversion never leaves a
half-written OUT_DIR. Every output carries a `.mbert-convert.json` marker: `--overwrite`
replaces only such a directory (or an older output with exactly our file set), never an
unrelated folder, and OUT_DIR may not be, contain or lie inside the input.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from mbert_train import __version__
from mbert_train.checkpoint import CHECKPOINTS_SUBDIR, find_latest
from mbert_train.errors import UserError, describe_os_error, first_line
from mbert_train.model.config import ModelConfig
from mbert_train.model.weights import (MODEL_CONFIG, full_shapes, full_to_hf, hf_to_full, load_full_from_dir,
                                       save_shard_tensors, shard_file, shard_full)
from mbert_train.parallel.layout import ParallelDims
from mbert_train.staging import clean_leftovers, staged_dir

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
# Beside the weights when known: the dataset's tokenizer and a model card (mbert_train.hf_export).
HF_EXTRA_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "README.md")
# Weights are read as these dtypes only; integer or boolean tensors are not a model's weights,
# and casting them to float would hide that.
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Written into every output, naming its kind; `--overwrite` replaces only directories carrying it.
MARKER = ".mbert-convert.json"
_OUTPUT_FILES = {"hf": re.compile(rf"^({'|'.join(map(re.escape, (HF_CONFIG, HF_WEIGHTS, *HF_EXTRA_FILES)))})$"),
                 "model": re.compile(rf"^({re.escape(MODEL_CONFIG)}|model_tp\d+-of-\d+\.safetensors)$"),
                 "megatron": re.compile(r"^(latest_checkpointed_iteration\.txt|release)$")}  # mbert_train.megatron
_HF_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")
_FULL_LAYER = re.compile(r"^layers\.(\d+)\.")


class ConvertError(UserError):
    """A bad input or output path; the message is one line naming the file or setting and the fix."""


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
        raise ConvertError(f"--tp {tp} does not fit {config}: {first_line(exc)}") from None


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
        raise ConvertError(f"{path} is not valid JSON ({first_line(exc)}); re-save it with save_pretrained") from None
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
        raise ConvertError(f"{path}: {first_line(exc)}") from None
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
        raise ConvertError(f"{path} is truncated or corrupt ({first_line(exc)}); download or save it "
                           f"again") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConvertError(f"{path} does not hold a state dict of tensors; save it with torch.save(model.state_dict())")
    return state


def _read_weight_index(path: Path) -> list[str]:
    """The shard file names an HF `*.index.json` lists, each a plain name inside its directory."""
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path} is not a valid weight index ({first_line(exc)}); save the model "
                           f"again") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise ConvertError(f"{path} is not a valid weight index (its weight_map must map tensor names to shard "
                           f"file names); save the model again")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        if name in ("", ".", "..") or Path(name).name != name:
            raise ConvertError(f"{path} names shard {name!r}, which is not a file in {path.parent}; save the model "
                               f"again")
    return shards


def read_hf_weights(hf_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file read, its tensors) from model.safetensors, pytorch_model.bin or their index."""
    found = [hf_dir / name for name in HF_WEIGHT_FILES if (hf_dir / name).is_file()]
    if not found:
        raise ConvertError(f"{hf_dir} holds no weights (looked for {', '.join(HF_WEIGHT_FILES)}); "
                           f"save the model with save_pretrained")
    path = found[0]
    if not path.name.endswith(".index.json"):
        return path, _load_weight_file(path)
    tensors: dict[str, torch.Tensor] = {}
    for shard_name in _read_weight_index(path):
        tensors.update(_load_weight_file(hf_dir / shard_name))
    return path, tensors


def _check_dtypes(tensors: dict[str, torch.Tensor], source: Path) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            raise ConvertError(f"{source}: {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, not a "
                               f"weight dtype (float16, bfloat16, float32); the file is not a model's weights")


def _check_layer_count(names, pattern: re.Pattern, cfg: ModelConfig, source: Path, config: Path,
                       key: str) -> None:
    """The config's layer count against the layers the weights hold, before anything is built
    from the config (a model of 100000 layers takes minutes to even describe)."""
    indices = [int(m.group(1)) for m in map(pattern.match, names) if m]
    present = max(indices) + 1 if indices else 0
    if present != cfg.num_layers:
        raise ConvertError(f"{source} holds {present} layers but {config} says {key}={cfg.num_layers}; the "
                           f"weights belong to another model or config")


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
    _check_dtypes(tensors, source)
    _check_layer_count(tensors, _HF_LAYER, cfg, source, hf_dir / HF_CONFIG, "num_hidden_layers")
    expected = full_to_hf({n: torch.empty(s, device="meta") for n, s in full_shapes(cfg).items()}, cfg)
    _check_tensors(tensors, {n: t.shape for n, t in expected.items()}, source, hf_dir / HF_CONFIG, cfg)
    return hf_to_full(tensors, cfg), cfg


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory from itself, a checkpoint step directory, or a run directory (via
    `checkpoints/latest`, validated and never followed outside the run by `find_latest`)."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{path} does not exist or is not a directory; pass a model, checkpoint step or run "
                           f"directory")
    if (path / MODEL_CONFIG).is_file():
        return path
    checkpoints = path / CHECKPOINTS_SUBDIR
    if not checkpoints.is_dir():
        raise ConvertError(f"{path / MODEL_CONFIG} not found: {path} is not an mbert-train model, checkpoint step "
                           f"or run directory")
    step_dir, warning = find_latest(path)
    if step_dir is None:
        raise ConvertError(f"{warning or f'{checkpoints} holds no complete checkpoint'}; pass a model or "
                           f"checkpoint step directory instead")
    if warning:
        print(f"mbert-convert: warning: {warning}", file=sys.stderr)
    if not (step_dir / MODEL_CONFIG).is_file():
        raise ConvertError(f"{step_dir / MODEL_CONFIG} is missing: the checkpoint is incomplete; pass another "
                           f"step directory under {checkpoints}")
    return step_dir


def _check_saved_layout(model_dir: Path) -> None:
    """`tensor_parallel` and the layer count of model_config.json against the shard files,
    before `load_full_from_dir` builds anything from them."""
    config = model_dir / MODEL_CONFIG
    try:
        meta = json.loads(config.read_text())
        cfg, tp = ModelConfig(**meta["model"]), meta["tensor_parallel"]
    except (ValueError, KeyError, TypeError):
        return  # load_full_from_dir names the problem
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ConvertError(f"{config}: tensor_parallel={tp!r} must be an integer >= 1; the file is corrupt, use "
                           f"another checkpoint")
    shard = model_dir / shard_file(tp, 0)
    try:
        with safe_open(str(shard), "pt") as f:
            names = list(f.keys())
    except Exception:
        return  # missing or corrupt: load_full_from_dir names the problem
    _check_layer_count(names, _FULL_LAYER, cfg, shard, config, "model.num_layers")


def load_model_dir(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(full form, config) of any of our model directories, checked against its model_config.json."""
    model_dir = resolve_model_dir(path)
    config = model_dir / MODEL_CONFIG
    _check_saved_layout(model_dir)
    try:
        full, cfg = load_full_from_dir(model_dir)
    except (OSError, ValueError) as exc:
        message = first_line(exc)  # weights.py names the file; ModelConfig names only the setting
        raise ConvertError(message if str(model_dir) in message else f"{config}: {message}") from None
    _check_dtypes(full, model_dir)
    _check_tensors(full, full_shapes(cfg), model_dir, config, cfg)
    return full, cfg


def _legacy_output(out_dir: Path, names: set[str]) -> bool:
    """An output written before the marker existed: exactly our files, and a config.json
    without the `transformers_version` that every `save_pretrained` writes."""
    try:
        if names == {HF_CONFIG, HF_WEIGHTS}:
            return set(json.loads((out_dir / HF_CONFIG).read_text())) == set(ModelConfig().to_hf_dict())
        if MODEL_CONFIG in names:
            tp = json.loads((out_dir / MODEL_CONFIG).read_text())["tensor_parallel"]
            return (type(tp) is int and 1 <= tp < len(names)
                    and names == {MODEL_CONFIG, *(shard_file(tp, r) for r in range(tp))})
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return False


def _not_ours(out_dir: Path) -> str | None:
    """None if `out_dir` is an mbert-convert output holding only what we wrote; else why not."""
    if out_dir.is_symlink() or not out_dir.is_dir():
        return "it is a symbolic link" if out_dir.is_symlink() else "it is not a directory"
    names = {p.name for p in out_dir.iterdir()}
    if MARKER not in names:
        return None if _legacy_output(out_dir, names) else f"it has no {MARKER}"
    try:
        marker = json.loads((out_dir / MARKER).read_text())
        kind, listed = marker.get("kind"), marker.get("files")
    except (OSError, ValueError, AttributeError):
        kind, listed = None, None
    if kind not in _OUTPUT_FILES:
        return f"its {MARKER} is unreadable"
    # The marker lists what was written (older markers do not): a tokenizer a user added to a
    # weights-only export is theirs, though the same name in another export would be ours.
    ours = set(listed) if isinstance(listed, list) else None
    foreign = sorted(n for n in names - {MARKER}
                     if not (_OUTPUT_FILES[kind].match(n) and (ours is None or n in ours)))
    return f"it also holds {foreign[0]!r}, which mbert-convert did not write" if foreign else None


def check_out_dir(out_dir: str | os.PathLike, *, overwrite: bool, inputs: tuple[Path, ...] = ()) -> bool:
    """Refuse an OUT_DIR that is, contains or lies inside an input, or that exists and is not
    ours to replace; True when it exists and `--overwrite` may replace it."""
    out_dir = Path(out_dir)
    out = out_dir.resolve()
    for source in inputs:
        src = source.resolve()
        where = ("is" if out == src else "contains" if out in src.parents else
                 "is inside" if src in out.parents else None)
        if where:
            raise ConvertError(f"OUT_DIR {out_dir} {where} the input directory {source}; write the conversion "
                               f"somewhere else")
    clean_leftovers(out_dir)  # restores OUT from a `.OUT.old-*` left by a kill mid-swap, before judging OUT
    if not (out_dir.exists() or out_dir.is_symlink()):
        return False
    if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
        return False  # an empty directory is filled in place
    why = _not_ours(out_dir)
    if why:
        raise ConvertError(f"{out_dir} exists and is not an mbert-convert output ({why}); it will not be "
                           f"deleted: choose another OUT_DIR")
    if not overwrite:
        raise ConvertError(f"{out_dir} already exists (an earlier mbert-convert output); choose another OUT_DIR "
                           f"or pass --overwrite to replace it")
    return True


@contextmanager
def _staged_output(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """`staged_dir` for an OUT_DIR that `check_out_dir` allows; safetensors reports a full disk
    as a `SafetensorError` (not an OSError), which becomes one line here."""
    replace = check_out_dir(out_dir, overwrite=overwrite)
    try:
        with staged_dir(out_dir, replace=replace) as staging:
            yield staging
    except SafetensorError as exc:
        raise ConvertError(describe_os_error(OSError(first_line(exc)), out_dir, "writing")) from None


def _write_marker(directory: Path, kind: str) -> None:
    """Written last: names the kind and every file written."""
    files = sorted(p.name for p in directory.iterdir())
    (directory / MARKER).write_text(json.dumps({"written_by": "mbert-convert", "kind": kind,
                                                "version": __version__, "files": files}) + "\n")


def hf_config_dict(cfg: ModelConfig) -> dict:
    """config.json for `cfg`; the MLM-only model (no pooler/NSP) loads as MegatronBertForMaskedLM."""
    hf = cfg.to_hf_dict()
    if not cfg.binary_head:
        hf["architectures"] = [HF_MLM_ONLY]
    return hf


def export_hf(full_state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike, *,
              overwrite: bool = False, files: dict[str, str] | None = None) -> Path:
    """Write `config.json` + `model.safetensors` that `MegatronBertForPreTraining.from_pretrained`
    (MLM-only: `MegatronBertForMaskedLM`) loads, plus `files` ({name: text}, `HF_EXTRA_FILES`:
    the tokenizer and model card of `mbert_train.hf_export`).

    `overwrite` replaces only an earlier mbert-convert output (see `check_out_dir`)."""
    out_dir = Path(out_dir)
    unknown = sorted(set(files or {}) - set(HF_EXTRA_FILES))
    if unknown:
        raise ValueError(f"export_hf writes only {HF_EXTRA_FILES} besides the weights, not {unknown}")
    hf = full_to_hf(full_state, cfg)
    with _staged_output(out_dir, overwrite=overwrite) as staging:
        save_file(hf, str(staging / HF_WEIGHTS), metadata={"format": "pt"})
        (staging / HF_CONFIG).write_text(json.dumps(hf_config_dict(cfg), indent=2) + "\n")
        for name, text in (files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        _write_marker(staging, "hf")
    return out_dir


def write_model_dir(full_state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike, tp: int,
                    *, overwrite: bool = False) -> Path:
    """Write the full form as a TP=`tp` model directory (what `trainer.init_from` reads)."""
    out_dir = Path(out_dir)
    with _staged_output(out_dir, overwrite=overwrite) as staging:
        for rank in range(tp):
            save_shard_tensors(staging, shard_full(full_state, cfg, tp, rank), cfg, rank, tp)
        _write_marker(staging, "model")
    return out_dir


def from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int, *, overwrite: bool = False) -> Path:
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if tp < 1:
        raise ConvertError(f"--tp {tp} must be >= 1 (the tensor-parallel degree to shard for)")
    check_out_dir(out_dir, overwrite=overwrite, inputs=(hf_dir,))
    cfg = read_hf_config(hf_dir)
    _check_tp(cfg, tp, hf_dir / HF_CONFIG)
    full, cfg = import_hf(hf_dir)
    return write_model_dir(full, cfg, out_dir, tp, overwrite=overwrite)


def _run_record(model_dir: Path) -> tuple[dict | None, int | None, int | None, dict]:
    """(the run's config, step, data-parallel degree, its dataset record {path, tokenizer_sha256})
    of a checkpoint step directory, from its run.json and meta.json; Nones (and {}) for a model
    directory that is no checkpoint."""
    try:
        run = json.loads((model_dir / "run.json").read_text(encoding="utf-8"))
        config = run.get("config") if isinstance(run, dict) else None
        dataset = run.get("dataset") if isinstance(run, dict) and isinstance(run.get("dataset"), dict) else {}
    except (OSError, ValueError):
        config, dataset = None, {}
    try:
        meta = json.loads((model_dir / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = {}
    meta = meta if isinstance(meta, dict) else {}
    step = meta.get("step") if type(meta.get("step")) is int else None
    layout = meta.get("layout") if isinstance(meta.get("layout"), dict) else {}
    dp = layout.get("data_parallel") if type(layout.get("data_parallel")) is int else None
    return (config if isinstance(config, dict) else None), step, dp, dataset


def to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
          dataset: str | os.PathLike | None = None) -> Path:
    """The weights, the tokenizer of the dataset the run trained on (or of `dataset`) and a model
    card; without a tokenizer, the weights alone and one warning line saying how to add it."""
    from mbert_train.hf_export import dataset_of_run, export_files

    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    inputs = (ckpt_dir,) if not ckpt_dir.is_dir() else (ckpt_dir, resolve_model_dir(ckpt_dir))
    check_out_dir(out_dir, overwrite=overwrite, inputs=inputs)
    if dataset is not None and not Path(dataset, "metadata.json").is_file():
        raise ConvertError(f"--dataset {dataset} is not a dataset written by mbert-prep (no metadata.json); pass "
                           f"the prepared dataset directory the model was trained on")
    full, cfg = load_model_dir(inputs[-1])
    config, step, dp, record = _run_record(inputs[-1])
    recorded = record.get("path") if isinstance(record.get("path"), str) else None
    dataset_dir = (str(dataset) if dataset is not None else recorded if recorded and Path(recorded).is_dir()
                   else dataset_of_run(config) if config else None)
    run_dir = inputs[-1].parent.parent
    files, missing = export_files(cfg, config, dataset_dir=dataset_dir, step=step, data_parallel=dp,
                                  tokenizer_sha256=record.get("tokenizer_sha256") if dataset is None else None,
                                  metrics_file=run_dir / "metrics.jsonl" if config else None, name=out_dir.name)
    export_hf(full, cfg, out_dir, overwrite=overwrite, files=files)
    if missing and (config is not None or dataset is not None):  # a plain model dir records no dataset
        print(f"mbert-convert: warning: tokenizer not written: {missing}; add it with mbert-convert to-hf "
              f"{ckpt_dir} {out_dir} --overwrite --dataset DATASET_DIR (the mbert-prep output it trained on)",
              file=sys.stderr)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbert-convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  mbert-convert from-hf ./megatron-bert-hf ./init_tp2 --tp 2\n"
               "  mbert-train trainer.init_from=./init_tp2 parallel.tensor_parallel=2 ...\n"
               "  mbert-convert to-hf runs/my_run ./my_run_hf     # follows checkpoints/latest")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{from-hf,to-hf,from-megatron,to-megatron}")
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
                                   "+ model.safetensors (MegatronBertForPreTraining, or MegatronBertForMaskedLM "
                                   "for an MLM-only model), the tokenizer of the dataset the run trained on "
                                   "(tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json) "
                                   "and a model card README.md: pipeline('fill-mask', model=OUT_DIR) works as is.")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR",
                   help="a from-hf output, a checkpoint step dir RUN/checkpoints/step_XXXXXXXX, or a run dir RUN "
                        "(its checkpoints/latest is used)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="Hugging Face directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--dataset", metavar="DIR", default=None,
                   help="the mbert-prep dataset whose tokenizer to write (default: the one the checkpoint's "
                        "run.json names; pass this when it moved)")
    from mbert_train import megatron  # imports this module: loaded here, not at the top
    megatron.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "from-hf":
            out = from_hf(args.hf_dir, args.out_dir, args.tp, overwrite=args.overwrite)
            print(f"wrote {out} (tensor_parallel={args.tp}); train from it with trainer.init_from={out}")
        elif args.command in ("from-megatron", "to-megatron"):
            from mbert_train import megatron
            megatron.run(args)
        else:
            out = to_hf(args.ckpt_dir, args.out_dir, overwrite=args.overwrite, dataset=args.dataset)
            print(load_hint(out))
    except UserError as exc:
        print(f"mbert-convert: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only or unwritable OUT_DIR, unreadable input
        path = exc.filename or args.out_dir
        action = "writing" if _is_output_path(Path(path), Path(args.out_dir)) else "reading"
        print(f"mbert-convert: error: {describe_os_error(exc, path, action)}", file=sys.stderr)
        return 2
    return 0


def load_hint(out: Path) -> str:
    """'wrote OUT; load it with ...', naming the class its config.json holds and, with a
    tokenizer beside it, the fill-mask pipeline."""
    architecture = json.loads((out / HF_CONFIG).read_text())["architectures"][0]
    hint = f"wrote {out}; load it with {architecture}.from_pretrained({str(out)!r})"
    if (out / "tokenizer.json").is_file():
        hint += f" or pipeline('fill-mask', model={str(out)!r})"
    else:
        hint += "; no tokenizer was written (add the training dataset's with --dataset DIR)"
    return hint


def _is_output_path(path: Path, out_dir: Path) -> bool:
    """`path` is OUT_DIR, its parent, or inside OUT_DIR or the `.OUT_DIR.*` built beside it."""
    path, out = path.absolute(), out_dir.absolute()
    return path == out.parent or any(p == out or (p.parent == out.parent and p.name.startswith(f".{out.name}."))
                                     for p in (path, *path.parents))


if __name__ == "__main__":
    sys.exit(main())
