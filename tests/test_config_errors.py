"""Every bad configuration is refused with one line that names the setting (or file) and the fix."""

import dataclasses
import json
import shlex
import subprocess
from pathlib import Path

import pytest

from mbert_train.config import compose_config
from mbert_train.convert.common import write_model_dir
from mbert_train.engine import deepspeed_config
from mbert_train.model import MegatronBert, ModelConfig
from mbert_train.model.weights import (full_state_dict, load_full_from_dir, read_model_meta, shard_file,
                                       shard_state_dict)
from mbert_train.parallel.layout import ParallelDims
from mbert_train.train import HYDRA_SUBDIR, RUN_MARKER, run_dir_problem
from tests.test_model_reference import small_config
from tests.train_util import run_python, train, train_cli


def message(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("world, tp, needles", [
    (4, 3, ("world size 4", "parallel.tensor_parallel=3", "launch a multiple of 3")),
    (2, 0, ("parallel.tensor_parallel=0 must be >= 1",)),
    (1, 2, ("world size 1", "parallel.tensor_parallel=2")),
])
def test_parallel_dims_world_size(world, tp, needles):
    with pytest.raises(ValueError) as exc:
        ParallelDims(world_size=world, tensor_parallel=tp)
    assert all(n in message(exc) for n in needles), message(exc)


@pytest.mark.parametrize("changes, tp, needles", [
    (dict(num_heads=4), 8, ("model.num_heads=4", "parallel.tensor_parallel=8", "divides 4")),
    (dict(num_heads=4, hidden_size=36, intermediate_size=66), 4,
     ("model.intermediate_size=66", "parallel.tensor_parallel=4")),
])
def test_model_does_not_split_over_tp(changes, tp, needles):
    cfg = dataclasses.replace(small_config(), **changes)
    with pytest.raises(ValueError) as exc:
        ParallelDims(world_size=tp, tensor_parallel=tp).check_model(cfg)
    assert all(n in message(exc) for n in needles), message(exc)


@pytest.mark.parametrize("changes, needles", [
    (dict(hidden_size=30, num_heads=4), ("model.hidden_size=30", "model.num_heads=4")),
    (dict(num_layers=0), ("model.num_layers=0 must be positive",)),
    (dict(vocab_size=-1), ("model.vocab_size=-1",)),
    (dict(hidden_dropout=1.0), ("model.hidden_dropout=1.0", "[0, 1)")),
    (dict(attention_dropout=-0.1), ("model.attention_dropout=-0.1",)),
])
def test_model_config(changes, needles):
    with pytest.raises(ValueError) as exc:
        ModelConfig(**{**dataclasses.asdict(small_config()), **changes})
    assert all(n in message(exc) for n in needles), message(exc)


def test_hf_config_with_other_activation():
    hf = small_config().to_hf_dict() | {"hidden_act": "gelu_new"}
    with pytest.raises(ValueError) as exc:
        ModelConfig.from_hf_dict(hf)
    assert "hidden_act='gelu_new'" in message(exc)


def _checkpoint_of(cfg: ModelConfig) -> dict:
    """The full form (vocabulary unpadded) of a fresh model with `cfg`."""
    return full_state_dict(MegatronBert(cfg))


@pytest.mark.parametrize("changes, needles", [
    # Any other vocabulary size is refused, even one that would fit the padded rows.
    (dict(vocab_size=600), ("mlm_bias", "600 vocabulary rows", "model.vocab_size=301")),
    (dict(vocab_size=300), ("mlm_bias", "300 vocabulary rows", "model.vocab_size=301")),
    (dict(intermediate_size=128), ("mlp.fc1.weight", "(128, 32)", "(64, 32)", "model config")),
    (dict(hidden_size=48, num_heads=4), ("word_embeddings.weight", "(384, 48)", "(384, 32)", "model config")),
    (dict(num_layers=1), ("lacks", "layers.1.", "num_layers")),
    (dict(binary_head=False), ("lacks 4 tensors", "nsp.bias", "binary_head")),
])
def test_checkpoint_does_not_match_model_config(changes, needles):
    checkpoint = _checkpoint_of(dataclasses.replace(small_config(), **changes))
    with pytest.raises(ValueError) as exc:
        shard_state_dict(checkpoint, MegatronBert(small_config()))
    assert all(n in message(exc) for n in needles), message(exc)


@pytest.fixture()
def model_dir(tmp_path):
    cfg = small_config()
    return write_model_dir(_checkpoint_of(cfg), cfg, tmp_path / "model", 2)


def test_saved_model_dir_loads(model_dir):
    full, cfg = load_full_from_dir(model_dir)
    assert cfg == small_config() and full["word_embeddings.weight"].shape == (301, 32)


def test_missing_model_config(tmp_path):
    with pytest.raises(FileNotFoundError) as exc:
        read_model_meta(tmp_path)
    assert "model_config.json not found" in message(exc) and str(tmp_path) in message(exc)


def test_missing_shard(model_dir):
    (model_dir / shard_file(2, 1)).unlink()
    with pytest.raises(FileNotFoundError) as exc:
        load_full_from_dir(model_dir)
    assert f"{shard_file(2, 1)} is missing" in message(exc) and "incomplete" in message(exc)


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_truncated_shard(model_dir, keep):
    path = model_dir / shard_file(2, 0)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError) as exc:
        load_full_from_dir(model_dir)
    assert f"{shard_file(2, 0)} is truncated or corrupt" in message(exc)


