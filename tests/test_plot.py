"""mbert-plot: curves from metrics.jsonl, eval keys on some lines, clear errors."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest

from mbert_train import metrics, plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_metrics(run_dir, n=20, *, torn_tail=False):
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, n + 1):
        record = {"step": step, "loss": 10 / step + 1, "mlm_loss": 9 / step + 0.8,
                  "nsp_loss": 0.7 / math.sqrt(step), "lr": 1e-4 * min(1, step / 5),
                  "grad_norm": 2.0 / step, "tokens_per_s": 1000.0 + step}
        if step % 5 == 0:
            record |= {"eval_mlm_loss": 9 / step + 1.0, "eval_nsp_loss": 0.6}
        lines.append(json.dumps(record))
    text = "\n".join(lines) + "\n" + ('{"step": 21, "lo' if torn_tail else "")
    (run_dir / "metrics.jsonl").write_text(text)


def test_file_name_matches_the_logger():
    assert plot.METRICS_FILE == metrics.METRICS_FILE


def test_series_and_eval_keys(tmp_path):
    _write_metrics(tmp_path, torn_tail=True)
    records = plot.read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 20
    steps, values = plot.series(records, "eval_mlm_loss")
    assert steps == [5, 10, 15, 20] and values[0] == pytest.approx(2.8)
    assert plot._panel_keys(records, ["loss", "mlm_loss", "nsp_loss"]) == [
        "loss", "mlm_loss", "nsp_loss", "eval_mlm_loss", "eval_nsp_loss"]


def test_main_writes_png_to_default_and_custom_path(tmp_path, capsys):
    _write_metrics(tmp_path / "run")
    plot.main([str(tmp_path / "run")])
    assert (tmp_path / "run" / "curves.png").read_bytes()[:8] == PNG_MAGIC
    assert "20 logged steps" in capsys.readouterr().out
    plot.main([str(tmp_path / "run"), "--out", str(tmp_path / "figs" / "c.png")])
    assert (tmp_path / "figs" / "c.png").read_bytes()[:8] == PNG_MAGIC


def test_partial_keys_still_plot(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": NaN}\n')
    out = plot.plot_curves(plot.read_metrics(tmp_path / "metrics.jsonl"), tmp_path / "p.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("content,expected", [
    (None, "not found"), ("", "has no metrics yet"), ("\n\n", "has no metrics yet"),
    ('{"step": 1}\nnot json\n{"step": 3}\n', "metrics.jsonl:2 is not valid JSON")])
def test_missing_empty_or_corrupt_file_is_one_line_error(tmp_path, capsys, content, expected):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(SystemExit) as info:
        plot.main([str(tmp_path)])
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert expected in err and err.startswith("mbert-plot: error:") and "\n" not in err


@pytest.mark.slow
def test_console_script(tmp_path):
    exe = shutil.which("mbert-plot")
    assert exe, "mbert-plot is not installed; run `pip install -e . --no-deps`"
    _write_metrics(tmp_path)
    done = subprocess.run([exe, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "curves.png").is_file()
    missing = subprocess.run([exe, str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
