"""The batch contract between the data pipeline and the model: what a micro-batch holds.

The collator (`mbert_train.data.collate`) builds, and `MegatronBert.forward` reads, int64 tensors:
`input_ids`, `token_type_ids`, `attention_mask` (1 on real tokens) and `mlm_labels`, all (b, s),
and `nsp_labels` (b,) where the model has a binary head.
"""

IGNORE_INDEX = -100
"""`mlm_labels` of a position with nothing to predict (padding, unmasked tokens): the value
`torch.nn.functional.cross_entropy` and transformers ignore by default."""

BATCH_KEYS = ("input_ids", "token_type_ids", "attention_mask", "mlm_labels", "nsp_labels")
