"""What every conversion shares: our model directories (read, checked, written), the checks of
tensors against a config, and the OUT_DIR protocol.

Every input is checked (files, JSON, tensor names and shapes against the config, TP
divisibility) before anything is written; errors are one line naming the file or setting and
the fix. Output is built in a hidden temporary directory beside OUT_DIR, fsynced and renamed
into place at the end (`mbert_train.staging`), so an interrupted conversion never leaves a
half-written OUT_DIR. Every output carries a `.mbert-convert.json` marker: `--overwrite`
replaces only such a directory (or an older output with exactly our file set), never an
unrelated folder, and OUT_DIR may not be, contain or lie inside the input.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch.distributed.checkpoint.api import CheckpointException

from mbert_train import __version__
from mbert_train import manifest
from mbert_train.checkpoint import CHECKPOINTS_SUBDIR, FORMAT, META_FILE, find_latest, read_meta
from mbert_train.checkpoint.dcp import PARAM, UnsafeCheckpoint, read_full
from mbert_train.checkpoint.dir import MODEL_KEY
from mbert_train.errors import UserError, describe_os_error, first_line
from mbert_train.model.config import ModelConfig
from mbert_train.model.weights import (MODEL_CONFIG, full_shapes, load_full_from_dir, save_shard_tensors, shard_file,
                                       shard_full)
from mbert_train.parallel.layout import ParallelDims
from mbert_train.staging import clean_leftovers, staged_dir

# The files of each kind of output. Judging an existing OUT_DIR needs every kind's, so the
# formats' file names live here and `hf` / `megatron` import them.
HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_TOKENIZER = "tokenizer.json"
TOKENIZER_FILES = (HF_TOKENIZER, "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
MODEL_CARD = "README.md"
# Beside the weights when known: the dataset's tokenizer and a model card (`hf.export_files`).
HF_EXTRA_FILES = (*TOKENIZER_FILES, MODEL_CARD)
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
MEGATRON_RELEASE = "release"
# Written into every output, naming its kind; `--overwrite` replaces only directories carrying it.
MARKER = ".mbert-convert.json"
OUTPUT_FILES = {"hf": re.compile(rf"^({'|'.join(map(re.escape, (HF_CONFIG, HF_WEIGHTS, *HF_EXTRA_FILES)))})$"),
                "model": re.compile(rf"^({'|'.join(map(re.escape, (MODEL_CONFIG, *TOKENIZER_FILES)))}"
                                    rf"|model_tp\d+-of-\d+\.safetensors)$"),
                "megatron": re.compile(rf"^({re.escape(MEGATRON_TRACKER)}|{re.escape(MEGATRON_RELEASE)})$")}
# Weights are read as these dtypes only; integer or boolean tensors are not a model's weights,
# and casting them to float would hide that.
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_FULL_LAYER = re.compile(r"^layers\.(\d+)\.")


class ConvertError(UserError):
    """A bad input or output path; the message is one line naming the file or setting and the fix."""


# ---- checks against a config ----------------------------------------------------------------

def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], source: Path,
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


def check_tp(cfg: ModelConfig, tp: int, config: Path) -> None:
    try:
        ParallelDims(world_size=tp, tensor_parallel=tp).check_model(cfg)
    except ValueError as exc:
        raise ConvertError(f"--tp {tp} does not fit {config}: {first_line(exc)}") from None


def check_dtypes(tensors: dict[str, torch.Tensor], source: Path) -> None:
    for name, tensor in tensors.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            raise ConvertError(f"{source}: {name} has dtype {str(tensor.dtype).removeprefix('torch.')}, not a "
                               f"weight dtype (float16, bfloat16, float32); the file is not a model's weights")


def check_layer_count(names, pattern: re.Pattern, cfg: ModelConfig, source: Path, config: Path,
                      key: str) -> None:
    """The config's layer count against the layers the weights hold, before anything is built
    from the config (a model of 100000 layers takes minutes to even describe)."""
    indices = [int(m.group(1)) for m in map(pattern.match, names) if m]
    present = max(indices) + 1 if indices else 0
    if present != cfg.num_layers:
        raise ConvertError(f"{source} holds {present} layers but {config} says {key}={cfg.num_layers}; the "
                           f"weights belong to another model or config")


# ---- our model directories ------------------------------------------------------------------

def is_state_checkpoint(path: Path) -> bool:
    """A checkpoint step directory of the current format (weights in its DCP state)."""
    return (path / META_FILE).is_file() and read_meta(path).get("format") == FORMAT


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A model directory from itself, a checkpoint step directory, or a run directory (via
    `checkpoints/latest`, validated and never followed outside the run by `find_latest`)."""
    path = Path(path)
    if not path.is_dir():
        raise ConvertError(f"{path} does not exist or is not a directory; pass a model, checkpoint step or run "
                           f"directory")
    if (path / MODEL_CONFIG).is_file() or is_state_checkpoint(path):
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
    if not ((step_dir / MODEL_CONFIG).is_file() or is_state_checkpoint(step_dir)):
        raise ConvertError(f"{step_dir / MODEL_CONFIG} is missing: the checkpoint is incomplete; pass another "
                           f"step directory under {checkpoints}")
    return step_dir


