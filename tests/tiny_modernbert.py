"""A tiny Hugging Face ModernBERT directory, as `save_pretrained` writes the published one: a
`ModernBertForMaskedLM` and a byte-level BPE tokenizer holding [UNK] [CLS] [SEP] [PAD] [MASK] at
the end of its vocabulary (the published: 50280-50284), [MASK] absorbing the space before it.
Nothing is downloaded."""

from __future__ import annotations

import random
from pathlib import Path

SPECIAL = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")
BPE_SIZE = 300  # then the five special tokens: ids 300-304, [PAD] 303


def texts(n_docs: int, seed: int = 0) -> list[str]:
    """Documents of a few sentences over a 400-word vocabulary, blank-line separated in a file."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(400)]
    return ["\n".join(" ".join(rng.choices(words, k=rng.randint(6, 20))).capitalize() + "."
                      for _ in range(rng.randint(3, 8))) for _ in range(n_docs)]


def byte_level_bpe(docs: list[str]):
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_SIZE, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    tok.add_special_tokens([*SPECIAL[:-1], AddedToken("[MASK]", lstrip=True)])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS]:0 $A:0 [SEP]:0",
                                                       pair="[CLS]:0 $A:0 [SEP]:0 $B:0 [SEP]:0",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tok


def save_tiny_modernbert(path: Path, docs: list[str], *, hidden_size: int = 64, num_layers: int = 2,
                         num_heads: int = 4, intermediate_size: int = 128, seed: int = 0, **config) -> Path:
    """`path` holding config.json, model.safetensors, tokenizer.json and tokenizer_config.json;
    every weight drawn at random (norms and biases too, so that none is at its init value)."""
    import torch
    from transformers import (
        ModernBertConfig,
        ModernBertForMaskedLM,
        PreTrainedTokenizerFast,
    )

    tok = byte_level_bpe(docs)
    ids = {token: tok.token_to_id(token) for token in SPECIAL}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                            pad_token="[PAD]", mask_token="[MASK]",
                            model_input_names=["input_ids", "attention_mask"]).save_pretrained(path)
    cfg = ModernBertConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden_size, num_hidden_layers=num_layers,
                           num_attention_heads=num_heads, intermediate_size=intermediate_size,
                           pad_token_id=ids["[PAD]"], cls_token_id=ids["[CLS]"], sep_token_id=ids["[SEP]"],
                           bos_token_id=ids["[CLS]"], eos_token_id=ids["[SEP]"], **config)
    torch.manual_seed(seed)
    model = ModernBertForMaskedLM(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(path)
    return path
