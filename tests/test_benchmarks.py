"""The benchmark scripts run: each one dry-runs on CPU with its smallest shape and one step, as
`python benchmarks/SCRIPT` would (on a forked preloaded interpreter; gpu.sh as a real subprocess),
and prints its ratio line. Nothing here asserts on time (benchmarks are scripts)."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train_util import run_python

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TIMEOUT_S = 300
DRY = ["--steps", "1", "--warmup", "0"]


def _run(cmd: list[str], **kw) -> str:
    if cmd[0] == sys.executable:  # `python SCRIPT ARGS` or `python -m MODULE ARGS`
        target, args = (cmd[2], cmd[3:]) if cmd[1] == "-m" else (str(cmd[1]), cmd[2:])
        proc = run_python(target, args, cwd=ROOT, timeout=TIMEOUT_S, **kw)
    else:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S, **kw)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A small mbert-prep dataset (generated text: the shared corpora are not part of the repo)."""
    root = tmp_path_factory.mktemp("bench-data")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    docs = ["\n".join(" ".join(rng.choices(words, k=rng.randint(8, 30))) + " ." for _ in range(8))
            for _ in range(40)]
    text = root / "corpus.txt"
    text.write_text("\n\n".join(docs) + "\n")
    out = root / "prepared"
    _run([sys.executable, "-m", "data_prep.prep", str(text), "-o", str(out), "--vocab-size", "512", "--quiet"])
    return out


def test_bench_model_dry_run_on_our_pipelines_batches(dataset):
    out = _run([sys.executable, str(BENCH / "bench_model.py"), "--shapes", "tiny", *DRY, "--threads", "1",
                "--data", str(dataset)])
    assert f"batches: our data pipeline on {dataset}" in out and "dropout=0.1" in out
    assert re.search(r"^ratio tiny: time ref/ours \d+\.\d+x, step memory ref/ours \d+\.\d+x, "
                     r"ref/floor \d+\.\d+x, ours/floor \d+\.\d+x, ours/real floor \d+\.\d+x", out, re.M), out
    assert "| tiny | floor (GEMMs + AdamW) |" in out and "| tiny | floor on real tokens |" in out
    assert " ok |" in out  # dropout-0 losses agree


def test_bench_model_dry_run_modernbert(dataset):
    """ModernBERT against ModernBertForMaskedLM, with the modernbert-base preset's dropout (0) and
    data settings on our pipeline's batches; in one process to keep it short."""
    out = _run([sys.executable, str(BENCH / "bench_model.py"), "--shapes", "moderntiny", *DRY, "--threads", "1",
                "--in-process", "--data", str(dataset)])
    assert f"batches (modernbert-base): our data pipeline on {dataset} (modernbert-base preset: objective=none, " \
           f"masked_lm_prob=0.3" in out and "dropout=0.0" in out, out
    assert "reference attention: moderntiny sdpa;" in out, out
    assert re.search(r"^ratio moderntiny: time ref/ours \d+\.\d+x, step memory ref/ours \d+\.\d+x, "
                     r"ref/floor \d+\.\d+x, ours/floor \d+\.\d+x, ours/real floor \d+\.\d+x", out, re.M), out
    assert "| moderntiny | floor (GEMMs + AdamW) |" in out
    assert " ok |" in out  # dropout-0 losses agree


def test_bench_tp_dry_run():
    out = _run([sys.executable, str(BENCH / "bench_tp.py"), "--shape", "tiny", *DRY])
    assert "batches: SYNTHETIC" in out
    assert re.search(r"^ratio tiny: TP=2/TP=1 step time \d+\.\d+", out, re.M), out


def test_gpu_script_dry_run_writes_its_json(tmp_path):
    target = tmp_path / "gpu.json"
    out = _run(["bash", str(BENCH / "gpu.sh"), "--dry-run", str(target)],
               env={**os.environ, "PYTHON": sys.executable})
    assert "DRY RUN on CPU" in out and re.search(r"^ratio tiny: time ref/ours \d+\.\d+x", out, re.M), out
    assert re.search(r"^\| tiny \| 4 \| \d+% \| [\d.]+ \| [\d.]+ \| [\d.]+x \| [\d.]+% \| [\d.]+% \|", out, re.M), out
    result = json.loads(target.read_text())["tiny"]
    assert result["results"]["tiny"]["ours"]["mfu"] > 0 and result["summaries"]["tiny"]["real_tokens"] > 0


