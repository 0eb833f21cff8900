"""Rank-0 metrics: `metrics.jsonl`, Weights & Biases, TensorBoard, a progress bar, FLOPs and MFU.

Only rank 0 writes anything; on other ranks every method is a no-op so the trainer calls
them unconditionally. Secrets never reach disk: the config is redacted before W&B sees it,
the W&B API key is read by wandb from the environment only, and the argv wandb records in
its run metadata is redacted too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import secrets
import string
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

# FLOPs per token and device peaks live in mbert_train.arithmetic; the trainer imports them from here.
from mbert_train.arithmetic import model_flops_per_token, peak_tflops
from mbert_train.errors import UserError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
"""TensorBoard's event files, under the run dir: `tensorboard --logdir RUN_DIR/tensorboard`."""
REDACTED = "***"
MIN_SECRET_LEN = 4
"""Shorter values of secret keys are not scrubbed from other strings (they would match anywhere)."""
SECRET_ENV_VARS = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "AWS_SECRET_ACCESS_KEY")
"""Environment variables whose values are scrubbed wherever they appear in logged config."""

# Words that mark a key as secret when they appear as a whole word of the key name
# (split on `_`, `-`, `.` and camelCase): `hf_token` and `apiKey` match, `tokens_per_s` and
# `tokenizer` do not.
_SECRET_WORDS = {"token", "password", "passwd", "secret", "apikey", "credential", "credentials"}
_SECRET_PAIRS = {("api", "key"), ("private", "key"), ("access", "key")}


def _key_words(key: str) -> list[str]:
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", key)
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


def is_secret_key(key: str) -> bool:
    """Whether a config key (or override name) names a credential; identifiers (`pad_token_id`,
    `access_key_id`) do not."""
    words = _key_words(key)
    if words and words[-1] in ("id", "ids"):
        return False
    return bool(_SECRET_WORDS.intersection(words)) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def secret_values(config: Any = None) -> set[str]:
    """Values no file may hold: those of the secret environment variables, and every value
    under a secret-named key of `config` (so a key given as `+x.api_key=V` is also scrubbed
    from wherever else V turns up, such as Hydra's record of the command line)."""
    found = {v for name in SECRET_ENV_VARS if len(v := os.environ.get(name, "")) >= MIN_SECRET_LEN}

    def walk(value: Any, secret: bool) -> None:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, secret or is_secret_key(str(k)))
        elif isinstance(value, (list, tuple)):
            for v in value:
                walk(v, secret)
        elif secret and value is not None and not isinstance(value, bool) and len(str(value)) >= MIN_SECRET_LEN:
            found.add(str(value))

    walk(config, False)
    return found


