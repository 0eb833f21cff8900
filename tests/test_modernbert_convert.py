"""ModernBERT in and out: a Hugging Face ModernBERT directory (weights, config and its byte-level
BPE tokenizer) goes through `mbert-convert from-hf` at TP=2 and `to-hf` unchanged; its tokenizer
prepares a corpus (`mbert-prep --tokenizer DIR/tokenizer.json`) that `trainer.init_from` continues
pretraining on at TP=2, with [PAD]'s id taken from that tokenizer; both exports run in
`transformers.pipeline("fill-mask")`."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import ModernBertConfig, ModernBertForMaskedLM, pipeline

from data_prep import PrepConfig
from data_prep.prep import prepare
from mbert_train.config import compose_config
from mbert_train.convert import main
from mbert_train.data.corpus import DatasetError, open_dataset, resolve_pad
from tests.tiny_modernbert import BPE_SIZE, save_tiny_modernbert, texts
from tests.train_util import losses, train

TP = 2
PAD = BPE_SIZE + 3
TEXT = "W1 w2 w3 [MASK] w5."


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return save_tiny_modernbert(tmp_path_factory.mktemp("hub") / "ModernBERT-tiny", texts(40))


def convert(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def assert_fill_mask_runs(directory) -> None:
    predictions = pipeline("fill-mask", model=str(directory))(TEXT)
    assert len(predictions) == 5 and all(p["score"] > 0 for p in predictions)


def test_from_hf_to_hf_round_trip_is_bit_exact(hf_dir, tmp_path, capsys):
    """Every tensor, the config (as transformers reads it) and the tokenizer files come back
    unchanged through our TP=2 model directory, which records [PAD]'s id."""
    convert("from-hf", hf_dir, tmp_path / "ours", "--tp", TP)
    meta = json.loads((tmp_path / "ours" / "model_config.json").read_text())
    assert meta["tensor_parallel"] == TP and meta["model"]["arch"] == "modernbert"
    assert meta["model"]["pad_token_id"] == PAD and meta["model"]["vocab_size"] == BPE_SIZE + 5
    convert("to-hf", tmp_path / "ours", tmp_path / "back")
    assert "ModernBertForMaskedLM.from_pretrained" in capsys.readouterr().out
    assert "ModernBERT model converted by mbert-convert" in (tmp_path / "back" / "README.md").read_text()
    original, back = load_file(str(hf_dir / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name
    # The export also names `global_attn_every_n_layers`, which transformers 4 reads (5 reads `layer_types`).
    config = ModernBertConfig.from_pretrained(tmp_path / "back").to_dict()
    assert config.pop("global_attn_every_n_layers") == 3
    assert config == ModernBertConfig.from_pretrained(hf_dir).to_dict()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (hf_dir / name).read_bytes(), name
    _, info = ModernBertForMaskedLM.from_pretrained(tmp_path / "back", output_loading_info=True)
    assert not any(info.values()), info
    assert_fill_mask_runs(tmp_path / "back")


def test_a_torch_save_with_the_tied_decoder_imports(hf_dir, tmp_path):
    """`torch.save(model.state_dict())` carries the tied decoder copy: dropped when equal."""
    model = ModernBertForMaskedLM.from_pretrained(hf_dir)
    bin_dir = tmp_path / "bin"
    model.config.save_pretrained(bin_dir)
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    convert("from-hf", bin_dir, tmp_path / "ours")
    convert("to-hf", tmp_path / "ours", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    for name, tensor in load_file(str(hf_dir / "model.safetensors")).items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("change, message", [
    ({"mlp_bias": True}, "mlp_bias=True is not supported"),
    ({"num_hidden_layers": 3, "layer_types": ["full_attention", "sliding_attention", "sliding_attention"]},
     "holds 2 layers but"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types="),
])
def test_unsupported_or_inconsistent_modernbert_is_one_line(hf_dir, tmp_path, capsys, change, message):
    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, **change}))
    assert main(["from-hf", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mbert-convert: error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out").exists()
    assert main(["from-hf", str(hf_dir), str(tmp_path / "out"), "--tp", "3"]) == 2
    assert "--tp 3" in capsys.readouterr().err
    convert("from-hf", hf_dir, tmp_path / "ours")
    assert main(["to-megatron", str(tmp_path / "ours"), str(tmp_path / "megatron")]) == 2
    assert "model.arch=modernbert model, which Megatron-LM's BERT is not" in capsys.readouterr().err


def test_pad_id_follows_the_dataset_and_a_wrong_one_is_one_line(tmp_path):
    meta = {"special_ids": {"pad": PAD, "unk": 300, "cls": 301, "sep": 302, "mask": 304}}
    assert resolve_pad(meta, None, str(tmp_path)) == PAD == resolve_pad(meta, PAD, str(tmp_path))
    with pytest.raises(DatasetError, match=rf"model.pad_token_id=0 does not match .*\[PAD\] is {PAD}") as exc:
        resolve_pad(meta, 0, str(tmp_path))
    assert "\n" not in str(exc.value)
    # A run's config leaves it unset; a model built in Python keeps BERT's 0.
    assert compose_config(["model=modernbert-base"]).model.pad_token_id is None


@pytest.mark.slow
def test_init_from_continues_pretraining_at_tp2_and_exports(hf_dir, tmp_path, corpus_cache):
    """Import -> prepare a corpus with the model's own tokenizer -> 3 steps at TP=2 from the
    imported weights -> export: [PAD] and the vocabulary are the tokenizer's everywhere, the
    weights moved from the imported ones by no more than 3 Adam steps can move them, and the run's export
    runs in the fill-mask pipeline."""
    convert("from-hf", hf_dir, tmp_path / "init")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(texts(40, seed=1)) + "\n")
    prepare(PrepConfig(inputs=[str(corpus)], output=str(tmp_path / "data"), tokenizer=str(hf_dir / "tokenizer.json"),
                       quiet=True))
    assert open_dataset(str(tmp_path / "data")).special.pad == PAD
    lr = 1e-3
    train(tmp_path / "run", corpus_cache,
          ["model=modernbert-base", "data=prepared", f"data.path={tmp_path / 'data'}", f"trainer.init_from={tmp_path / 'init'}",
           f"parallel.tensor_parallel={TP}", "trainer.max_steps=3", "trainer.eval_every=0", f"optim.lr={lr}",
           "optim.warmup_steps=0"], nproc=TP)
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"pad_token_id: {PAD}" in config and f"vocab_size: {BPE_SIZE + 5}" in config
    assert "objective: none" in config and "masked_lm_prob: 0.3" in config
    exported = tmp_path / "run" / "hf"
    assert json.loads((exported / "config.json").read_text())["pad_token_id"] == PAD
    original, trained = load_file(str(hf_dir / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    assert original.keys() == trained.keys()
    moved = {name: (trained[name] - tensor).abs().max().item() for name, tensor in original.items()}
    assert max(moved.values()) < 10 * lr and min(moved.values()) > 0, moved
    tokenizer_config = json.loads((exported / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_input_names"] == ["input_ids", "attention_mask"]  # no token type ids
    card = (exported / "README.md").read_text()
    assert not (exported / "vocab.txt").exists() and "BPE cased" in card and f"weights of `{tmp_path / 'init'}`" in card
    assert_fill_mask_runs(exported)


@pytest.mark.slow
def test_init_from_a_modernbert_into_a_megatron_bert_is_one_line(hf_dir, tmp_path, corpus_cache):
    convert("from-hf", hf_dir, tmp_path / "init")
    done = train(tmp_path / "run", corpus_cache, [f"trainer.init_from={tmp_path / 'init'}", "trainer.max_steps=1"],
                 check=False)
    assert done.returncode == 2
    assert "does not fit this model: model.arch=megatron_bert (checkpoint: modernbert)" in done.stderr, done.stderr
