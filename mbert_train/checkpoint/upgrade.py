"""`mbert-convert upgrade-checkpoint`: a checkpoint of format 2 rewritten in place as format 3.

Format 2 (mbert-train before the one-DCP state) held, per checkpoint step directory::

    model_config.json, model_tpXX-of-YY.safetensors   weights, one file per TP rank
    optim/                                           optimizer state, DCP, full tensors NAME/KIND
    trainer_state.pt                                 step, schedule, data position, counters, layout
    rng_rankXXXXX.pt                                 RNG states, one file per rank
    run.json, meta.json                              run record; format, layout, manifest

Format 3 holds the same state as one DCP directory plus `meta.json` (`mbert_train.checkpoint.state`).
The upgrade is exact: every tensor and counter is carried over unchanged, the RNG files as
their bytes, the layout as recorded, so a resume at the layout that saved it continues bit for
bit. It runs in one process, holding the full model and optimizer state in memory once.

Every file is checked against the manifest first; the new state is written into
`.tmp-step_N` and put in place by `CheckpointDir.replace` (the checkpoint keeps its place in the
write order; `latest` and the other checkpoints stay), so a kill at any point leaves the old
or the new checkpoint, complete. A run holding the run directory's lease is not disturbed.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch
from torch.distributed.checkpoint.api import CheckpointException

from mbert_train import manifest
from mbert_train.checkpoint import dcp
from mbert_train.checkpoint.dir import (CHECKPOINTS_SUBDIR, FORMAT, LEGACY_RUN_FILE, META_FILE, MODEL_KEY, RUN_KEY,
                                        CheckpointDir, CheckpointError, read_json, read_meta, step_of)
from mbert_train.checkpoint.state import SCALAR_KEYS, SCALARS, checked_scalars, rng_key
from mbert_train.errors import first_line
from mbert_train.model.weights import load_full_from_dir

LEGACY_FORMAT = 2
LEGACY_OPTIM_DIR = "optim"
LEGACY_TRAINER_STATE = "trainer_state.pt"
_LEGACY_RNG = re.compile(r"^rng_rank(\d{5})\.pt$")


def upgrade(path: str | Path) -> list[tuple[Path, bool]]:
    """Upgrade the checkpoint step directory `path`, or every checkpoint of the run directory
    `path`; returns (checkpoint, whether it was rewritten) for each (False: already format 3)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        run_dir, steps = path.parent.parent, [path]
        if path.parent.name != CHECKPOINTS_SUBDIR:
            raise CheckpointError(f"{path} is not in a run's {CHECKPOINTS_SUBDIR}/ folder; move it back under "
                                  f"RUN_DIR/{CHECKPOINTS_SUBDIR}/ and upgrade it there")
    elif (path / CHECKPOINTS_SUBDIR).is_dir():
        run_dir, steps = path, CheckpointDir(path).list()
        if not steps:
            raise CheckpointError(f"{path / CHECKPOINTS_SUBDIR} holds no complete checkpoint to upgrade")
    else:
        raise CheckpointError(f"{path} is neither a checkpoint step directory (with {META_FILE}) nor a run "
                              f"directory (with {CHECKPOINTS_SUBDIR}/); pass one of those")
    ckpt = CheckpointDir(run_dir, keep_last=None)
    done = []
    for step_dir in steps:
        fmt = read_meta(step_dir).get("format")
        if fmt == FORMAT:
            done.append((step_dir, False))
            continue
        if fmt != LEGACY_FORMAT:
            raise CheckpointError(f"checkpoint {step_dir} is in the per-rank format 1, whose optimizer state only "
                                  f"loads at the layout that wrote it; continue from its weights in a new run.dir "
                                  f"with trainer.init_from={step_dir}")
        _upgrade_one(ckpt, step_dir)
        done.append((step_dir, True))
    return done


def _upgrade_one(ckpt: CheckpointDir, step_dir: Path) -> None:
    meta = read_meta(step_dir)
    problem = manifest.verify(step_dir, meta.get("files"))
    if problem is not None:
        raise CheckpointError(f"{problem}; put the original back before upgrading")
    tensors, blobs, cfg = _read_legacy(step_dir)
    run = read_json(step_dir / LEGACY_RUN_FILE) if (step_dir / LEGACY_RUN_FILE).is_file() else {}
    step = step_of(step_dir)
    tmp = ckpt.begin(step)
    names = dcp.save_full(tmp, tensors, blobs)
    files = manifest.describe(tmp, [tmp / name for name in names], rank=0)
    ckpt.replace(step, layout=meta.get("layout", {}), files=files, record={MODEL_KEY: cfg.to_dict(), RUN_KEY: run})


def _read_legacy(step_dir: Path):
    """(tensors NAME/KIND, blobs, model config) of a format-2 checkpoint, in the full form."""
    try:
        full, cfg = load_full_from_dir(step_dir)
        tensors = {dcp.key(name, dcp.PARAM): t for name, t in full.items()}
        tensors.update(dcp.read_full(step_dir / LEGACY_OPTIM_DIR))
        state = torch.load(step_dir / LEGACY_TRAINER_STATE, map_location="cpu", weights_only=True)
        rng = {}
        for path in sorted(step_dir.iterdir()):
            if match := _LEGACY_RNG.match(path.name):
                rng[rng_key(int(match.group(1)))] = path.read_bytes()
                torch.load(io.BytesIO(rng[rng_key(int(match.group(1)))]), weights_only=True)  # readable as saved
    except dcp.UnsafeCheckpoint as exc:
        raise CheckpointError(f"{step_dir / LEGACY_OPTIM_DIR} names the Python global {exc.args[0]} in its "
                              f"metadata, which no checkpoint holds; refusing to read it") from None
    except (CheckpointException, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
        # the manifest check passed: a checkpoint written without one, or damaged since
        raise CheckpointError(f"checkpoint {step_dir} cannot be read ({first_line(exc)}); it cannot be "
                              f"upgraded") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint file {step_dir / LEGACY_TRAINER_STATE} is not a trainer state; it cannot "
                              f"be upgraded")
    scalars = checked_scalars({k: v for k, v in state.items() if k in SCALAR_KEYS}, step_dir)
    # Python's json carries ints, floats (repr: exact), strings, bools, None, lists and str-keyed dicts exactly.
    return tensors, {SCALARS: json.dumps(scalars).encode(), **rng}, cfg
