"""Data pipeline throughput: mbert-prep MB/s and loader samples/s against the trainer's appetite.

    python benchmarks/bench_data.py [--repeat 4] [--steps 3]

1. Prep: `prepare()` on WikiText-2 valid (../shared/corpora, when present; else the embedded
   stdlib-docstring corpus text), repeated `--repeat` times into one file so fixed start-up
   costs do not dominate, with --num-proc 1 and 2. Reported as MB of raw text per second, for
   the whole run (tokenizer training included) and for the split+tokenise stage alone.
2. Loader: samples/s of the training loader (1 worker, NSP, seq 128, micro-batch 8).
3. Trainer: samples/s of forward+backward+AdamW of `transformers.MegatronBertForPreTraining`
   at BERT-base shapes (hidden 768, 12 layers, 12 heads, vocab 30522), micro-batch 8, seq 128.
   The ratio loader/trainer must stay well above 1 (target >= 10) for data never to stall.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from transformers import MegatronBertConfig, MegatronBertForPreTraining

from data_prep.config import PrepConfig
from data_prep.prep import prepare
from mbert_train.data import DataConfig, build_loaders, prepare_default_corpus
from mbert_train.data.default_corpus import cache_root

WIKITEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                        "corpora", "wikitext-2", "valid.txt")
MICRO_BATCH = 8
SEQ = 128


def source_text(work: str, repeat: int) -> tuple[str, str]:
    """(path of the benchmark input, what it is)."""
    candidates = [os.environ.get("MBERT_BENCH_TEXT", ""), WIKITEXT,
                  "/work/shared/corpora/wikitext-2/valid.txt"]
    found = next((p for p in candidates if p and os.path.isfile(p)), None)
    if found is None:
        prepare_default_corpus(DataConfig())
        root = cache_root(DataConfig())
        found = next(os.path.join(root, f) for f in sorted(os.listdir(root))
                     if f.startswith("stdlib-docs-") and f.endswith(".txt"))
        label = "embedded stdlib-docstring corpus (WikiText-2 not found)"
    else:
        label = "WikiText-2 valid.txt"
    raw = open(found, "rb").read()
    path = os.path.join(work, "input.txt")
    with open(path, "wb") as f:
        for _ in range(repeat):
            f.write(raw + b"\n\n")
    return path, f"{label} x{repeat} = {len(raw) * repeat / 1e6:.1f} MB"


def bench_prep(path: str, work: str, num_proc: int, tokenizer: str | None) -> float:
    out = os.path.join(work, f"ds-{num_proc}-{'tok' if tokenizer else 'train'}")
    started = time.perf_counter()
    summary = prepare(PrepConfig(inputs=[path], output=out, vocab_size=30522, num_proc=num_proc,
                                 tokenizer=tokenizer, quiet=True, overwrite=True))
    return summary["bytes_read"] / 1e6 / (time.perf_counter() - started)


def bench_loader(dataset_dir: str, batches: int) -> float:
    cfg = DataConfig(num_workers=1, max_seq_length=SEQ)
    train, _ = build_loaders(cfg, dataset_dir, seed=0, micro_batch_size=MICRO_BATCH, dp_rank=0,
                             dp_size=1)
    for _ in range(10):  # worker start-up and the first epoch map are not steady state
        next(train)
    started = time.perf_counter()
    for _ in range(batches):
        next(train)
    return batches * MICRO_BATCH / (time.perf_counter() - started)


def bench_trainer(steps: int) -> float:
    config = MegatronBertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                                num_attention_heads=12, intermediate_size=3072)
    model = MegatronBertForPreTraining(config)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(5, 30522, (MICRO_BATCH, SEQ))
    labels = torch.where(torch.rand(ids.shape) < 0.15, ids, torch.full_like(ids, -100))
    nsp = torch.randint(0, 2, (MICRO_BATCH,))

    def step() -> None:
        out = model(input_ids=ids, token_type_ids=torch.zeros_like(ids),
                    attention_mask=torch.ones_like(ids), labels=labels, next_sentence_label=nsp)
        out.loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    step()  # allocates optimizer state
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * MICRO_BATCH / (time.perf_counter() - started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=4, help="copies of the text in the prep input")
    p.add_argument("--steps", type=int, default=3, help="timed trainer steps")
    p.add_argument("--loader-batches", type=int, default=300)
    args = p.parse_args()
    print(f"torch threads {torch.get_num_threads()}, CPUs {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as work:
        path, label = source_text(work, args.repeat)
        print(f"prep input: {label}")
        for num_proc in (1, 2):
            mbps = bench_prep(path, work, num_proc, None)
            print(f"prep --num-proc {num_proc}: {mbps:.2f} MB/s (whole run, WordPiece training "
                  f"included)")
        tokenizer = os.path.join(work, "ds-1-train", "tokenizer.json")
        for num_proc in (1, 2):
            mbps = bench_prep(path, work, num_proc, tokenizer)
            print(f"prep --num-proc {num_proc} --tokenizer: {mbps:.2f} MB/s (existing vocabulary)")
        loader = bench_loader(os.path.join(work, "ds-1-train"), args.loader_batches)
    print(f"loader (1 worker, NSP, seq {SEQ}, micro-batch {MICRO_BATCH}): {loader:.0f} samples/s")
    trainer = bench_trainer(args.steps)
    print(f"trainer (MegatronBertForPreTraining BERT-base, fwd+bwd+AdamW, CPU): "
          f"{trainer:.2f} samples/s")
    print(f"loader / trainer = {loader / trainer:.0f}x (target >= 10x)")


if __name__ == "__main__":
    main()
