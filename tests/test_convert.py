"""mbert-convert: HF -> TP shards -> HF is bit-exact at TP 1/2/4, loads into the reference with the same
logits, and every bad input is refused with one line naming the file or setting."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import MegatronBertForMaskedLM, MegatronBertForPreTraining

from mbert_train.convert import export_hf, import_hf, main
from mbert_train.model import MegatronBert
from mbert_train.model.weights import load_full_from_dir, shard_file, shard_state_dict
from tests.dist import spawn
from tests.test_model_reference import TOL, make_batch, reference_model, small_config


@pytest.fixture(scope="module")
def reference():
    return reference_model(small_config()).eval()


@pytest.fixture(scope="module")
def hf_dir(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "megatron-bert"
    reference.save_pretrained(path)
    return path


def convert(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def error_of(capsys, *argv) -> str:
    """Run the CLI expecting a refusal; return its message after checking it is one line."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbert-convert: error: ") and err.count("\n") == 1, err
    return err


def assert_same_hf_weights(expected_file, actual_file) -> None:
    expected, actual = load_file(str(expected_file)), load_file(str(actual_file))
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                     attention_mask=batch["attention_mask"]).prediction_logits


@pytest.mark.parametrize("tp", [2, 4])
def test_round_trip_is_bit_exact_and_loads_into_the_reference(tp, reference, hf_dir, tmp_path):
    convert("from-hf", hf_dir, tmp_path / "ours", "--tp", tp)
    meta = json.loads((tmp_path / "ours" / "model_config.json").read_text())
    assert meta["tensor_parallel"] == tp and meta["padded_vocab"] == 128 * tp * -(-301 // (128 * tp))
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == sorted(
        ["model_config.json"] + [shard_file(tp, r) for r in range(tp)])
    convert("to-hf", tmp_path / "ours", tmp_path / "back")
    assert_same_hf_weights(hf_dir / "model.safetensors", tmp_path / "back" / "model.safetensors")
    model, info = MegatronBertForPreTraining.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    batch = make_batch(small_config())
    assert torch.equal(logits(model.eval(), batch), logits(reference, batch))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "staging directory left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "ours").iterdir()} == {0o666 & ~umask}


def test_pytorch_model_bin_and_sharded_index_inputs(reference, hf_dir, tmp_path):
    bin_dir = tmp_path / "bin"
    reference.config.save_pretrained(bin_dir)
    torch.save(reference.state_dict(), bin_dir / "pytorch_model.bin")  # carries the tied decoder copies
    convert("from-hf", bin_dir, tmp_path / "from_bin", "--tp", 2)
    convert("to-hf", tmp_path / "from_bin", tmp_path / "back_bin")
    assert_same_hf_weights(hf_dir / "model.safetensors", tmp_path / "back_bin" / "model.safetensors")

    reference.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    convert("from-hf", tmp_path / "sharded", tmp_path / "from_index")
    convert("to-hf", tmp_path / "from_index", tmp_path / "back_index")
    assert_same_hf_weights(hf_dir / "model.safetensors", tmp_path / "back_index" / "model.safetensors")


def test_mlm_only_model_round_trips_as_masked_lm(tmp_path):
    cfg = small_config()
    torch.manual_seed(3)
    hf = reference_model(cfg)
    mlm = MegatronBertForMaskedLM(hf.config)
    mlm.save_pretrained(tmp_path / "mlm")
    full, ours = import_hf(tmp_path / "mlm")
    assert not ours.binary_head and "pooler.weight" not in full
    export_hf(full, ours, tmp_path / "back")
    assert_same_hf_weights(tmp_path / "mlm" / "model.safetensors", tmp_path / "back" / "model.safetensors")
    _, info = MegatronBertForMaskedLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_to_hf_follows_run_dir_latest_and_step_dirs(hf_dir, tmp_path):
    run = tmp_path / "run"
    convert("from-hf", hf_dir, run / "checkpoints" / "step_00000010", "--tp", 2)
    (run / "checkpoints" / "latest").write_text("step_00000010\n")
    convert("to-hf", run, tmp_path / "from_run")
    assert_same_hf_weights(hf_dir / "model.safetensors", tmp_path / "from_run" / "model.safetensors")
    convert("to-hf", run / "checkpoints" / "step_00000010", tmp_path / "from_step")
    assert_same_hf_weights(hf_dir / "model.safetensors", tmp_path / "from_step" / "model.safetensors")


def test_overwrite_replaces_out_dir(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert "already exists" in error_of(capsys, "from-hf", hf_dir, out, "--tp", 2)
    assert (out / "stale.txt").is_file()
    convert("from-hf", hf_dir, out, "--tp", 2, "--overwrite")
    assert not (out / "stale.txt").exists() and (out / shard_file(2, 1)).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_runs_as_a_module(hf_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mbert_train.convert", "from-hf", str(hf_dir), str(tmp_path / "o"),
                           "--tp", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "trainer.init_from=" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "mbert_train.convert", "to-hf", str(tmp_path / "nope"),
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "nope" in bad.stderr


def _rank_check(model_dir: str, hf_dir: str) -> None:
    """On each TP rank: the from-hf shard equals `shard_state_dict` of the full form, and the model
    built from it gives the reference's logits."""
    group = dist.group.WORLD
    cfg = small_config()
    full, saved_cfg = load_full_from_dir(model_dir)
    assert saved_cfg == cfg
    model = MegatronBert(cfg, group, mlm_masked_only=False).eval()
    state = shard_state_dict(full, model)
    on_disk = load_file(f"{model_dir}/{shard_file(2, dist.get_rank())}")
    assert state.keys() == on_disk.keys()
    for name, tensor in state.items():
        assert torch.equal(on_disk[name], tensor), name
    model.load_state_dict(state)
    batch = make_batch(cfg)
    with torch.no_grad():
        out = model(**batch)
    reference = MegatronBertForPreTraining.from_pretrained(hf_dir).eval()
    torch.testing.assert_close(model.gather_logits(out.mlm_logits), logits(reference, batch), **TOL)


def test_tp2_model_from_converted_dir_matches_reference(hf_dir, tmp_path):
    convert("from-hf", hf_dir, tmp_path / "tp2", "--tp", 2)
    spawn(_rank_check, 2, str(tmp_path / "tp2"), str(hf_dir))


def _edit_json(path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_from_hf_refuses_bad_inputs(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert "missing" in error_of(capsys, "from-hf", tmp_path / "missing", out)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert "bare/config.json not found" in error_of(capsys, "from-hf", bare, out)
    no_weights = _copy(hf_dir, tmp_path / "no_weights")
    (no_weights / "model.safetensors").unlink()
    assert "holds no weights" in error_of(capsys, "from-hf", no_weights, out)
    cut = _copy(hf_dir, tmp_path / "cut")
    _truncate(cut / "model.safetensors")
    assert "cut/model.safetensors is truncated or corrupt" in error_of(capsys, "from-hf", cut, out)
    cut_bin = tmp_path / "cut_bin"
    cut_bin.mkdir()
    shutil.copy(hf_dir / "config.json", cut_bin)
    torch.save(load_file(str(hf_dir / "model.safetensors")), cut_bin / "pytorch_model.bin")
    _truncate(cut_bin / "pytorch_model.bin")
    assert "pytorch_model.bin is truncated or corrupt" in error_of(capsys, "from-hf", cut_bin, out)
    assert not out.exists()


@pytest.mark.parametrize("changes, tp, needle", [
    (dict(vocab_size=300), 1, "bert.embeddings.word_embeddings.weight has shape (301, 32)"),
    (dict(intermediate_size=128), 1, "intermediate.dense.weight has shape (64, 32)"),
    (dict(num_hidden_layers=3), 1, "lacks 16 tensors"),
    (dict(num_hidden_layers=1), 1, "does not describe (first: bert.encoder.layer.1."),
    (dict(), 3, "--tp 3 does not fit"),
    (dict(intermediate_size=66), 4, "model.intermediate_size=66 is not divisible by parallel.tensor_parallel=4"),
    (dict(), 0, "parallel.tensor_parallel=0 must be >= 1"),
    (dict(hidden_act="relu"), 1, "hidden_act='relu' is not supported"),
    (dict(num_attention_heads=5), 1, "model.hidden_size=32 is not divisible by model.num_heads=5"),
    (dict(tie_word_embeddings=False), 1, "tie_word_embeddings=false"),
])
def test_from_hf_refuses_config_weight_mismatch(changes, tp, needle, hf_dir, tmp_path, capsys):
    bad = _copy(hf_dir, tmp_path / "bad")
    _edit_json(bad / "config.json", **changes)
    err = error_of(capsys, "from-hf", bad, tmp_path / "out", "--tp", tp)
    assert needle in err and "config.json" in err
    assert not (tmp_path / "out").exists()


def test_to_hf_refuses_bad_inputs(hf_dir, tmp_path, capsys):
    ours = tmp_path / "ours"
    convert("from-hf", hf_dir, ours, "--tp", 2)
    out = tmp_path / "out"
    assert "not an mbert-train model" in error_of(capsys, "to-hf", hf_dir, out)
    assert "does not exist" in error_of(capsys, "to-hf", tmp_path / "missing", out)
    missing = _copy(ours, tmp_path / "missing_shard")
    (missing / shard_file(2, 1)).unlink()
    assert f"{shard_file(2, 1)} is missing" in error_of(capsys, "to-hf", missing, out)
    cut = _copy(ours, tmp_path / "cut")
    _truncate(cut / shard_file(2, 0))
    assert f"{shard_file(2, 0)} is truncated or corrupt" in error_of(capsys, "to-hf", cut, out)
    reshaped = _copy(ours, tmp_path / "reshaped")
    meta = json.loads((reshaped / "model_config.json").read_text())
    meta["model"]["intermediate_size"] = 128
    (reshaped / "model_config.json").write_text(json.dumps(meta))
    assert "layers.0.mlp.fc1.weight has shape (64, 32) but its model_config.json implies (128, 32)" in error_of(
        capsys, "to-hf", reshaped, out)
    meta["model"].update(intermediate_size=64, num_heads=5)
    (reshaped / "model_config.json").write_text(json.dumps(meta))
    assert ("model_config.json is corrupt or from another tool (model.hidden_size=32 is not divisible by "
            "model.num_heads=5") in error_of(capsys, "to-hf", reshaped, out)
    garbled = _copy(ours, tmp_path / "garbled")
    (garbled / "model_config.json").write_text("{not json")
    assert "garbled/model_config.json is corrupt or from another tool (Expecting property name" in error_of(
        capsys, "to-hf", garbled, out)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    assert "checkpoints/latest not found" in error_of(capsys, "to-hf", run, out)
    (run / "checkpoints" / "latest").write_text("step_00000100\n")
    assert "names 'step_00000100'" in error_of(capsys, "to-hf", run, out)
    assert "is the input directory" in error_of(capsys, "to-hf", ours, ours, "--overwrite")
    assert not out.exists()
