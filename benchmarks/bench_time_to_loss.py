"""Time to a held-out MLM loss: mbert-train against the Hugging Face Trainer path a user would
otherwise take (`MegatronBertForMaskedLM` + `DataCollatorForLanguageModeling` + `Trainer`).

    mbert-prep ../shared/corpora/wikitext-2/valid.txt -o /tmp/wt2 --quiet
    python benchmarks/bench_time_to_loss.py --data /tmp/wt2                  # h256 x 4, 300 steps
    python benchmarks/bench_time_to_loss.py --data /tmp/wt2 --compile        # ours with trainer.compile
    python benchmarks/bench_time_to_loss.py --data /tmp/wt2 --smoke          # seconds: a dry run

The same for both: the model (h256 x 4 layers by default, dropout 0.1, MLM-only) starting from
the same weights (the HF model's seeded init, imported with `mbert-convert from-hf`), the
tokenizer and data (the training windows our pipeline cuts from `--data`, in its order: HF's
collator masks them its own way, 15%), AdamW (lr, betas, eps 1e-6, weight decay 0.01, clip 1.0)
and the schedule (linear warmup, linear decay to 0), the micro-batch and the threads.

Ours runs the real `mbert-train` CLI in a child process, checkpointing every `--eval-every`
steps; HF runs `Trainer.train()` in this process afterwards, never at the same time. ONE
evaluator scores every model: each of our checkpoints is exported with `mbert_train.convert`
and loaded as `MegatronBertForMaskedLM`, like HF's final model, and all are run on the same
held-out batches with the same fixed masks (our eval loader: data.eval_seed). Ours' time at step
k is the sum of its training-step times (metrics.jsonl at log_every=1: tokens / tokens_per_s,
checkpoint and eval time excluded, the compile warm-up included); HF's is `train_runtime`.
The ratio line: the time at which ours first reaches HF's final held-out loss, over HF's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234
"""The trainer's seed (data order, masks, dropout); HF's Trainer gets the same."""


@dataclass(frozen=True)
class Setup:
    hidden: int
    layers: int
    heads: int
    seq: int
    batch: int
    steps: int
    eval_every: int
    eval_batches: int
    lr: float
    warmup: int


def setup_from(args) -> Setup:
    if args.smoke:
        return Setup(hidden=64, layers=2, heads=2, seq=32, batch=4, steps=args.steps or 4, eval_every=2,
                     eval_batches=2, lr=args.lr, warmup=1)
    steps = args.steps or 300
    return Setup(hidden=args.hidden, layers=args.layers, heads=args.heads, seq=args.seq, batch=args.batch,
                 steps=steps, eval_every=args.eval_every or max(1, steps // 10), eval_batches=args.eval_batches,
                 lr=args.lr, warmup=args.warmup if args.warmup is not None else steps // 10)


def data_config(s: Setup, data_dir: str):
    from mbert_train.data import DataConfig
    return DataConfig(path=data_dir, objective="none", max_seq_length=s.seq,
                      max_predictions_per_seq=max(1, round(0.15 * s.seq)), num_workers=0)


def model_config(s: Setup, vocab: int):
    from mbert_train.model import ModelConfig
    return ModelConfig(vocab_size=vocab, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                       intermediate_size=4 * s.hidden, binary_head=False)


def windows_and_heldout(s: Setup, data_dir: str) -> tuple[list[list[int]], list[int], list[dict]]:
    """Our trainer's training windows, unmasked, in its order; tokens per step; held-out batches."""
    from mbert_train.data import build_loaders
    train, heldout = build_loaders(data_config(s, data_dir), data_dir, seed=SEED, micro_batch_size=s.batch,
                                   dp_rank=0, dp_size=1)
    windows, tokens = [], []
    for _ in range(s.steps):
        batch = next(train)
        ids = torch.where(batch["mlm_labels"] != -100, batch["mlm_labels"], batch["input_ids"])
        for row, mask in zip(ids, batch["attention_mask"]):
            windows.append(row[mask.bool()].tolist())
        tokens.append(int(batch["attention_mask"].sum()))
    held = [b for _, b in zip(range(s.eval_batches), heldout)]
    if not held:
        raise SystemExit(f"--data {data_dir}: no held-out batches at seq {s.seq}; use a larger corpus")
    return windows, tokens, held


