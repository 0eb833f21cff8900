"""mbert-convert: HF -> TP shards -> HF is bit-exact at TP 1/2/4, loads into the reference with the same
logits, and every bad input is refused with one line naming the file or setting."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import MegatronBertForMaskedLM, MegatronBertForPreTraining

from mbert_train.convert import main
from mbert_train.convert.common import MARKER
from mbert_train.convert.hf import export_hf, import_hf
from mbert_train.model import MegatronBert
from mbert_train.model.weights import load_full_from_dir, shard_file, shard_state_dict
from tests.dist import spawn
from tests.test_model_reference import (
    TOL,
    full_vocab_logits,
    make_batch,
    reference_model,
    small_config,
)


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
        [MARKER, "model_config.json"] + [shard_file(tp, r) for r in range(tp)])
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


def test_to_hf_names_the_class_that_loads_the_export(hf_dir, tmp_path, capsys):
    cfg = small_config()
    MegatronBertForMaskedLM(reference_model(cfg).config).save_pretrained(tmp_path / "mlm")
    for source, cls in ((hf_dir, "MegatronBertForPreTraining"), (tmp_path / "mlm", "MegatronBertForMaskedLM")):
        convert("from-hf", source, tmp_path / f"{cls}_model")
        assert main(["to-hf", str(tmp_path / f"{cls}_model"), str(tmp_path / cls)]) == 0
        out = capsys.readouterr()
        # A model dir records no dataset: the weights and the card, and the line says how to add a tokenizer.
        assert f"load it with {cls}.from_pretrained(" in out.out and "--dataset DIR" in out.out
        assert "warning" not in out.err
        assert sorted(p.name for p in (tmp_path / cls).iterdir()) == [".mbert-convert.json", "README.md",
                                                                     "config.json", "model.safetensors"]
        assert f"{cls}: 2 layers" in (tmp_path / cls / "README.md").read_text()


def test_to_hf_follows_run_dir_latest_and_step_dirs(hf_dir, tmp_path):
    run = tmp_path / "run"
    make_checkpoint(hf_dir, run, 10)
    convert("to-hf", run, tmp_path / "from_run")
    assert_same_hf_weights(hf_dir / "model.safetensors", tmp_path / "from_run" / "model.safetensors")
    convert("to-hf", run / "checkpoints" / "step_00000010", tmp_path / "from_step")
    assert_same_hf_weights(hf_dir / "model.safetensors", tmp_path / "from_step" / "model.safetensors")


def make_checkpoint(hf_dir, run, step: int) -> None:
    """A complete checkpoint (model files + meta.json) of `run` at `step`, named by `latest`."""
    tag = f"step_{step:08d}"
    convert("from-hf", hf_dir, run / "checkpoints" / tag, "--tp", 2)
    (run / "checkpoints" / tag / "meta.json").write_text(json.dumps({"step": step}))
    (run / "checkpoints" / "latest").write_text(tag + "\n")


def snapshot(root) -> dict:
    """Every file under `root` (relative path -> bytes), to prove a refusal touched nothing."""
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_replaces_only_an_earlier_conversion_output(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    convert("from-hf", hf_dir, out, "--tp", 2)
    err = error_of(capsys, "from-hf", hf_dir, out)
    assert "already exists (an earlier mbert-convert output)" in err and "--overwrite" in err
    convert("to-hf", out, tmp_path / "hf_out")
    convert("from-hf", hf_dir, out, "--overwrite")  # replaces our own model dir, TP 2 -> 1
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "model_config.json", shard_file(1, 0)]
    convert("to-hf", out, tmp_path / "hf_out", "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf_out", "out"]  # no staging leftovers
    # Written before the marker existed (and before the model card): exactly our file set is
    # still recognised.
    (tmp_path / "hf_out" / MARKER).unlink()
    (tmp_path / "hf_out" / "README.md").unlink()
    (out / MARKER).unlink()
    convert("to-hf", out, tmp_path / "hf_out", "--overwrite")
    convert("from-hf", hf_dir, out, "--overwrite")
    assert (tmp_path / "hf_out" / MARKER).is_file() and (out / MARKER).is_file()


def test_overwrite_never_deletes_a_folder_that_is_not_ours(hf_dir, reference, tmp_path, capsys):
    unrelated = tmp_path / "unrelated"
    (unrelated / "sub").mkdir(parents=True)
    (unrelated / "notes.txt").write_text("mine")
    (unrelated / "sub" / "data.bin").write_bytes(b"\x00\x01")
    saved = tmp_path / "saved"  # a user's own save_pretrained: config.json + model.safetensors too
    reference.save_pretrained(saved)
    ours_plus = tmp_path / "ours_plus"  # an export the user added a tokenizer to
    convert("to-hf", _model_dir(hf_dir, tmp_path), ours_plus)
    (ours_plus / "vocab.txt").write_text("[PAD]\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(unrelated)
    before = snapshot(tmp_path)
    capsys.readouterr()  # save_pretrained's progress bar
    for out, why in [(unrelated, f"it has no {MARKER}"), (saved, f"it has no {MARKER}"),
                     (ours_plus, "it also holds 'vocab.txt'"), (a_file, "it is not a directory"),
                     (link, "it is a symbolic link")]:
        for flag in ([], ["--overwrite"]):
            for argv in (["from-hf", hf_dir, out], ["to-hf", tmp_path / "model", out]):
                err = error_of(capsys, *argv, *flag)
                assert f"{out} exists and is not an mbert-convert output ({why}" in err, err
                assert "will not be deleted" in err and "--overwrite" not in err
        with pytest.raises(ValueError, match="not an mbert-convert output"):
            export_hf(*import_hf(hf_dir), out, overwrite=True)
    assert snapshot(tmp_path) == before and link.is_symlink()


def _model_dir(hf_dir, tmp_path):
    convert("from-hf", hf_dir, tmp_path / "model")
    return tmp_path / "model"


@pytest.mark.parametrize("case", ["out_contains_input", "run_dir_as_out", "out_inside_input", "out_is_input_link",
                                  "out_is_step_of_run"])
def test_out_dir_overlapping_the_input_is_refused(case, hf_dir, tmp_path, capsys):
    proj = tmp_path / "proj"
    shutil.copytree(hf_dir, proj / "hf")
    (proj / "notes.txt").write_text("mine")
    run = tmp_path / "run"
    make_checkpoint(hf_dir, run, 10)
    (run / "config.yaml").write_text("model: {}\n")
    (tmp_path / "hf_link").symlink_to(proj / "hf")
    argv, where = {
        "out_contains_input": (["from-hf", proj / "hf", proj], "contains"),
        "run_dir_as_out": (["to-hf", run / "checkpoints" / "step_00000010", run], "contains"),
        "out_inside_input": (["from-hf", proj / "hf", proj / "hf" / "tp1"], "is inside"),
        "out_is_input_link": (["from-hf", proj / "hf", tmp_path / "hf_link"], "is"),
        "out_is_step_of_run": (["to-hf", run, run / "checkpoints" / "step_00000010"], "is inside"),
    }[case]
    before = snapshot(tmp_path)
    for flag in ([], ["--overwrite"]):
        err = error_of(capsys, *argv, *flag)
        assert f"OUT_DIR {argv[2]} {where} the input directory" in err, err
    assert snapshot(tmp_path) == before


def test_a_kill_mid_swap_is_repaired_by_the_next_convert(hf_dir, tmp_path, capsys):
    """A writer killed between moving OUT aside and renaming its new OUT in leaves only
    `.OUT.old-PID-HEX`: the next convert puts it back before judging OUT, and deletes the dead
    writer's `.OUT.tmp-*`."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "out"
    convert("from-hf", hf_dir, out, "--tp", 2)
    before = snapshot(out)
    out.rename(tmp_path / f".out.old-{dead.pid}-0123abcd")
    (tmp_path / f".out.tmp-{dead.pid}-4567cdef").mkdir()
    (tmp_path / f".out.tmp-{dead.pid}-4567cdef" / "model_config.json").write_text("{")
    assert "already exists (an earlier mbert-convert output)" in error_of(capsys, "from-hf", hf_dir, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and snapshot(out) == before
    out.rename(tmp_path / f".out.old-{dead.pid}-89abcdef")
    convert("from-hf", hf_dir, out, "--overwrite")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / shard_file(1, 0)).is_file()
    # The run-end export (`train.finish`) goes through the same helper.
    run_hf = tmp_path / "run" / "hf"
    full, cfg = import_hf(hf_dir)
    export_hf(full, cfg, run_hf, overwrite=True)
    (tmp_path / "run" / f".hf.tmp-{dead.pid}-0badcafe").mkdir()
    export_hf(full, cfg, run_hf, overwrite=True)  # replaces its own previous export
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["hf"]
    assert_same_hf_weights(hf_dir / "model.safetensors", run_hf / "model.safetensors")