def test_model_config_from_other_tp(model_dir):
    meta = json.loads((model_dir / "model_config.json").read_text())
    meta["tensor_parallel"] = 4
    (model_dir / "model_config.json").write_text(json.dumps(meta))
    with pytest.raises(FileNotFoundError) as exc:
        load_full_from_dir(model_dir)
    assert shard_file(4, 0) in message(exc)


# --- Settings and run dirs through the real CLIs: exit != 0, one line, no traceback. ----------

CONFIG_DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def _one_error_line(proc: subprocess.CompletedProcess, prog: str) -> str:
    """The error line of a failed CLI, checked to be its only error output."""
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"{prog}: error: "), proc.stderr
    return errors[0]


@pytest.mark.parametrize("override", ["optim.lr=nan", "optim.lr=inf", "trainer.grad_clip=-inf",
                                      "data.masked_lm_prob=nan", "model.layer_norm_eps=inf",
                                      "trainer.deepspeed.zero_optimization.reduce_bucket_size=nan"])
def test_non_finite_setting_names_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ValueError) as exc:
        compose_config([override])
    assert message(exc).startswith(f"{override} is not a finite number") and f"set {key} to" in message(exc)


@pytest.mark.slow
def test_non_finite_lr_through_the_cli(tmp_path, corpus_cache):
    """The real console entry in a new interpreter (the other run tests fork a preloaded one):
    exit status 2 and one line on stderr."""
    proc = train_cli(tmp_path / "run", corpus_cache, ["optim.lr=nan"], check=False, timeout=120)
    assert proc.returncode == 2
    assert "optim.lr=nan is not a finite number" in _one_error_line(proc, "mbert-train")


def test_documented_deepspeed_passthrough_composes():
    """docs/configuration.md's `trainer.deepspeed='{...}'` line, as the shell hands it over (Hydra used to
    refuse it with "not in struct"); tests/test_secrets.py trains with the same form."""
    (line,) = [line for line in CONFIG_DOC.read_text().splitlines() if line.startswith("mbert-train trainer.deepspeed=")]
    argv = shlex.split(line.split("#")[0])
    cfg = compose_config(argv[1:])
    assert cfg.trainer.deepspeed == {"zero_optimization": {"reduce_bucket_size": 2e8}}
    merged = deepspeed_config(cfg, data_parallel=1)["zero_optimization"]
    assert merged["reduce_bucket_size"] == 2e8 and merged["stage"] == 0
    # Still a typo elsewhere fails, and later overrides merge into the dict.
    with pytest.raises(Exception, match="trainer.deepspeedz"):
        compose_config(["trainer.deepspeedz={a: 1}"])
    more = compose_config([*argv[1:], "trainer.deepspeed.zero_optimization.allgather_bucket_size=1000"])
    assert more.trainer.deepspeed["zero_optimization"] == {"reduce_bucket_size": 2e8, "allgather_bucket_size": 1000}


