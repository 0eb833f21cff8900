"""Every bad configuration is refused with one line that names the setting (or file) and the fix."""

import dataclasses
import json

import pytest

from mbert_train.convert import write_model_dir
from mbert_train.model import MegatronBert, ModelConfig
from mbert_train.model.weights import (full_state_dict, load_full_from_dir, read_model_meta, shard_file,
                                       shard_state_dict)
from mbert_train.parallel.layout import ParallelDims
from tests.test_model_reference import small_config


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
