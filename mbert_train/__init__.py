"""mbert-train: tensor-parallel MegatronBERT pretraining."""

__version__ = "0.1.0"