def evaluate(model, held: list[dict]) -> float:
    """The one evaluator: mean cross-entropy over the masked tokens of the fixed held-out batches."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for b in held:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           token_type_ids=b.get("token_type_ids")).logits
            picked = b["mlm_labels"] != -100
            total += float(torch.nn.functional.cross_entropy(logits[picked].float(), b["mlm_labels"][picked],
                                                             reduction="sum"))
            count += int(picked.sum())
    return total / count


def initial_model(s: Setup, vocab: int, work: Path) -> Path:
    """HF's seeded init, saved, and imported for ours with mbert-convert's from-hf."""
    from transformers import MegatronBertConfig, MegatronBertForMaskedLM

    from mbert_train.convert import from_hf, hf_config_dict
    cfg = hf_config_dict(model_config(s, vocab))
    cfg.pop("architectures", None)
    torch.manual_seed(SEED)
    MegatronBertForMaskedLM(MegatronBertConfig(**cfg)).save_pretrained(work / "init_hf")
    return from_hf(work / "init_hf", work / "init_ours", tp=1)


def run_ours(s: Setup, vocab: int, data_dir: str, init: Path, work: Path, threads: int, compile_: bool) -> Path:
    run_dir = work / "ours"
    model = dataclasses.asdict(model_config(s, vocab))  # every field: the preset's must not differ from HF's
    overrides = [*(f"model.{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                   for k, v in model.items()),
        "data=prepared", f"data.path={data_dir}", "data.objective=none", f"data.max_seq_length={s.seq}",
        f"data.max_predictions_per_seq={max(1, round(0.15 * s.seq))}",
        f"trainer.micro_batch_size={s.batch}", f"trainer.max_steps={s.steps}", f"trainer.seed={SEED}",
        "trainer.log_every=1", "trainer.eval_every=0", f"trainer.checkpoint_every={s.eval_every}",
        f"trainer.keep_last={s.steps // s.eval_every + 1}", "trainer.export_hf=false", f"trainer.init_from={init}",
        f"trainer.compile={str(compile_).lower()}", f"optim.lr={s.lr}", f"optim.warmup_steps={s.warmup}",
        "optim.decay=linear", "optim.weight_decay=0.01", "optim.eps=1e-6", "logging.wandb_mode=disabled",
        "logging.progress_bar=false", f"run.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MBERT_CACHE=str(work / "cache"), WANDB_SILENT="true")
    proc = subprocess.run([sys.executable, "-m", "mbert_train.train", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mbert-train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return run_dir


def ours_curve(run_dir: Path, tokens: list[int], held: list[dict]) -> tuple[list[dict], list[float]]:
    """[{step, time_s, loss}] at every checkpoint, and the step times, from metrics.jsonl."""
    from transformers import MegatronBertForMaskedLM

    from mbert_train.convert import export_hf, load_model_dir
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "tokens_per_s" in r}
    durations = [tokens[k - 1] / steps[k]["tokens_per_s"] for k in sorted(steps)]
    curve = []
    for ckpt in sorted((run_dir / "checkpoints").glob("step_*")):
        step = int(ckpt.name.split("_")[1])
        full, cfg = load_model_dir(ckpt)
        out = export_hf(full, cfg, run_dir / "hf_eval" / ckpt.name)
        curve.append(dict(step=step, time_s=sum(durations[:step]),
                          loss=evaluate(MegatronBertForMaskedLM.from_pretrained(out), held)))
    return curve, durations


class StepTimes(TrainerCallback):
    """Each optimizer step's wall time in HF's Trainer."""

    def __init__(self):
        self.times, self._start = [], 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self._start)


def run_hf(s: Setup, data_dir: str, windows: list[list[int]], work: Path):
    from transformers import (DataCollatorForLanguageModeling, MegatronBertForMaskedLM, PreTrainedTokenizerFast,
                              Trainer, TrainingArguments)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(data_dir) / "tokenizer.json"), unk_token="[UNK]",
                                        pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                                        mask_token="[MASK]")

    class Windows(torch.utils.data.Dataset):
        def __len__(self):
            return len(windows)

        def __getitem__(self, i):
            return {"input_ids": windows[i]}

    model = MegatronBertForMaskedLM.from_pretrained(work / "init_hf")
    args = TrainingArguments(output_dir=str(work / "hf_out"), max_steps=s.steps, per_device_train_batch_size=s.batch,
                             learning_rate=s.lr, warmup_steps=s.warmup, lr_scheduler_type="linear",
                             weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-6,
                             max_grad_norm=1.0, save_strategy="no", report_to=[], logging_strategy="no",
                             dataloader_num_workers=0, use_cpu=True, seed=SEED, disable_tqdm=True)
    steps = StepTimes()
    trainer = Trainer(model=model, args=args, train_dataset=Windows(),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
                      callbacks=[steps])
    result = trainer.train()
    return model, result.metrics["train_runtime"], steps.times, str(getattr(args.optim, "value", args.optim))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="an mbert-prep dataset (e.g. of wikitext-2/valid.txt)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of both runs (default 300; smoke 4)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of both runs")
    p.add_argument("--smoke", action="store_true", help="a tiny model for a few steps: checks the script runs")
    p.add_argument("--compile", action="store_true", help="ours with trainer.compile=true")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=None, help="warmup steps (default 10%% of --steps)")
    p.add_argument("--eval-every", type=int, default=None, help="steps between our checkpoints (default 10%%)")
    p.add_argument("--eval-batches", type=int, default=16, help="held-out micro-batches of the evaluator")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if not (Path(args.data) / "metadata.json").is_file():
        raise SystemExit(f"--data {args.data}: not an mbert-prep dataset; prepare one with "
                         f"`mbert-prep ../shared/corpora/wikitext-2/valid.txt -o /tmp/wt2`")
    s = setup_from(args)
    torch.set_num_threads(args.threads)
    from mbert_train.data import open_dataset
    vocab = open_dataset(args.data).vocab_size
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-ttl-") as tmp:
        work = Path(tmp)
        windows, tokens, held = windows_and_heldout(s, args.data)
        init = initial_model(s, vocab, work)
        run_dir = run_ours(s, vocab, args.data, init, work, args.threads, args.compile)
        curve, ours_steps = ours_curve(run_dir, tokens, held)
        hf_model, hf_time, hf_steps, hf_optim = run_hf(s, args.data, windows, work)
        hf_loss = evaluate(hf_model, held)
    reached = next((point for point in curve if point["loss"] <= hf_loss), None)
    ratio = reached["time_s"] / hf_time if reached else None
    masked = sum(int((b["mlm_labels"] != -100).sum()) for b in held)
    print(f"bench_time_to_loss: model h{s.hidden} x {s.layers} layers ({s.heads} heads, I {4 * s.hidden}), "
          f"vocab {vocab}, seq {s.seq}, batch {s.batch}, {s.steps} steps, lr {s.lr:g} warmup {s.warmup} linear, "
          f"dropout 0.1, MLM-only, threads {args.threads}, ours compile={args.compile}, HF optim {hf_optim}, "
          f"load average {load:.2f} at start")
    print(f"data: {args.data}; evaluator: {len(held)} held-out batches, {masked} masked tokens, fixed masks")
    print("| run | steps | train s | median step ms | final held-out loss |")
    print("|---|---|---|---|---|")
    print(f"| HF Trainer | {s.steps} | {hf_time:.1f} | {1000 * statistics.median(hf_steps):.0f} | {hf_loss:.4f} |")
    print(f"| mbert-train | {s.steps} | {sum(ours_steps):.1f} | {1000 * statistics.median(ours_steps):.0f} | "
          f"{curve[-1]['loss']:.4f} |")
    print("ours by step: " + ", ".join(f"{c['step']}: {c['loss']:.4f} at {c['time_s']:.1f} s" for c in curve))
    if reached:
        print(f"ratio: time to HF's final held-out loss ours/HF {ratio:.2f}x (ours {reached['loss']:.4f} <= "
              f"{hf_loss:.4f} at step {reached['step']}, {reached['time_s']:.1f} s; HF {hf_time:.1f} s)")
    else:
        print(f"ratio: time to HF's final held-out loss ours/HF not reached (ours' best "
              f"{min(c['loss'] for c in curve):.4f} > {hf_loss:.4f}; HF {hf_time:.1f} s)")
    if args.json:
        args.json.write_text(json.dumps(dict(
            setup=s.__dict__, threads=args.threads, compile=args.compile, vocab=vocab, load_average=load,
            hf=dict(train_s=hf_time, step_s=hf_steps, heldout_loss=hf_loss, optim=str(hf_optim)),
            ours=dict(train_s=sum(ours_steps), step_s=ours_steps, curve=curve),
            ratio=ratio), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
