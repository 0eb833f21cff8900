"""`mbert-plot RUN_DIR [--out PATH]`: loss, learning-rate and throughput curves to a PNG.

Reads the `metrics.jsonl` that `MetricsLogger` writes (one JSON object per logged step).
Training keys (loss, mlm_loss, nsp_loss, lr, grad_norm, tokens_per_s) are on every train
line; evaluation keys (`eval_*`) appear only on the steps where evaluation ran, so every
series is plotted over the steps that carry it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from mbert_train.errors import UserError, describe_os_error, first_line

# Same name as `mbert_train.metrics.METRICS_FILE`; not imported from there so that plotting
# does not pay for importing torch.
METRICS_FILE = "metrics.jsonl"

# Panels and the series each draws, in order; keys missing from the file are skipped.
PANELS: list[tuple[str, list[str], bool]] = [
    ("loss", ["loss", "mlm_loss", "nsp_loss"], True),
    ("learning rate", ["lr"], False),
    ("grad norm", ["grad_norm"], True),
    ("throughput (tokens/s)", ["tokens_per_s"], False),
]
"""(title, series keys, log-scale y) per panel; eval_* keys join the panel of their base key."""


class PlotError(UserError):
    """Metrics are missing or unusable; the message is one line for the command line."""


def read_metrics(path: Path) -> list[dict]:
    """Records of a metrics.jsonl, skipping a torn last line left by a crash."""
    if not path.is_file():
        raise PlotError(f"{path} not found; pass the run directory the trainer wrote (run.dir)")
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise PlotError(f"{path} is not UTF-8 text; pass the run directory the trainer wrote (run.dir)") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise PlotError(f"{path}:{number} is not valid JSON; the file is corrupt") from None
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    if not records:
        raise PlotError(f"{path} has no metrics yet; plot again after the first logged step")
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the records that carry a finite number for it."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def _panel_keys(records: list[dict], keys: list[str]) -> list[str]:
    present = set().union(*(r.keys() for r in records))
    # eval_mlm_loss joins the loss panel next to mlm_loss, and so on.
    chosen = [k for k in keys if k in present]
    chosen += [f"eval_{k}" for k in keys if f"eval_{k}" in present]
    return chosen


def plot_curves(records: list[dict], out: Path, *, title: str = "") -> Path:
    """Draw every panel with data into `out` (PNG) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, keys, log_y) for name, raw, log_y in PANELS
              if (keys := _panel_keys(records, raw))]
    if not panels:
        raise PlotError("metrics.jsonl has none of the keys "
                        + ", ".join(k for _, raw, _ in PANELS for k in raw))
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.8 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (name, keys, log_y) in zip(axes[:, 0], panels):
        colors: dict[str, str] = {}
        for key in keys:
            steps, values = series(records, key)
            base = key.removeprefix("eval_")
            # An eval curve takes its training curve's colour, dashed with markers.
            style = "o--" if key.startswith("eval_") else "-"
            (line,) = ax.plot(steps, values, style, label=key, markersize=3, linewidth=1.2,
                              color=colors.get(base))
            colors.setdefault(base, line.get_color())
        if log_y and all(v > 0 for k in keys for v in series(records, k)[1]):
            ax.set_yscale("log")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1, 0].set_xlabel("step")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mbert-plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    out = args.out or args.run_dir / "curves.png"
    try:
        records = read_metrics(args.run_dir / METRICS_FILE)
        plot_curves(records, out, title=str(args.run_dir))
    except (UserError, OSError) as exc:  # bad metrics, or a path that cannot be read or written
        if isinstance(exc, OSError):
            message = describe_os_error(exc, exc.filename or out, "accessing")
        else:
            message = first_line(exc)
        print(f"mbert-plot: error: {message}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"wrote {out} ({len(records)} logged steps)")


if __name__ == "__main__":
    main()
