"""Hugging Face MegatronBERT and ModernBERT directories <-> mbert-train model directories, and
what an export needs besides the weights to be usable at once.

    from_hf(HF_DIR, OUT_DIR, tp)   # config.json + weights -> model_config.json + `tp` shards
    to_hf(CKPT_DIR, OUT_DIR)       # any model/step/run dir, any TP -> config.json + model.safetensors
                                   # + the run's tokenizer and a model card README.md
    files, missing = export_files(cfg, run_config, dataset_dir=..., step=..., ...)
    export_hf(full, cfg, out_dir, files=files)   # what the trainer writes at the end of a run

Both directions go through the *full* form of `mbert_train.model.weights`, which is the same at
every TP degree; OUT_DIR is checked, staged and marked by `mbert_train.convert.common`. A
`config.json` with `model_type: modernbert` is a `ModernBertForMaskedLM` (its names and config:
`mbert_train.model.modernbert_hf`), any other a MegatronBERT. `from_hf` keeps the tokenizer files
it finds beside the weights in the model directory, and `to_hf` of a model directory that records
no dataset writes them back unchanged.

The tokenizer files are `tokenizer.json` (with BERT's `[CLS] A [SEP] (B [SEP])` post-processor),
`vocab.txt` (WordPiece only), `tokenizer_config.json` (class, special tokens, `do_lower_case` as
the dataset was prepared) and `special_tokens_map.json`; with them `AutoTokenizer.from_pretrained(OUT)` and
`pipeline("fill-mask", model=OUT)` need nothing else. They are written only when the dataset is
found and its vocabulary is the model's; otherwise `missing` says why, in one line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from data_prep import format as fmt
from data_prep.tokenizer import is_bert_pipeline, vocab_text, with_bert_template
from mbert_train import __version__
from mbert_train.arithmetic import count_parameters
from mbert_train.checkpoint import CheckpointError, read_meta, read_run_record
from mbert_train.convert.common import (HF_CONFIG, HF_EXTRA_FILES, HF_TOKENIZER, HF_WEIGHTS, MODEL_CARD,
                                        TOKENIZER_FILES, ConvertError, check_dtypes, check_layer_count,
                                        check_out_dir, check_tensors, check_tp, load_model_dir, resolve_model_dir,
                                        staged_output, write_marker, write_model_dir)
from mbert_train.data.config import DataConfig
from mbert_train.data.default_corpus import cached_corpus_dir
from mbert_train.errors import first_line
from mbert_train.metrics import METRICS_FILE
from mbert_train.model import modernbert_hf
from mbert_train.model.config import ModelConfig
from mbert_train.model.weights import full_shapes, full_to_hf, hf_to_full

# Searched in this order; the index files list the shards of a sharded `save_pretrained`.
HF_WEIGHT_FILES = (HF_WEIGHTS, "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# HF ties the MLM decoder to the word embeddings and the decoder bias to `cls.predictions.bias`;
# `torch.save(state_dict())` files still carry the tied copies, which must equal their source.
HF_TIED = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
           "cls.predictions.decoder.bias": "cls.predictions.bias"}
# A buffer that transformers 4.x saved; it holds no weights.
HF_BUFFERS = ("bert.embeddings.position_ids",)
HF_MLM_ONLY = "MegatronBertForMaskedLM"
_HF_LAYER = re.compile(r"^bert\.encoder\.layer\.(\d+)\.")
# ModernBertForMaskedLM's: the decoder is tied to the token embeddings; no buffers are saved.
MODERNBERT_TIED = {"decoder.weight": "model.embeddings.tok_embeddings.weight"}
_MODERNBERT_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_SPECIAL = {"unk_token": fmt.UNK, "sep_token": fmt.SEP, "pad_token": fmt.PAD, "cls_token": fmt.CLS,
            "mask_token": fmt.MASK}
_OBJECTIVES = {"nsp": "masked LM + next-sentence prediction", "sop": "masked LM + sentence-order prediction",
               "none": "masked LM only (packed segments)"}


# ---- from-hf --------------------------------------------------------------------------------

def read_hf_config(hf_dir: Path) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face MegatronBERT directory, with one-line errors."""
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir} does not exist or is not a directory; pass a Hugging Face model directory")
    path = hf_dir / HF_CONFIG
    if not path.is_file():
        raise ConvertError(f"{path} not found: {hf_dir} is not a Hugging Face model directory "
                           f"(write one with save_pretrained)")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path} is not valid JSON ({first_line(exc)}); re-save it with save_pretrained") from None
    if not isinstance(hf, dict):
        raise ConvertError(f"{path} does not hold a JSON object; re-save it with save_pretrained")
    if hf.get("model_type") == "modernbert":
        return _read_modernbert_config(hf, path)
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ConvertError(f"{path}: position_embedding_type={hf['position_embedding_type']!r} is not supported; "
                           f"only 'absolute' position embeddings")
    if not hf.get("tie_word_embeddings", True):
        raise ConvertError(f"{path}: tie_word_embeddings=false is not supported; the MLM decoder must be the "
                           f"word embeddings")
    try:
        cfg = ModelConfig.from_hf_dict(hf)
    except KeyError as exc:
        raise ConvertError(f"{path} lacks {exc}; it is not a MegatronBERT config.json") from None
    except (ValueError, TypeError) as exc:
        raise ConvertError(f"{path}: {first_line(exc)}") from None
    if HF_MLM_ONLY in hf.get("architectures", []):
        cfg = dataclasses.replace(cfg, binary_head=False)
    return cfg


