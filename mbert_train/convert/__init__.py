"""Conversions between mbert-train model directories and foreign formats, one module each.

- `hf`: Hugging Face MegatronBERT directories (from-hf, to-hf, and the tokenizer and model card
  an export carries);
- `megatron`: Megatron-LM BERT checkpoints (from-megatron, to-megatron);
- `common`: what both share: reading and writing our model directories, tensor checks, and the
  OUT_DIR protocol (refusal, staging, the `.mbert-convert.json` marker);
- `cli`: the `mbert-convert` command line (`python -m mbert_train.convert` runs it too).

Imports form a tree: cli -> hf, megatron -> common.
"""

from mbert_train.convert.cli import main

__all__ = ["main"]