def test_to_hf_never_follows_latest_outside_the_run(hf_dir, tmp_path, capsys):
    run = tmp_path / "run"
    make_checkpoint(hf_dir, run, 10)
    outside = tmp_path / "x"  # another model, where `latest = ../../x` points from checkpoints/
    full, cfg = import_hf(hf_dir)
    from mbert_train.convert.common import write_model_dir
    write_model_dir({k: torch.zeros_like(v) for k, v in full.items()}, cfg, outside, 1)
    (outside / "meta.json").write_text("{}")
    (run / "checkpoints" / "latest").write_text("../../x\n")
    assert (run / "checkpoints" / "../../x" / "model_config.json").is_file()
    assert main(["to-hf", str(run), str(tmp_path / "out")]) == 0
    assert "names '../../x', which is not a complete checkpoint" in capsys.readouterr().err
    assert_same_hf_weights(hf_dir / "model.safetensors", tmp_path / "out" / "model.safetensors")
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    err = error_of(capsys, "to-hf", run, tmp_path / "out2")
    assert "names '../../x' but no complete checkpoint exists" in err
    assert not (tmp_path / "out2").exists()


def test_os_errors_are_one_line(hf_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("keep")
    err = error_of(capsys, "from-hf", hf_dir, tmp_path / "a_file" / "out")
    assert f"writing {tmp_path / 'a_file'}" in err and (tmp_path / "a_file").read_text() == "keep"


@pytest.mark.parametrize("direction", ["from-hf", "to-hf"])
def test_disk_full_is_one_line_and_keeps_the_previous_output(direction, hf_dir, tmp_path, capsys, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError, not an OSError (seen on a full tmpfs)."""
    ours = _model_dir(hf_dir, tmp_path)
    out = tmp_path / "out"
    argv = ["from-hf", hf_dir, out] if direction == "from-hf" else ["to-hf", ours, out]
    convert(*argv)
    before = snapshot(tmp_path)

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("mbert_train.convert.hf.save_file", full_disk)
    monkeypatch.setattr("mbert_train.model.weights.save_file", full_disk)
    err = error_of(capsys, *argv, "--overwrite")
    assert f"no space left on the device while writing {out}" in err
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


@pytest.mark.slow
def test_cli_runs_as_a_module(hf_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mbert_train.convert", "from-hf", str(hf_dir), str(tmp_path / "o"),
                           "--tp", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "trainer.init_from=" in proc.stdout


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
    torch.testing.assert_close(full_vocab_logits(model, out.mlm_logits), logits(reference, batch), **TOL)


def test_tp2_model_from_converted_dir_matches_reference(hf_dir, tmp_path):
    convert("from-hf", hf_dir, tmp_path / "tp2", "--tp", 2)
    spawn(_rank_check, 2, str(tmp_path / "tp2"), str(hf_dir))


def _slices_check(model_dirs: list[str]) -> None:
    """`load_shard_from_dir` (trainer.init_from, each rank reading its slices) gives this TP
    rank exactly the shard `shard_state_dict` cuts from the full form, from any saved TP."""
    from mbert_train.model.weights import load_shard_from_dir

    full, cfg = load_full_from_dir(model_dirs[0])
    for model_dir in model_dirs:
        model = MegatronBert(cfg, dist.group.WORLD)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        load_shard_from_dir(model_dir, model)
        want = shard_state_dict(full, model)
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, want[name]), (model_dir, name)


@pytest.mark.parametrize("world", [1, 2])
def test_init_from_reads_its_own_slices_of_a_model_dir_of_any_tp(hf_dir, tmp_path, world):
    dirs = []
    for tp in (1, 2, 4):
        convert("from-hf", hf_dir, tmp_path / f"tp{tp}", "--tp", tp)
        dirs.append(str(tmp_path / f"tp{tp}"))
    spawn(_slices_check, world, dirs)


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
    (dict(num_hidden_layers=3), 1, "holds 2 layers but"),
    (dict(num_hidden_layers=1), 1, "says num_hidden_layers=1"),
    (dict(), 3, "--tp 3 does not fit"),
    (dict(intermediate_size=66), 4, "model.intermediate_size=66 is not divisible by parallel.tensor_parallel=4"),
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
    assert "checkpoints holds no complete checkpoint" in error_of(capsys, "to-hf", run, out)
    (run / "checkpoints" / "latest").write_text("step_00000100\n")
    assert "names 'step_00000100'" in error_of(capsys, "to-hf", run, out)
    assert "is the input directory" in error_of(capsys, "to-hf", ours, ours, "--overwrite")
    assert not out.exists()


def _with_index(hf_dir, path, weight_map) -> None:
    shutil.copytree(hf_dir, path)
    (path / "model.safetensors").rename(path / "model-00001-of-00001.safetensors")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _with_dtype(hf_dir, path, dtype, name="bert.encoder.layer.0.output.dense.weight") -> None:
    shutil.copytree(hf_dir, path)
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name] = tensors[name].to(dtype) if dtype is not torch.int64 else torch.ones_like(tensors[name],
                                                                                           dtype=dtype)
    save_file(tensors, str(path / "model.safetensors"))


@pytest.mark.parametrize("case, needle", [
    (dict(vocab_size=300.5), "vocab_size=300.5 must be an integer"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers=2.5 must be an integer"),
    (dict(hidden_size=True), "hidden_size=True must be an integer"),
    (dict(initializer_range="abc"), "initializer_range='abc' must be a finite number"),
    (dict(layer_norm_eps="x"), "layer_norm_eps='x' must be a finite number"),
    (dict(hidden_dropout_prob=None, attention_probs_dropout_prob=[0.1]), "must be a finite number"),
    (dict(num_hidden_layers=100000), "holds 2 layers but"),
    ("tp0", "--tp 0 must be >= 1"),
    ("tp-1", "--tp -1 must be >= 1"),
    ("index_values", "its weight_map must map tensor names to shard file names"),
    ("index_list", "its weight_map must map tensor names to shard file names"),
    ("index_escape", "names shard '../model.safetensors', which is not a file in"),
    ("int64", "output.dense.weight has dtype int64, not a weight dtype"),
    ("bool", "output.dense.weight has dtype bool, not a weight dtype"),
])
def test_from_hf_refuses_malformed_inputs_in_one_line(case, needle, hf_dir, tmp_path, capsys):
    bad, tp = tmp_path / "bad", 1
    if isinstance(case, dict):
        _copy(hf_dir, bad)
        _edit_json(bad / "config.json", **case)
    elif case.startswith("tp"):
        _copy(hf_dir, bad)
        tp = int(case[2:])
    elif case == "index_values":
        _with_index(hf_dir, bad, {"bert.pooler.dense.weight": 3, "cls.predictions.bias": None})
    elif case == "index_list":
        _with_index(hf_dir, bad, ["model-00001-of-00001.safetensors"])
    elif case == "index_escape":
        (tmp_path / "model.safetensors").write_bytes(b"outside the model directory")
        _with_index(hf_dir, bad, {"cls.predictions.bias": "../model.safetensors"})
    else:
        _with_dtype(hf_dir, bad, getattr(torch, case))
    start = time.monotonic()
    err = error_of(capsys, "from-hf", bad, tmp_path / "out", "--tp", tp)
    assert needle in err and time.monotonic() - start < 5
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_accepted_and_upcast(dtype, hf_dir, tmp_path):
    name = "bert.encoder.layer.0.output.dense.weight"
    _with_dtype(hf_dir, tmp_path / "half", dtype, name)
    convert("from-hf", tmp_path / "half", tmp_path / "ours")
    convert("to-hf", tmp_path / "ours", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))[name]
    assert back.dtype == torch.float32
    assert torch.equal(back, load_file(str(tmp_path / "half" / "model.safetensors"))[name].float())


@pytest.mark.parametrize("change, needle", [
    (dict(num_layers=100000), "holds 2 layers but"),
    (dict(num_layers=2.5), "model.num_layers=2.5 must be an integer"),
    (dict(layer_norm_eps="x"), "model.layer_norm_eps='x' must be a finite number"),
    (dict(tensor_parallel=0), "tensor_parallel=0 must be an integer >= 1"),
    (dict(tensor_parallel="2"), "tensor_parallel='2' must be an integer >= 1"),
])
def test_to_hf_refuses_malformed_model_config_in_one_line(change, needle, hf_dir, tmp_path, capsys):
    ours = _model_dir(hf_dir, tmp_path)
    meta = json.loads((ours / "model_config.json").read_text())
    if "tensor_parallel" in change:
        meta.update(change)
    else:
        meta["model"].update(change)
    (ours / "model_config.json").write_text(json.dumps(meta))
    start = time.monotonic()
    assert needle in error_of(capsys, "to-hf", ours, tmp_path / "out")
    assert time.monotonic() - start < 5 and not (tmp_path / "out").exists()


class Payload:
    """A pickled object no allow-list holds (unpickling runs its module's code)."""


def test_pickled_globals_are_named_and_never_unpickled(reference, tmp_path, capsys):
    bin_dir = tmp_path / "bin"
    reference.config.save_pretrained(bin_dir)
    torch.save({**reference.state_dict(), "args": Payload()}, bin_dir / "pytorch_model.bin")
    err = error_of(capsys, "from-hf", bin_dir, tmp_path / "out")
    assert "pickles tests.test_convert.Payload, which a weights-only load refuses" in err, err
    assert "weights_only=False" not in err and "likely succeed" not in err
    assert not (tmp_path / "out").exists()
