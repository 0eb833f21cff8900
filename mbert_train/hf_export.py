"""What a Hugging Face export needs besides the weights to be usable at once: the tokenizer of
the dataset the model was trained on, and a short model card.

    files, missing = export_files(cfg, model_cfg, dataset_dir=..., step=..., ...)
    export_hf(full, model_cfg, out_dir, files=files)      # mbert_train.convert

The tokenizer files are `tokenizer.json` (with BERT's `[CLS] A [SEP] (B [SEP])` post-processor),
`vocab.txt`, `tokenizer_config.json` (class, special tokens, `do_lower_case` as the dataset was
prepared) and `special_tokens_map.json`; with them `AutoTokenizer.from_pretrained(OUT)` and
`pipeline("fill-mask", model=OUT)` need nothing else. They are written only when the dataset is
found and its vocabulary is the model's; otherwise `missing` says why, in one line.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from tokenizers import Tokenizer

from data_prep import format as fmt
from data_prep.tokenizer import is_bert_pipeline, vocab_text, with_bert_template
from mbert_train import __version__
from mbert_train.arithmetic import count_parameters
from mbert_train.model.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
MODEL_CARD = "README.md"
_SPECIAL = {"unk_token": fmt.UNK, "sep_token": fmt.SEP, "pad_token": fmt.PAD, "cls_token": fmt.CLS,
            "mask_token": fmt.MASK}
_OBJECTIVES = {"nsp": "masked LM + next-sentence prediction", "sop": "masked LM + sentence-order prediction",
               "none": "masked LM only (packed segments)"}


def hf_class(cfg: ModelConfig) -> str:
    """The transformers class that holds every exported weight."""
    return "MegatronBertForPreTraining" if cfg.binary_head else "MegatronBertForMaskedLM"


def dataset_of_run(config: Mapping) -> str | None:
    """The dataset directory a run trained on, from its config (run.json's `config`): data.path,
    or the cached embedded corpus for that data config (None when the config says neither)."""
    from mbert_train.data.config import DataConfig
    from mbert_train.data.default_corpus import cached_corpus_dir

    data = config.get("data") if isinstance(config, Mapping) else None
    if not isinstance(data, Mapping):
        return None
    if data.get("path"):
        return str(data["path"])
    try:
        return cached_corpus_dir(DataConfig(default_vocab_size=data.get("default_vocab_size", 8192),
                                            cache_dir=data.get("cache_dir")))
    except (TypeError, ValueError):
        return None


def _read_metadata(dataset_dir: str) -> dict:
    with open(os.path.join(dataset_dir, fmt.METADATA_FILE), encoding="utf-8") as f:
        return json.load(f)


def tokenizer_files(dataset_dir: str | None, cfg: ModelConfig, tokenizer_sha256: str | None = None
                    ) -> tuple[dict[str, str], str | None]:
    """({file name: text} of the dataset's tokenizer, None) or ({}, why it cannot be written)."""
    if dataset_dir is None:
        return {}, "the checkpoint does not record its dataset"
    reason = fmt.not_a_dataset_reason(dataset_dir)
    if reason is not None:
        return {}, f"its dataset {dataset_dir} is not found ({reason})"
    try:
        meta = _read_metadata(dataset_dir)
        tok = Tokenizer.from_file(os.path.join(dataset_dir, meta.get("tokenizer_file", fmt.TOKENIZER_FILE)))
    except Exception as exc:  # a damaged file: the weights are still worth exporting
        return {}, f"the tokenizer of {dataset_dir} cannot be read ({type(exc).__name__})"
    if tokenizer_sha256 and meta.get("tokenizer_sha256") not in (None, tokenizer_sha256):
        return {}, f"the tokenizer of {dataset_dir} is not the one the model was trained with (tokenizer_sha256 differs)"
    size = tok.get_vocab_size(with_added_tokens=True)
    if size != cfg.vocab_size:
        return {}, f"the tokenizer of {dataset_dir} has {size} tokens, the model {cfg.vocab_size}"
    if any(tok.token_to_id(token) is None for token in _SPECIAL.values()):
        return {}, f"the tokenizer of {dataset_dir} lacks BERT's special tokens"
    bert = is_bert_pipeline(tok)
    with_bert_template(tok)
    lowercase = bool(meta.get("lowercase", True))
    config = {"tokenizer_class": "BertTokenizer" if bert else "PreTrainedTokenizerFast",
              "do_lower_case": lowercase, "strip_accents": None, "tokenize_chinese_chars": True,
              **_SPECIAL, "model_max_length": cfg.max_position_embeddings,
              "model_input_names": ["input_ids", "token_type_ids", "attention_mask"]}
    return {"tokenizer.json": tok.to_str(pretty=True), "vocab.txt": vocab_text(tok),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(_SPECIAL, indent=2) + "\n"}, None


def final_eval(metrics_file: Path, step: int) -> tuple[int, float] | None:
    """(step, eval_mlm_loss) of the last evaluation at or before `step` in a metrics.jsonl."""
    found = None
    try:
        lines = metrics_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if (isinstance(record, dict) and isinstance(record.get("eval_mlm_loss"), (int, float))
                and isinstance(record.get("step"), int) and record["step"] <= step):
            found = (record["step"], float(record["eval_mlm_loss"]))
    return found


def _data_line(dataset_dir: str | None, config: Mapping) -> str:
    data = config.get("data") or {}
    name = (f"`{dataset_dir}`" if data.get("path") else
            "the embedded default corpus (the Python standard library's docstrings)")
    try:
        summary = _read_metadata(dataset_dir).get("summary", {}) if dataset_dir else {}
        meta = _read_metadata(dataset_dir) if dataset_dir else {}
    except (OSError, ValueError):
        summary, meta = {}, {}
    if not summary:
        return name
    case = "uncased" if meta.get("lowercase", True) else "cased"
    return (f"{name}: {_n(summary.get('train_documents'))} training and {_n(summary.get('heldout_documents'))} "
            f"held-out documents, {_n(summary.get('tokens'))} tokens; WordPiece {case}, "
            f"{_n(meta.get('vocab_size'))} entries")


def _n(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def model_card(cfg: ModelConfig, config: Mapping | None, *, dataset_dir: str | None, step: int | None,
               data_parallel: int | None, evaluation: tuple[int, float] | None, name: str) -> str:
    """README.md: architecture, data, steps, tokens seen, final held-out loss, and how to load it."""
    config = config or {}
    trainer, data = config.get("trainer") or {}, config.get("data") or {}
    params = count_parameters(cfg, vocab_multiple=1).total
    rows = [("architecture", f"{hf_class(cfg)}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
                             f"{cfg.num_heads} heads, intermediate {cfg.intermediate_size}, vocabulary "
                             f"{cfg.vocab_size}, {cfg.max_position_embeddings} positions, {params / 1e6:.2f} M "
                             f"parameters")]
    if config:
        rows.append(("objective", _OBJECTIVES.get(data.get("objective"), str(data.get("objective")))))
        rows.append(("data", _data_line(dataset_dir, config)))
    if step is not None:
        rows.append(("steps", f"{step:,}"))
        batch = [trainer.get("micro_batch_size"), trainer.get("grad_accum"), data_parallel]
        seq = data.get("max_seq_length")
        if all(isinstance(v, int) for v in (*batch, seq)):
            sequences = step * batch[0] * batch[1] * batch[2]
            rows.append(("tokens seen", f"at most {sequences * seq:,} ({sequences:,} sequences of up to {seq} "
                                        f"tokens: global batch {batch[0] * batch[1] * batch[2]} = micro batch "
                                        f"{batch[0]} x grad accum {batch[1]} x data parallel {batch[2]})"))
    rows.append(("final eval MLM loss", f"{evaluation[1]:.4f} (held-out split, step {evaluation[0]:,})"
                 if evaluation else "not evaluated"))
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"""---
library_name: transformers
pipeline_tag: fill-mask
tags:
- megatron-bert
- mbert-train
---

# {name}

A MegatronBERT model pretrained from scratch with mbert-train {__version__}.

| | |
|---|---|
{table}

```python
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

fill = pipeline("fill-mask", model="path/to/{name}")
print(fill("The capital of France is [MASK]."))
tokenizer = AutoTokenizer.from_pretrained("path/to/{name}")
model = AutoModelForMaskedLM.from_pretrained("path/to/{name}")  # MegatronBertForMaskedLM
```
"""


def export_files(cfg: ModelConfig, config: Mapping | None, *, dataset_dir: str | None, step: int | None,
                 data_parallel: int | None, metrics_file: Path | None, name: str,
                 tokenizer_sha256: str | None = None) -> tuple[dict[str, str], str | None]:
    """({file name: text} for the export beside the weights, why the tokenizer is missing or None).
    With `tokenizer_sha256` (what the run recorded) a dataset holding another tokenizer is not used."""
    files, missing = tokenizer_files(dataset_dir, cfg, tokenizer_sha256)
    evaluation = final_eval(metrics_file, step) if metrics_file is not None and step is not None else None
    files[MODEL_CARD] = model_card(cfg, config, dataset_dir=dataset_dir, step=step, data_parallel=data_parallel,
                                   evaluation=evaluation, name=name)
    return files, missing
