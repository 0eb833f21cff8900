"""Capture and restore every random number generator a training step touches.

The state dict holds only tensors, ints, floats, strings, lists and dicts, so it survives
`torch.save` followed by `torch.load(weights_only=True)`: the unpickler used by
`weights_only` refuses arbitrary classes, which rules out NumPy arrays, so NumPy's key is
stored as an int64 tensor (as is `random`'s, which is compact that way).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _numpy_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state(legacy=True)
    # The Mersenne Twister key is 624 uint32 words; int64 holds them without sign trouble.
    return {
        "kind": str(kind),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached_gauss),
    }


def _restore_numpy(state: dict[str, Any]) -> None:
    keys = state["keys"].numpy().astype(np.uint32)
    np.random.set_state((state["kind"], keys, state["pos"], state["has_gauss"],
                         state["cached_gaussian"]))


def _python_state() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    # `internal` is 625 Python ints (624 words + index); values fit in int64.
    return {
        "version": int(version),
        "internal": torch.tensor(internal, dtype=torch.int64),
        "gauss_next": gauss_next,
    }


def _restore_python(state: dict[str, Any]) -> None:
    internal = tuple(int(v) for v in state["internal"].tolist())
    random.setstate((state["version"], internal, state["gauss_next"]))


def capture_rng_state() -> dict[str, Any]:
    """A `weights_only`-loadable snapshot of Python, NumPy, torch CPU and all CUDA RNGs."""
    state: dict[str, Any] = {
        "python": _python_state(),
        "numpy": _numpy_state(),
        "torch_cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put back a snapshot from `capture_rng_state`.

    A checkpoint written on a GPU machine can be resumed on a machine with a different
    number of devices: the common prefix of devices is restored and the rest keep their
    seeds, which is the best that can be done and is reported by the caller if it cares.
    """
    _restore_python(state["python"])
    _restore_numpy(state["numpy"])
    torch.set_rng_state(state["torch_cpu"])
    cuda_states = state.get("torch_cuda")
    if cuda_states and torch.cuda.is_available():
        n = min(len(cuda_states), torch.cuda.device_count())
        for device in range(n):
            torch.cuda.set_rng_state(cuda_states[device], device)