def redact(config: Any, *, values: Iterable[str] = ()) -> Any:
    """A copy of `config` with secret-named keys and known secret values replaced by `***`.

    Recurses through mappings, lists, tuples and dataclasses; a string that contains a secret
    value (of a secret environment variable, of a secret-named key anywhere in `config`, or
    one of `values`), say a key pasted into a URL or an override string, is redacted too.
    """
    secrets = secret_values(config) | set(values)

    def walk(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            return {k: REDACTED if is_secret_key(str(k)) and v is not None else walk(v)
                    for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if isinstance(value, str) and any(s in value for s in secrets):
            return REDACTED
        return value

    return walk(config)


def redact_argv(argv: list[str], *, values: Iterable[str] = ()) -> list[str]:
    """Command-line overrides with secret values hidden: `logging.api_key=x` -> `...=***`; an
    argument holding a secret value (of `values` or the environment's) becomes `***`."""
    out = []
    secrets = secret_values() | set(values)
    for arg in argv:
        key, sep, _value = arg.partition("=")
        if sep and is_secret_key(key.lstrip("-+~").rsplit(".", 1)[-1]):
            out.append(f"{key}={REDACTED}")
        elif any(s in arg for s in secrets):
            out.append(REDACTED)
        else:
            out.append(arg)
    return out


@contextlib.contextmanager
def _redacted_sys_argv(values: Iterable[str]) -> Iterator[None]:
    # wandb copies sys.argv[1:] into the run's metadata file at init; give it a redacted copy
    # for that moment only.
    saved = sys.argv
    sys.argv = [saved[0], *redact_argv(saved[1:], values=values)] if saved else saved
    try:
        yield
    finally:
        sys.argv = saved


def _new_run_id() -> str:
    # W&B run ids allow [a-z0-9_-]; 10 random base-36 characters make clashes implausible.
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(10))


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item()
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def require_tensorboard() -> type:
    """torch's `SummaryWriter`, imported only when TensorBoard is on (it adds ~0.4 s to start-up);
    without the `tensorboard` package, a one-line error naming the setting and the install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("logging.tensorboard=true needs the tensorboard package: pip install tensorboard "
                        "(or the project's [tensorboard] extra), or set logging.tensorboard=false") from None
    return SummaryWriter


def tensorboard_tag(key: str) -> str:
    """A metrics.jsonl key's TensorBoard tag: `eval_mlm_loss` -> `eval/mlm_loss`, a duration in
    seconds (`checkpoint_s`, `eval_s`) -> `time/checkpoint_s`, any other (`loss`) -> `train/loss`."""
    if key.endswith("_s") and not key.endswith("_per_s"):
        return f"time/{key}"
    if key.startswith("eval_"):
        return f"eval/{key.removeprefix('eval_')}"
    return f"train/{key}"


class MetricsLogger:
    """Appends one JSON line per logged step to RUN_DIR/metrics.jsonl and mirrors it to W&B and
    TensorBoard (RUN_DIR/tensorboard) when they are on."""

    def __init__(self, run_dir: Path | str, *, rank: int, wandb_mode: str, project: str,
                 run_name: str | None, config: Mapping[str, Any], wandb_run_id: str | None,
                 resume_step: int | None = None, secrets: Iterable[str] = (),
                 tensorboard: bool = False) -> None:
        if wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode={wandb_mode!r} must be offline, online or disabled")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.rank = rank
        self.wandb_run_id = wandb_run_id
        self._run = None
        self._file = None
        self._tensorboard = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        if tensorboard:
            # TensorBoard hides every value at steps >= purge_step that was written before this
            # writer's start: the event files' counterpart of truncate_after.
            self._tensorboard = require_tensorboard()(
                log_dir=str(self.run_dir / TENSORBOARD_DIR),
                purge_step=None if resume_step is None else resume_step + 1)
        self._file = self.path.open("a", encoding="utf-8")
        if wandb_mode != "disabled":
            try:
                self._start_wandb(wandb_mode, project, run_name, config, set(secrets))
            except Exception as exc:  # W&B trouble (service start, network) must not stop training
                self._run = None
                print(f"[mbert-train] warning: W&B did not start ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); metrics go to {self.path} only",
                      file=sys.stderr, flush=True)

    def _start_wandb(self, mode: str, project: str, run_name: str | None,
                     config: Mapping[str, Any], secrets: set[str]) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        # A fresh id chosen here (not by wandb) is known before init returns, so it can go
        # into the first checkpoint; resuming passes it back and W&B continues the same run.
        run_id = self.wandb_run_id or _new_run_id()
        secrets = secrets | secret_values(config)
        with _redacted_sys_argv(secrets):
            self._run = wandb.init(mode=mode, dir=str(self.run_dir), project=project, name=run_name,
                                   id=run_id, resume="allow", config=redact(dict(config), values=secrets),
                                   settings=wandb.Settings(silent=True, console="off"))
        self.wandb_run_id = self._run.id
        # Plot everything against the trainer's step instead of wandb's internal counter: a
        # resumed run re-logs steps after its checkpoint, which wandb would otherwise drop
        # as "step less than current step".
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def truncate_after(self, step: int) -> None:
        """Drop lines with step > `step` (and any torn last line) so a resume has no duplicates."""
        if self.rank != 0 or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("step", math.inf) <= step:
                kept.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record `metrics` at `step`: one flushed JSON line, a W&B row and flushed TensorBoard
        scalars (the numeric values) when enabled."""
        if self.rank != 0 or self._file is None:
            return
        record = {"step": int(step), "time": time.time(),
                  **{k: _scalar(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._run is not None:
            self._run.log({k: v for k, v in record.items() if k != "time"})
        if self._tensorboard is not None:
            for key, value in record.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(tensorboard_tag(key), value, record["step"],
                                                 walltime=record["time"])
            self._tensorboard.flush()

    def finish(self) -> None:
        """Close the file, the W&B run and the TensorBoard writer (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._run is not None:
            self._run.finish()
            self._run = None


class ProgressBar:
    """Rank-0 tqdm bar over optimizer steps showing loss, lr, grad norm, tokens/s, memory, MFU."""

    def __init__(self, total_steps: int, *, rank: int, initial_step: int = 0) -> None:
        self._bar = None
        if rank != 0:
            return
        from tqdm import tqdm

        # Off a terminal (SLURM logs) every refresh is a new line, so refresh rarely there.
        interactive = sys.stderr.isatty()
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                         mininterval=0.5 if interactive else 30.0, file=sys.stderr)

    def update(self, step: int, *, loss: float, lr: float, grad_norm: float | None = None,
               tokens_per_s: float | None = None, memory_gib: float | None = None,
               mfu: float | None = None) -> None:
        """Move the bar to `step` and show the latest values (None values are omitted)."""
        if self._bar is None:
            return
        parts = [f"loss={loss:.4f}", f"lr={lr:.2e}"]
        if grad_norm is not None:
            parts.append(f"gnorm={grad_norm:.3f}")
        if tokens_per_s is not None:
            parts.append(f"tok/s={tokens_per_s:,.0f}")
        if memory_gib is not None:
            parts.append(f"mem={memory_gib:.1f}GiB")
        if mfu is not None:
            parts.append(f"mfu={100 * mfu:.1f}%")
        self._bar.set_postfix_str(" ".join(parts), refresh=False)
        self._bar.update(step - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory allocated by torch on `device` since start, or None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


_UNKNOWN_DEVICES_WARNED: set[str] = set()


def mfu(flops_per_step: float, step_time_s: float, n_devices: int, device: torch.device, *,
        peak_tflops_per_device: float | None = None, precision: str = "bf16") -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak (None on CPU).

    `flops_per_step` counts model FLOPs of all devices together (see
    `model_flops_per_token`); recomputation is deliberately not counted (Chowdhery et al.
    2022, PaLM, Appendix B). The peak is the device's for `precision` (bf16/fp16, tf32 or
    fp32, see `mbert_train.arithmetic.PEAK_TFLOPS`); pass `peak_tflops_per_device` for GPUs
    missing from the table.
    """
    if device.type != "cuda" or step_time_s <= 0:
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops_per_device or peak_tflops(name, precision)
    if peak is None:
        if name not in _UNKNOWN_DEVICES_WARNED:
            _UNKNOWN_DEVICES_WARNED.add(name)
            log.warning("no peak TFLOP/s known for %r, so MFU is not reported; add it to "
                        "mbert_train.arithmetic.PEAK_TFLOPS", name)
        return None
    return flops_per_step / (step_time_s * n_devices * peak * 1e12)