def test_gpu_script_refuses_a_machine_without_cuda(tmp_path):
    proc = subprocess.run(["bash", str(BENCH / "gpu.sh"), str(tmp_path / "x.json")], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S, env={**os.environ, "PYTHON": sys.executable,
                                                             "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr and not (tmp_path / "x.json").exists()


def test_bench_time_to_loss_smoke(dataset, tmp_path):
    """Both training paths run on the same windows, both are scored along the way by one evaluator,
    and the ratio lines agree with the JSON (the first may be 'not reached' on so few steps;
    nothing asserts on time)."""
    target = tmp_path / "ttl.json"
    out = _run([sys.executable, str(BENCH / "bench_time_to_loss.py"), "--data", str(dataset), "--smoke",
                "--threads", "1", "--json", str(target)])
    assert re.search(r"^\| HF Trainer \| 4 \| [\d.]+ \| \d+ \| \d+\.\d{4} \| 0\.\d{4} \|$", out, re.M), out
    assert re.search(r"^\| mbert-train \| 4 \| [\d.]+ \| \d+ \| \d+\.\d{4} \| 0\.\d{4} \|$", out, re.M), out
    assert re.search(r"^evaluator noise: standard error of the mean held-out loss .* HF 0\.\d{4}, ours 0\.\d{4}; "
                     r"of the paired difference", out, re.M), out
    first = re.search(r"^ratio: time to HF's final held-out loss ours/HF (\d+\.\d+x|not reached)", out, re.M)
    common = re.search(r"^ratio at a common target loss (\d+\.\d{4}) \(the larger final loss\): ours/HF "
                       r"(\d+\.\d+x) \(ours .* linear interpolation", out, re.M)
    step = re.search(r"^ratio: median step time ours/HF (\d+\.\d+x)", out, re.M)
    assert first and common and step, out
    result = json.loads(target.read_text())
    hf, ours, ratios = result["hf"], result["ours"], result["ratios"]
    assert [p["step"] for p in hf["curve"]] == [p["step"] for p in ours["curve"]] == [0, 2, 4]
    assert hf["curve"][0]["loss"] == ours["curve"][0]["loss"]  # one init, one evaluator
    assert len(hf["step_s"]) == len(ours["step_s"]) == 4
    for run in (hf, ours):
        assert run["curve"][-1]["loss"] == run["heldout_loss"] and 0 < run["heldout_sem"] < 1
        assert run["curve"][-1]["time_s"] == pytest.approx(run["train_s"]) == pytest.approx(sum(run["step_s"]))
    # HF's train_runtime counts its two model saves as well, which its step times leave out.
    assert hf["save_s"] > 0 and hf["runtime_s"] + 1e-3 >= hf["train_s"] + hf["save_s"]
    # A model that learned nothing scores about ln(vocab) = ln(512) = 6.24 on masked tokens.
    best = min(p["loss"] for p in ours["curve"][1:])
    assert 0 < hf["heldout_loss"] < 7 and 0 < best < 7
    assert (result["ratio"] is None) == (best > hf["heldout_loss"]) == (first.group(1) == "not reached")
    if result["ratio"] is not None:
        assert first.group(1) == f"{result['ratio']:.2f}x"
    # The common target both reach, each run's crossing inside the bracket of its first evaluation at or below it.
    shared = ratios["common_target"]
    assert shared["target"] == max(hf["heldout_loss"], ours["heldout_loss"])
    assert common.group(1) == f"{shared['target']:.4f}" and common.group(2) == f"{shared['ratio']:.2f}x"
    for run, at in ((hf, shared["hf"]), (ours, shared["ours"])):
        i = next(i for i, p in enumerate(run["curve"]) if p["loss"] <= shared["target"])
        assert i > 0 and run["curve"][i - 1]["time_s"] < at["time_s"] <= run["curve"][i]["time_s"]
    assert shared["ratio"] == pytest.approx(shared["ours"]["time_s"] / shared["hf"]["time_s"])
    assert step.group(1) == f"{ratios['step_time']:.2f}x"


def test_bench_sp_dry_run():
    out = _run([sys.executable, str(BENCH / "bench_sp.py"), "--hidden", "64", "--heads", "4", "--intermediate", "256",
                "--seq", "64", "--vocab", "64", "--layers", "6"])
    assert "SP on / off (one layer): activations" in out and "TP traffic" in out
    assert "SP on / off (6 layers, checkpointed): peak activations" in out
    result = json.loads(out.split("JSON ", 1)[1])
    off, on = result["off"], result["on"]
    # Counted, not timed: SP must hold fewer activation bytes per rank than SP off, per layer and
    # at the peak of the checkpointed stack, where each layer keeps less (its input's chunk).
    assert on["activation_bytes_per_layer"] < off["activation_bytes_per_layer"]
    assert on["checkpointed"]["peak_activation_bytes"] < off["checkpointed"]["peak_activation_bytes"]
    assert on["checkpointed"]["checkpoint_bytes_per_layer"] < off["checkpointed"]["checkpoint_bytes_per_layer"]
    # What the peak leaves out is exactly the parameter gradients, the same with SP on and off.
    assert on["checkpointed"]["gradient_bytes_excluded"] == off["checkpointed"]["gradient_bytes_excluded"] > 0


def test_bench_checkpoint_dry_run():
    out = _run([sys.executable, str(BENCH / "bench_checkpoint.py"), "--shape", "tiny", "--tp", "2"])
    assert "peak RSS resume / train+save (worst rank):" in out
    result = json.loads(out.split("JSON ", 1)[1])
    assert len(result["ranks"]) == 2
    assert all(r["bytes_read"] > 0 and r["bytes_written"] > 0 and r["resume_peak"] > 0 for r in result["ranks"])