def _read_modernbert_config(hf: dict, path: Path) -> ModelConfig:
    try:
        return modernbert_hf.config_from_hf(hf)
    except KeyError as exc:
        raise ConvertError(f"{path} lacks {exc}; it is not a ModernBERT config.json") from None
    except (ValueError, TypeError) as exc:
        raise ConvertError(f"{path}: {first_line(exc)}") from None


def _load_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConvertError(f"{path} is missing; copy the complete model directory")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        # torch's own message suggests weights_only=False, which would run whatever the file
        # pickled: name the global instead, and never suggest turning the check off.
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found or "weights only load failed" in str(exc).lower():
            what = found.group(1) if found else "a Python object that is not a tensor"
            raise ConvertError(f"{path} pickles {what}, which a weights-only load refuses (unpickling it could run "
                               f"code); re-save the weights as safetensors, or as torch.save(model.state_dict()), "
                               f"from a trusted source") from None
        raise ConvertError(f"{path} is truncated or corrupt ({first_line(exc)}); download or save it "
                           f"again") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ConvertError(f"{path} does not hold a state dict of tensors; save it with torch.save(model.state_dict())")
    return state


def _read_weight_index(path: Path) -> list[str]:
    """The shard file names an HF `*.index.json` lists, each a plain name inside its directory."""
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConvertError(f"{path} is not a valid weight index ({first_line(exc)}); save the model "
                           f"again") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise ConvertError(f"{path} is not a valid weight index (its weight_map must map tensor names to shard "
                           f"file names); save the model again")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        if name in ("", ".", "..") or Path(name).name != name:
            raise ConvertError(f"{path} names shard {name!r}, which is not a file in {path.parent}; save the model "
                               f"again")
    return shards