def test_run_dir_kinds(tmp_path):
    assert run_dir_problem(tmp_path / "new") is None
    (tmp_path / "empty").mkdir()
    assert run_dir_problem(tmp_path / "empty") is None
    (tmp_path / "hydra_made" / HYDRA_SUBDIR).mkdir(parents=True)  # Hydra's own output dir
    assert run_dir_problem(tmp_path / "hydra_made") is None
    (tmp_path / "ours" / "hf").mkdir(parents=True)
    (tmp_path / "ours" / RUN_MARKER).write_text("")
    assert run_dir_problem(tmp_path / "ours") is None
    (tmp_path / "older" / "checkpoints" / "step_00000010").mkdir(parents=True)  # a run before the marker
    assert run_dir_problem(tmp_path / "older") is None
    (tmp_path / "theirs" / "checkpoints").mkdir(parents=True)
    (tmp_path / "theirs" / "checkpoints" / "latest").write_text("global_step10")  # not our layout
    assert "run.dir=" in run_dir_problem(tmp_path / "theirs")
    (tmp_path / "file").write_text("x")
    assert "is a file" in run_dir_problem(tmp_path / "file")


@pytest.mark.parametrize("case", ["user_files", "under_a_file"])
def test_run_dir_that_is_not_a_run_is_refused(tmp_path, corpus_cache, case):
    project = tmp_path / "project"
    (project / "hf").mkdir(parents=True)
    files = {"config.yaml": b"my: own config\n", "hf/model.bin": b"\x00weights", "notes.txt": b"keep me"}
    for name, data in files.items():
        (project / name).write_bytes(data)
    run_dir = project if case == "user_files" else project / "notes.txt" / "run"
    proc = train(run_dir, corpus_cache, ["trainer.max_steps=1"], check=False, timeout=120)
    line = _one_error_line(proc, "mbert-train")
    assert proc.returncode == 2 and f"run.dir={run_dir}" in line
    assert ("is not an mbert-train run dir" in line) if case == "user_files" else ("Not a directory" in line)
    # Nothing was written or removed: no .hydra/, no marker, the user's files as they were.
    listing = sorted(p.relative_to(project).as_posix() for p in project.rglob("*"))
    assert listing == ["config.yaml", "hf", "hf/model.bin", "notes.txt"]
    assert all((project / name).read_bytes() == data for name, data in files.items())


def test_diverged_run_is_one_line(tmp_path, corpus_cache):
    overrides = ["trainer.max_steps=4", "trainer.eval_every=0", "trainer.max_bad_steps=2", "trainer.inject_nan_at=[1,2]",
                 "trainer.export_hf=false", "logging.wandb_mode=disabled"]
    proc = train(tmp_path / "run", corpus_cache, overrides, check=False, timeout=300)
    assert proc.returncode == 2
    assert "consecutive non-finite steps" in _one_error_line(proc, "mbert-train")


def test_plot_of_a_binary_metrics_file_is_one_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_bytes(bytes(range(256)))
    proc = run_python("mbert_train.plot", [tmp_path], timeout=60)
    assert proc.returncode == 1 and "metrics.jsonl is not UTF-8 text" in _one_error_line(proc, "mbert-plot")


@pytest.mark.parametrize("overrides, needles", [
    (["parallel.sequence_parallel=true"], ("parallel.sequence_parallel=true", "tensor_parallel>1")),
    (["parallel.tensor_parallel=2", "parallel.sp_keep_gathered=true"],
     ("parallel.sp_keep_gathered=true", "parallel.sequence_parallel=true")),
])
def test_sequence_parallel_settings(overrides, needles):
    with pytest.raises(ValueError) as exc:
        compose_config(overrides)
    assert all(n in message(exc) for n in needles), message(exc)
