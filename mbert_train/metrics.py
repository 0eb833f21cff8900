"""Rank-0 metrics: `metrics.jsonl`, Weights & Biases, a progress bar, FLOPs and MFU.

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
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from mbert_train.model.config import ModelConfig
from mbert_train.plan import count_parameters

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
REDACTED = "***"
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
    """Whether a config key (or override name) names a credential."""
    words = _key_words(key)
    return bool(_SECRET_WORDS.intersection(words)) or any(pair in _SECRET_PAIRS for pair in zip(words, words[1:]))


def _secret_values() -> list[str]:
    return [v for name in SECRET_ENV_VARS if len(v := os.environ.get(name, "")) >= 4]


def redact(config: Any) -> Any:
    """A copy of `config` with secret-named keys and known secret values replaced by `***`.

    Recurses through mappings, lists, tuples and dataclasses; a string that contains the
    value of a secret environment variable (say, a key pasted into a URL) is redacted too.
    """
    secrets = _secret_values()

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


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line overrides with secret values hidden: `logging.api_key=x` -> `...=***`."""
    out = []
    secrets = _secret_values()
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
def _redacted_sys_argv() -> Iterator[None]:
    # wandb copies sys.argv[1:] into the run's metadata file at init; give it a redacted copy
    # for that moment only.
    saved = sys.argv
    sys.argv = [saved[0], *redact_argv(saved[1:])] if saved else saved
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


class MetricsLogger:
    """Appends one JSON line per logged step to RUN_DIR/metrics.jsonl and mirrors it to W&B."""

    def __init__(self, run_dir: Path | str, *, rank: int, wandb_mode: str, project: str,
                 run_name: str | None, config: Mapping[str, Any], wandb_run_id: str | None,
                 resume_step: int | None = None) -> None:
        if wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode={wandb_mode!r} must be offline, online or disabled")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.rank = rank
        self.wandb_run_id = wandb_run_id
        self._run = None
        self._file = None
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None:
            self.truncate_after(resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        if wandb_mode != "disabled":
            try:
                self._start_wandb(wandb_mode, project, run_name, config)
            except Exception as exc:  # W&B trouble (service start, network) must not stop training
                self._run = None
                print(f"[mbert-train] warning: W&B did not start ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0] if str(exc) else ''}); metrics go to {self.path} only",
                      file=sys.stderr, flush=True)

    def _start_wandb(self, mode: str, project: str, run_name: str | None,
                     config: Mapping[str, Any]) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        # A fresh id chosen here (not by wandb) is known before init returns, so it can go
        # into the first checkpoint; resuming passes it back and W&B continues the same run.
        run_id = self.wandb_run_id or _new_run_id()
        with _redacted_sys_argv():
            self._run = wandb.init(mode=mode, dir=str(self.run_dir), project=project, name=run_name,
                                   id=run_id, resume="allow", config=redact(dict(config)),
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
        """Record `metrics` at `step`: one flushed JSON line, and a W&B row when enabled."""
        if self.rank != 0 or self._file is None:
            return
        record = {"step": int(step), "time": time.time(),
                  **{k: _scalar(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._run is not None:
            self._run.log({k: v for k, v in record.items() if k != "time"})

    def finish(self) -> None:
        """Close the file and the W&B run (safe to call twice)."""
        if self._file is not None:
            self._file.close()
            self._file = None
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


# Dense (no 2:4 sparsity) bf16/fp16 tensor-core peak TFLOP/s per device, from NVIDIA's and
# AMD's datasheets. Keys are the tokens of `torch.cuda.get_device_name()` that identify the
# part; the first entry whose tokens are all present wins, so variants come first.
PEAK_TFLOPS: list[tuple[frozenset[str], float]] = [
    (frozenset({"H100", "PCIE"}), 756.0),
    (frozenset({"H100", "NVL"}), 835.0),
    (frozenset({"GH200"}), 989.0),
    (frozenset({"H100"}), 989.0),
    (frozenset({"H200"}), 989.0),
    (frozenset({"H800"}), 989.0),
    (frozenset({"B200"}), 2250.0),
    (frozenset({"A100"}), 312.0),
    (frozenset({"A800"}), 312.0),
    (frozenset({"A10G"}), 125.0),
    (frozenset({"A10"}), 125.0),
    (frozenset({"L40S"}), 362.0),
    (frozenset({"L40"}), 181.0),
    (frozenset({"L4"}), 121.0),
    (frozenset({"A40"}), 150.0),
    (frozenset({"A6000"}), 155.0),
    (frozenset({"V100"}), 125.0),
    (frozenset({"T4"}), 65.0),
    (frozenset({"MI300X"}), 1307.0),
    (frozenset({"MI250X"}), 383.0),
]


_UNKNOWN_DEVICES_WARNED: set[str] = set()


def peak_tflops(device_name: str) -> float | None:
    """Peak dense 16-bit TFLOP/s of a GPU from its name, or None when it is not in the table."""
    tokens = set(re.findall(r"[A-Z0-9]+", device_name.upper()))
    for needed, tflops in PEAK_TFLOPS:
        if needed <= tokens:
            return tflops
    return None


def mfu(flops_per_step: float, step_time_s: float, n_devices: int, device: torch.device, *,
        peak_tflops_per_device: float | None = None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak (None on CPU).

    `flops_per_step` counts model FLOPs of all devices together (see
    `model_flops_per_token`); recomputation is deliberately not counted (Chowdhery et al.
    2022, PaLM, Appendix B). Pass `peak_tflops_per_device` for GPUs missing from the table.
    """
    if device.type != "cuda" or step_time_s <= 0:
        return None
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops_per_device or peak_tflops(name)
    if peak is None:
        if name not in _UNKNOWN_DEVICES_WARNED:
            _UNKNOWN_DEVICES_WARNED.add(name)
            log.warning("no peak TFLOP/s known for %r, so MFU is not reported; add it to "
                        "mbert_train.metrics.PEAK_TFLOPS", name)
        return None
    return flops_per_step / (step_time_s * n_devices * peak * 1e12)


def model_flops_per_token(model_cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) model FLOPs per token of MegatronBERT pretraining.

    Following PaLM's MFU definition (Chowdhery et al. 2022, App. B) and Megatron-LM's
    (Narayanan et al. 2021, Sec. 5.1), with a multiply-add as 2 FLOPs and backward = 2 x
    forward:

        6 N_tok + 6 N_seq / s + 12 L h s + 6 h V

    N_tok: non-embedding parameters applied to every token (layers, final LN, MLM head);
    N_seq: pooler and NSP head, applied once per sequence; 12 L h s: the attention score and
    context matmuls (QK^T and AV, 2 s h FLOPs each per token forward, bidirectional so no
    causal halving); 6 h V: the MLM decoder, whose weight is the tied word embedding and so
    is not in N_tok. V is the real vocabulary: padding is overhead, not model FLOPs.
    """
    p = count_parameters(model_cfg, vocab_multiple=1)
    h, layers, v = model_cfg.hidden_size, model_cfg.num_layers, model_cfg.vocab_size
    per_token = p.layers + p.final_layernorm + p.mlm_head
    per_sequence = p.pooler + p.nsp_head
    return 6 * per_token + 6 * per_sequence / seq_len + 12 * layers * h * seq_len + 6 * h * v