def read_checkpoint_weights(step_dir: Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(full form, config) of a checkpoint step directory: its files checked against the
    manifest, then the weights read whole from its DCP state (`checkpoint.dcp.read_full`)."""
    meta = read_meta(step_dir)
    problem = manifest.verify(step_dir, meta.get("files"))
    if problem is not None:
        raise ConvertError(f"{problem}; pass another step directory")
    try:
        cfg = ModelConfig(**meta[MODEL_KEY])
    except (KeyError, TypeError, ValueError) as exc:
        raise ConvertError(f"{step_dir / META_FILE} has no valid model config ({first_line(exc)}); the checkpoint "
                           f"is corrupt, use another one") from None
    try:
        return read_full(step_dir, PARAM), cfg
    except UnsafeCheckpoint as exc:
        raise ConvertError(f"{step_dir} names the Python global {exc.args[0]} in its metadata, which no checkpoint "
                           f"holds; refusing to read it") from None
    except (CheckpointException, OSError, RuntimeError, ValueError) as exc:  # the manifest check passed: damaged
        raise ConvertError(f"{step_dir}: the weights cannot be read ({first_line(exc)}); use another "
                           f"checkpoint") from None


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
    check_layer_count(names, _FULL_LAYER, cfg, shard, config, "model.num_layers")


def load_model_dir(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(full form, config) of any of our model or checkpoint directories, checked against its config."""
    model_dir = resolve_model_dir(path)
    if is_state_checkpoint(model_dir):
        full, cfg = read_checkpoint_weights(model_dir)
        config = model_dir / META_FILE
    else:
        config = model_dir / MODEL_CONFIG
        _check_saved_layout(model_dir)
        try:
            full, cfg = load_full_from_dir(model_dir)
        except (OSError, ValueError) as exc:
            message = first_line(exc)  # weights.py names the file; ModelConfig names only the setting
            raise ConvertError(message if str(model_dir) in message else f"{config}: {message}") from None
    check_dtypes(full, model_dir)
    check_tensors(full, full_shapes(cfg), model_dir, config, cfg)
    return full, cfg


def write_model_dir(full_state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike, tp: int,
                    *, overwrite: bool = False, files: dict[str, str] | None = None) -> Path:
    """Write the full form as a TP=`tp` model directory (what `trainer.init_from` reads), with
    `files` ({name: text} of `TOKENIZER_FILES`: the tokenizer the model came with) beside it."""
    out_dir = Path(out_dir)
    with staged_output(out_dir, overwrite=overwrite) as staging:
        for rank in range(tp):
            save_shard_tensors(staging, shard_full(full_state, cfg, tp, rank), cfg, rank, tp)
        for name, text in (files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        write_marker(staging, "model")
    return out_dir


# ---- OUT_DIR --------------------------------------------------------------------------------

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
    if kind not in OUTPUT_FILES:
        return f"its {MARKER} is unreadable"
    # The marker lists what was written (older markers do not): a tokenizer a user added to a
    # weights-only export is theirs, though the same name in another export would be ours.
    ours = set(listed) if isinstance(listed, list) else None
    foreign = sorted(n for n in names - {MARKER}
                     if not (OUTPUT_FILES[kind].match(n) and (ours is None or n in ours)))
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
def staged_output(out_dir: Path, *, overwrite: bool) -> Iterator[Path]:
    """`staged_dir` for an OUT_DIR that `check_out_dir` allows; safetensors reports a full disk
    as a `SafetensorError` (not an OSError), which becomes one line here."""
    replace = check_out_dir(out_dir, overwrite=overwrite)
    try:
        with staged_dir(out_dir, replace=replace) as staging:
            yield staging
    except SafetensorError as exc:
        raise ConvertError(describe_os_error(OSError(first_line(exc)), out_dir, "writing")) from None


def write_marker(directory: Path, kind: str) -> None:
    """Written last: names the kind (a key of `OUTPUT_FILES`) and every file written."""
    files = sorted(p.name for p in directory.iterdir())
    (directory / MARKER).write_text(json.dumps({"written_by": "mbert-convert", "kind": kind,
                                                "version": __version__, "files": files}) + "\n")
