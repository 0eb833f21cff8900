"""A checkpoint of format 2, as mbert-train wrote them before the one-DCP state (tests/data/format2/,
written at commit 92fbd1a: TP=2, two ranks, step 3 of 6), is refused at resume in one line that
names the command upgrading it; upgraded in place by that command, the run continues with
exactly the losses the uninterrupted run logged after step 3."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mbert_train.convert.cli import main
from tests.train_util import losses, train

pytestmark = pytest.mark.slow

FIXTURE = Path(__file__).resolve().parent / "data" / "format2"
# With tests/train_util.FAST before them, the settings the fixture was trained with (its README).
EXTRA = ["data=prepared", f"data.path={FIXTURE / 'corpus'}", "model.hidden_size=32", "model.num_layers=1",
         "model.num_heads=2", "model.intermediate_size=64", "model.max_position_embeddings=64", "data.max_seq_length=32",
         "trainer.micro_batch_size=4", "optim.warmup_steps=2", "data.num_workers=0", "parallel.tensor_parallel=2",
         "trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.eval_every=0", "trainer.export_hf=false",
         "trainer.keep_last=2", "logging.wandb_mode=disabled"]


def test_a_format2_checkpoint_is_refused_then_upgraded_and_resumes_exactly(tmp_path, corpus_cache, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", run_dir)
    step = run_dir / "checkpoints" / "step_00000003"
    proc = train(run_dir, corpus_cache, EXTRA, nproc=2, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mbert-train: error: checkpoint {step} is in format 2 of an earlier mbert-train; upgrade it in place with "
        f"`mbert-convert upgrade-checkpoint {step}`, then rerun")

    assert main(["upgrade-checkpoint", str(step)]) == 0
    assert capsys.readouterr().out == f"{step}: upgraded to checkpoint format 3\n"
    meta = json.loads((step / "meta.json").read_text())
    assert meta["format"] == 3 and meta["commit"] == 1 and meta["layout"]["tensor_parallel"] == 2
    assert meta["run"]["config"]["trainer"]["max_steps"] == 6 and meta["model"]["hidden_size"] == 32
    assert {p.name for p in step.iterdir()} == {"meta.json", *meta["files"]} == {"meta.json", ".metadata",
                                                                                 "__0_0.distcp"}
    assert main(["upgrade-checkpoint", str(run_dir)]) == 0  # the run dir: every checkpoint, this one done
    assert capsys.readouterr().out == f"{step}: already in checkpoint format 3\n"

    proc = train(run_dir, corpus_cache, EXTRA, nproc=2)
    assert "resumed at step 3" in proc.stdout and "resharding" not in proc.stdout
    expected = {int(k): v for k, v in json.loads((FIXTURE / "losses.json").read_text()).items()}
    got = losses(run_dir)
    assert {s: got[s] for s in expected} == expected  # bit for bit: the RNG streams went through the upgrade


def test_upgrade_refuses_what_it_cannot_upgrade_in_one_line(tmp_path, capsys):
    old = tmp_path / "run" / "checkpoints" / "step_00000010"
    old.mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"step": 10, "commit": 1, "layout": {}}))
    assert main(["upgrade-checkpoint", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "format 1" in err and f"trainer.init_from={old}" in err
    shutil.copytree(FIXTURE / "run" / "checkpoints" / "step_00000003", old, dirs_exist_ok=True)
    (old / "trainer_state.pt").write_bytes((old / "trainer_state.pt").read_bytes()[:100])
    assert main(["upgrade-checkpoint", str(old)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint file {old / 'trainer_state.pt'} holds 100 bytes" in err, err
    assert json.loads((old / "meta.json").read_text())["format"] == 2  # untouched
    assert not list((old.parent).glob(".tmp-*"))
