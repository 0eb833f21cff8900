"""The Hugging Face export is usable at once: RUN/hf/ (written at the end of `mbert-train`) and
`mbert-convert to-hf` carry the dataset's tokenizer and a model card, checked against
transformers' own loaders."""

from __future__ import annotations

import json
from pathlib import Path
import shutil

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertTokenizer, pipeline

from mbert_train.convert import main
from mbert_train.convert.common import TOKENIZER_FILES
from mbert_train.convert.hf import dataset_of_run
from tests.train_util import losses, train

pytestmark = pytest.mark.slow

STEPS = 3
TEXT = "Return the value of the named attribute of an object."


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_cache):
    """A default (embedded corpus, MLM + NSP) run of a few steps, evaluated at its end."""
    run_dir = tmp_path_factory.mktemp("hf") / "run"
    train(run_dir, corpus_cache, [f"trainer.max_steps={STEPS}", f"trainer.checkpoint_every={STEPS}",
                                  f"trainer.eval_every={STEPS}"])
    return run_dir


def dataset_dir(run_dir) -> str:
    config = json.loads((run_dir / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").read_text())["run"]["config"]
    return dataset_of_run(config)


def test_run_end_export_loads_with_pipeline_and_auto_classes(run):
    hf = run / "hf"
    fill = pipeline("fill-mask", model=str(hf))
    predictions = fill(f"{TEXT[:-1]} [MASK].")
    assert len(predictions) == 5 and all(p["token_str"] and p["score"] > 0 for p in predictions)
    tok = AutoTokenizer.from_pretrained(str(hf))
    ids = tok("a b")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok("a", "b")["token_type_ids"] == [0, 0, 0, 1, 1]
    # The same ids as the dataset's own tokenizer gave the training samples.
    dataset_tok = Tokenizer.from_file(f"{dataset_dir(run)}/tokenizer.json")
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == dataset_tok.encode(TEXT, add_special_tokens=False).ids
    model, info = AutoModelForMaskedLM.from_pretrained(str(hf), output_loading_info=True)
    assert type(model).__name__ == "MegatronBertForMaskedLM"
    assert not info["missing_keys"] and not info["mismatched_keys"]  # no newly initialised MLM head
    weights = load_file(str(hf / "model.safetensors"))
    state = model.state_dict()
    for name in ("cls.predictions.transform.dense.weight", "cls.predictions.bias",
                 "bert.embeddings.word_embeddings.weight"):
        assert torch.equal(state[name], weights[name]), name


def test_vocab_txt_reads_with_bert_tokenizer(run):
    # transformers 5 takes the file as `vocab=`; its old `vocab_file=` keyword is ignored there.
    hf = run / "hf"
    slow = BertTokenizer(vocab=str(hf / "vocab.txt"), do_lower_case=True)
    assert len(slow) == json.loads((hf / "config.json").read_text())["vocab_size"]
    assert slow(TEXT)["input_ids"] == AutoTokenizer.from_pretrained(str(hf))(TEXT)["input_ids"]


def test_model_card_names_architecture_data_steps_tokens_and_eval_loss(run):
    card = (run / "hf" / "README.md").read_text()
    eval_loss = losses(run, "eval_mlm_loss")[STEPS]
    assert "pipeline_tag: fill-mask" in card and "MegatronBertForPreTraining: 2 layers, hidden 64" in card
    assert f"| steps | {STEPS} |" in card
    assert f"at most {STEPS * 8 * 64:,} ({STEPS * 8:,} sequences" in card  # micro batch 8, length 64
    assert f"| final eval MLM loss | {eval_loss:.4f} (held-out split, step {STEPS})" in card
    assert "embedded default corpus" in card and "held-out documents" in card


def test_to_hf_of_a_checkpoint_writes_the_tokenizer_and_card(run, tmp_path, capsys):
    assert main(["to-hf", str(run), str(tmp_path / "out")]) == 0
    out = capsys.readouterr()
    assert "MegatronBertForPreTraining.from_pretrained" in out.out and "pipeline('fill-mask'" in out.out
    assert "warning" not in out.err
    for name in (*TOKENIZER_FILES, "model.safetensors"):
        assert (tmp_path / "out" / name).read_bytes() == (run / "hf" / name).read_bytes(), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| steps | {STEPS} |" in card and "| final eval MLM loss |" in card and "not evaluated" not in card


def test_a_moved_dataset_exports_the_weights_and_says_how_to_add_the_tokenizer(run, tmp_path, capsys):
    step = tmp_path / "step"
    shutil.copytree(run / "checkpoints" / f"step_{STEPS:08d}", step)
    meta = json.loads((step / "meta.json").read_text())
    meta["run"]["config"]["data"]["path"] = str(tmp_path / "moved-away")
    meta["run"]["dataset"]["path"] = str(tmp_path / "moved-away")
    (step / "meta.json").write_text(json.dumps(meta))
    assert main(["to-hf", str(step), str(tmp_path / "out")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "mbert-convert:" in line]
    assert len(err) == 1 and "tokenizer not written" in err[0] and "moved-away" in err[0] and "--dataset" in err[0]
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "README.md").is_file()
    assert not any((tmp_path / "out" / name).exists() for name in TOKENIZER_FILES)
    # The fix the line names: --dataset, replacing the weights-only output.
    assert main(["to-hf", str(step), str(tmp_path / "out"), "--overwrite", "--dataset", dataset_dir(run)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out"))("a b")["input_ids"][0] == 2


def test_the_dataset_recorded_by_the_run_is_used_only_with_the_same_tokenizer(run, tmp_path, capsys):
    step = tmp_path / "step"
    shutil.copytree(run / "checkpoints" / f"step_{STEPS:08d}", step)
    meta = json.loads((step / "meta.json").read_text())
    record = meta["run"]
    assert record["dataset"]["path"] == str(Path(dataset_dir(run)).resolve()) and record["dataset"]["tokenizer_sha256"]
    record["dataset"]["tokenizer_sha256"] = "0" * 64  # the dataset was re-prepared since
    (step / "meta.json").write_text(json.dumps(meta))
    assert main(["to-hf", str(step), str(tmp_path / "out")]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "mbert-convert:" in line]
    assert len(err) == 1 and "is not the one the model was trained with (tokenizer_sha256 differs)" in err[0]
    assert not any((tmp_path / "out" / name).exists() for name in TOKENIZER_FILES)