def read_hf_weights(hf_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(the file read, its tensors) from model.safetensors, pytorch_model.bin or their index."""
    found = [hf_dir / name for name in HF_WEIGHT_FILES if (hf_dir / name).is_file()]
    if not found:
        raise ConvertError(f"{hf_dir} holds no weights (looked for {', '.join(HF_WEIGHT_FILES)}); "
                           f"save the model with save_pretrained")
    path = found[0]
    if not path.name.endswith(".index.json"):
        return path, _load_weight_file(path)
    tensors: dict[str, torch.Tensor] = {}
    for shard_name in _read_weight_index(path):
        tensors.update(_load_weight_file(hf_dir / shard_name))
    return path, tensors


def import_hf(hf_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """A Hugging Face MegatronBertForPreTraining (or ForMaskedLM), or ModernBertForMaskedLM,
    directory -> (full form, config)."""
    hf_dir = Path(hf_dir)
    cfg = read_hf_config(hf_dir)
    source, tensors = read_hf_weights(hf_dir)
    modern = cfg.arch == "modernbert"
    for name, origin in (MODERNBERT_TIED if modern else HF_TIED).items():
        copy = tensors.pop(name, None)
        if copy is not None and origin in tensors and not torch.equal(copy, tensors[origin]):
            raise ConvertError(f"{source}: {name} differs from {origin}; untied MLM decoders are not supported")
    for name in () if modern else HF_BUFFERS:
        tensors.pop(name, None)
    check_dtypes(tensors, source)
    check_layer_count(tensors, _MODERNBERT_LAYER if modern else _HF_LAYER, cfg, source, hf_dir / HF_CONFIG,
                      "num_hidden_layers")
    to_hf, to_full = (modernbert_hf.full_to_hf, modernbert_hf.hf_to_full) if modern else (full_to_hf, hf_to_full)
    expected = to_hf({n: torch.empty(s, device="meta") for n, s in full_shapes(cfg).items()}, cfg)
    check_tensors(tensors, {n: t.shape for n, t in expected.items()}, source, hf_dir / HF_CONFIG, cfg)
    return to_full(tensors, cfg), cfg


def carried_tokenizer(directory: Path) -> dict[str, str]:
    """{name: text} of the tokenizer files (`TOKENIZER_FILES`) in `directory`: what `from_hf`
    keeps beside the weights and `to_hf` writes back."""
    return {name: (directory / name).read_text(encoding="utf-8") for name in TOKENIZER_FILES
            if (directory / name).is_file()}


def from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int, *, overwrite: bool = False) -> Path:
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if tp < 1:
        raise ConvertError(f"--tp {tp} must be >= 1 (the tensor-parallel degree to shard for)")
    check_out_dir(out_dir, overwrite=overwrite, inputs=(hf_dir,))
    cfg = read_hf_config(hf_dir)
    check_tp(cfg, tp, hf_dir / HF_CONFIG)
    full, cfg = import_hf(hf_dir)
    return write_model_dir(full, cfg, out_dir, tp, overwrite=overwrite, files=carried_tokenizer(hf_dir))


# ---- to-hf ----------------------------------------------------------------------------------

def hf_config_dict(cfg: ModelConfig, tokenizer_json: str | None = None) -> dict:
    """config.json for `cfg`; the MLM-only model (no pooler/NSP) loads as MegatronBertForMaskedLM.
    ModernBERT's also names the [CLS] and [SEP] ids of the tokenizer written beside it."""
    if cfg.arch == "modernbert":
        tok = Tokenizer.from_str(tokenizer_json) if tokenizer_json else None
        return modernbert_hf.hf_config(cfg, cls_token_id=tok and tok.token_to_id(fmt.CLS),
                                       sep_token_id=tok and tok.token_to_id(fmt.SEP))
    hf = cfg.to_hf_dict()
    if not cfg.binary_head:
        hf["architectures"] = [HF_MLM_ONLY]
    return hf


def export_hf(full_state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | os.PathLike, *,
              overwrite: bool = False, files: dict[str, str] | None = None) -> Path:
    """Write `config.json` + `model.safetensors` that `MegatronBertForPreTraining.from_pretrained`
    (MLM-only: `MegatronBertForMaskedLM`) loads, plus `files` ({name: text}, `HF_EXTRA_FILES`:
    the tokenizer and model card of `export_files`).

    `overwrite` replaces only an earlier mbert-convert output (see `check_out_dir`)."""
    out_dir = Path(out_dir)
    unknown = sorted(set(files or {}) - set(HF_EXTRA_FILES))
    if unknown:
        raise ValueError(f"export_hf writes only {HF_EXTRA_FILES} besides the weights, not {unknown}")
    hf = (modernbert_hf.full_to_hf if cfg.arch == "modernbert" else full_to_hf)(full_state, cfg)
    with staged_output(out_dir, overwrite=overwrite) as staging:
        save_file(hf, str(staging / HF_WEIGHTS), metadata={"format": "pt"})
        config = hf_config_dict(cfg, (files or {}).get(HF_TOKENIZER))
        (staging / HF_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        write_marker(staging, "hf")
    return out_dir


def _run_record(model_dir: Path) -> tuple[dict | None, int | None, int | None, dict]:
    """(the run's config, step, data-parallel degree, its dataset record {path, tokenizer_sha256})
    of a checkpoint step directory, from its meta.json (run.json in format 2); Nones (and {}) for a model
    directory that is no checkpoint."""
    try:
        run = read_run_record(model_dir)
    except CheckpointError:
        run = {}
    try:
        meta = read_meta(model_dir)
    except CheckpointError:
        meta = {}
    config = run.get("config")
    dataset = run.get("dataset") if isinstance(run.get("dataset"), dict) else {}
    step = meta.get("step") if type(meta.get("step")) is int else None
    layout = meta.get("layout") if isinstance(meta.get("layout"), dict) else {}
    dp = layout.get("data_parallel") if type(layout.get("data_parallel")) is int else None
    return (config if isinstance(config, dict) else None), step, dp, dataset


def to_hf(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False,
          dataset: str | os.PathLike | None = None) -> Path:
    """The weights, the tokenizer of the dataset the run trained on (or of `dataset`) and a model
    card; without a tokenizer, the weights alone and one warning line saying how to add it."""
    ckpt_dir, out_dir = Path(ckpt_dir), Path(out_dir)
    inputs = (ckpt_dir,) if not ckpt_dir.is_dir() else (ckpt_dir, resolve_model_dir(ckpt_dir))
    check_out_dir(out_dir, overwrite=overwrite, inputs=inputs)
    if dataset is not None and not Path(dataset, fmt.METADATA_FILE).is_file():
        raise ConvertError(f"--dataset {dataset} is not a dataset written by mbert-prep (no metadata.json); pass "
                           f"the prepared dataset directory the model was trained on")
    full, cfg = load_model_dir(inputs[-1])
    config, step, dp, record = _run_record(inputs[-1])
    recorded = record.get("path") if isinstance(record.get("path"), str) else None
    dataset_dir = (str(dataset) if dataset is not None else recorded if recorded and Path(recorded).is_dir()
                   else dataset_of_run(config) if config else None)
    run_dir = inputs[-1].parent.parent
    files, missing = export_files(cfg, config, dataset_dir=dataset_dir, step=step, data_parallel=dp,
                                  tokenizer_sha256=record.get("tokenizer_sha256") if dataset is None else None,
                                  metrics_file=run_dir / METRICS_FILE if config else None, name=out_dir.name)
    carried = carried_tokenizer(inputs[-1]) if missing and config is None and dataset is None else {}
    if carried:  # a from-hf model directory: the tokenizer it came with
        files, missing = {**files, **carried}, None
    export_hf(full, cfg, out_dir, overwrite=overwrite, files=files)
    if missing and (config is not None or dataset is not None):  # a plain model dir records no dataset
        print(f"mbert-convert: warning: tokenizer not written: {missing}; add it with mbert-convert to-hf "
              f"{ckpt_dir} {out_dir} --overwrite --dataset DATASET_DIR (the mbert-prep output it trained on)",
              file=sys.stderr)
    return out_dir


def load_hint(out: Path) -> str:
    """'wrote OUT; load it with ...', naming the class its config.json holds and, with a
    tokenizer beside it, the fill-mask pipeline."""
    architecture = json.loads((out / HF_CONFIG).read_text())["architectures"][0]
    hint = f"wrote {out}; load it with {architecture}.from_pretrained({str(out)!r})"
    if (out / HF_TOKENIZER).is_file():
        hint += f" or pipeline('fill-mask', model={str(out)!r})"
    else:
        hint += "; no tokenizer was written (add the training dataset's with --dataset DIR)"
    return hint


# ---- tokenizer and model card beside the weights ---------------------------------------------

def hf_class(cfg: ModelConfig) -> str:
    """The transformers class that holds every exported weight."""
    if cfg.arch != "megatron_bert":
        return hf_config_dict(cfg)["architectures"][0]
    return "MegatronBertForPreTraining" if cfg.binary_head else HF_MLM_ONLY


def dataset_of_run(config: Mapping) -> str | None:
    """The dataset directory a run trained on, from its config (the run record's `config`): data.path,
    or the cached embedded corpus for that data config (None when the config says neither)."""
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
    # ModernBertForMaskedLM takes no token type ids.
    inputs = ["input_ids", "attention_mask"] if cfg.arch == "modernbert" else ["input_ids", "token_type_ids",
                                                                               "attention_mask"]
    config = {"tokenizer_class": "BertTokenizer" if bert else "PreTrainedTokenizerFast",
              "do_lower_case": lowercase, "strip_accents": None, "tokenize_chinese_chars": True,
              **_SPECIAL, "model_max_length": cfg.max_position_embeddings, "model_input_names": inputs}
    files = {HF_TOKENIZER: tok.to_str(pretty=True), "vocab.txt": vocab_text(tok),
             "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
             "special_tokens_map.json": json.dumps(_SPECIAL, indent=2) + "\n"}
    if not _is_wordpiece(tok):  # vocab.txt is WordPiece's format; a BPE's merges live in tokenizer.json
        del files["vocab.txt"]
    return files, None


def _is_wordpiece(tok: Tokenizer) -> bool:
    return json.loads(tok.to_str()).get("model", {}).get("type") == "WordPiece"


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
    try:  # the tokenizer's model: WordPiece (mbert-prep's), BPE (ModernBERT's, RoBERTa's), ...
        tokenizer = Path(dataset_dir, meta.get("tokenizer_file", fmt.TOKENIZER_FILE))
        kind = json.loads(tokenizer.read_text())["model"]["type"]
    except (OSError, ValueError, KeyError, TypeError):
        kind = "WordPiece"
    return (f"{name}: {_n(summary.get('train_documents'))} training and {_n(summary.get('heldout_documents'))} "
            f"held-out documents, {_n(summary.get('tokens'))} tokens; {kind} {case}, "
            f"{_n(meta.get('vocab_size'))} entries")


def _n(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


_FAMILIES = {"megatron_bert": ("MegatronBERT", HF_MLM_ONLY), "modernbert": ("ModernBERT", "ModernBertForMaskedLM")}
"""model.arch -> (its name in the model card, the class `AutoModelForMaskedLM` loads)."""


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
    family, masked_lm_class = _FAMILIES[cfg.arch]
    init_from = trainer.get("init_from")
    origin = (f"pretrained with mbert-train {__version__}, starting from the weights of `{init_from}`" if init_from
              else f"pretrained from scratch with mbert-train {__version__}" if config
              else f"converted by mbert-convert {__version__} (no training run recorded)")
    return f"""---
library_name: transformers
pipeline_tag: fill-mask
tags:
- {hf_config_dict(cfg)["model_type"]}
- mbert-train
---

# {name}

A {family} model {origin}.

| | |
|---|---|
{table}

```python
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

fill = pipeline("fill-mask", model="path/to/{name}")
print(fill("The capital of France is [MASK]."))
tokenizer = AutoTokenizer.from_pretrained("path/to/{name}")
model = AutoModelForMaskedLM.from_pretrained("path/to/{name}")  # {masked_lm_class}
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
