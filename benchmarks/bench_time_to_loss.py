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

Ours runs the real `mbert-train` CLI in a child process, HF runs `Trainer.train()` in this process
afterwards, never at the same time; both save the model every `--eval-every` steps (HF with
`save_only_model`: no optimizer state). ONE evaluator scores every saved model and the shared
initial one (step 0): our checkpoints are exported with `mbert_train.convert.hf` and loaded as
`MegatronBertForMaskedLM` like HF's, and all run on the same held-out batches with the same fixed
masks (our eval loader: data.eval_seed). A run's time at step k is the sum of its training-step
times up to k, batch loading included and checkpoint saving excluded on both sides: ours from
metrics.jsonl at log_every=1 (tokens / tokens_per_s; the compile warm-up included), HF's from a
callback timing each step from the end of the previous one (or of the save after it). HF's
`train_runtime` (saves included) is printed too.

Two ratio lines. The first: the time of the first evaluation at which ours is at or below HF's
final held-out loss, over HF's time to its final step. Near a plateau that verdict is decided by
the evaluator's noise (printed: the standard error of each mean, and of the paired difference),
so the second line compares both runs at a target both reach, the larger of the two final
losses: each run's time to first get at or below it, interpolated linearly in time between the
two evaluations that bracket the crossing. The step-time line is the ratio of median steps.
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


def token_losses(model, held: list[dict]) -> torch.Tensor:
    """The one evaluator: cross-entropy of each masked token of the fixed held-out batches, in order."""
    model.eval()
    losses = []
    with torch.no_grad():
        for b in held:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           token_type_ids=b.get("token_type_ids")).logits
            picked = b["mlm_labels"] != -100
            losses.append(torch.nn.functional.cross_entropy(logits[picked].float(), b["mlm_labels"][picked],
                                                            reduction="none").double())
    return torch.cat(losses)


def sem(values: torch.Tensor) -> float:
    """Standard error of the mean: std / sqrt(n)."""
    return float(values.std() / values.numel() ** 0.5)


def scored_curve(models, held: list[dict], initial: torch.Tensor, times: list[float]):
    """[{step, time_s, loss}] from step 0 (the shared init) and (step, model) pairs, and the last
    model's token losses; time_s = the sum of the first `step` step times."""
    curve, last = [dict(step=0, time_s=0.0, loss=float(initial.mean()))], initial
    for step, load in models:
        last = token_losses(load(), held)
        curve.append(dict(step=step, time_s=sum(times[:step]), loss=float(last.mean())))
    return curve, last


def initial_model(s: Setup, vocab: int, work: Path) -> Path:
    """HF's seeded init, saved, and imported for ours with mbert-convert's from-hf."""
    from transformers import MegatronBertConfig, MegatronBertForMaskedLM

    from mbert_train.convert.hf import from_hf, hf_config_dict
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


def ours_curve(run_dir: Path, tokens: list[int], held: list[dict], initial: torch.Tensor):
    """Our curve at every checkpoint, the final model's token losses and the step times (metrics.jsonl)."""
    from transformers import MegatronBertForMaskedLM

    from mbert_train.convert.common import load_model_dir
    from mbert_train.convert.hf import export_hf
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "tokens_per_s" in r}
    durations = [tokens[k - 1] / steps[k]["tokens_per_s"] for k in sorted(steps)]

    def loader(ckpt: Path):
        def load():
            full, cfg = load_model_dir(ckpt)
            return MegatronBertForMaskedLM.from_pretrained(export_hf(full, cfg, run_dir / "hf_eval" / ckpt.name))
        return load
    ckpts = sorted((run_dir / "checkpoints").glob("step_*"), key=lambda c: int(c.name.split("_")[1]))
    curve, final = scored_curve([(int(c.name.split("_")[1]), loader(c)) for c in ckpts], held, initial, durations)
    return curve, final, durations


class StepTimes(TrainerCallback):
    """Each optimizer step's wall time in HF's Trainer, from the end of the previous step (or of the
    checkpoint saved after it) to its own end: batch loading and collation in, saving out, as ours."""

    def __init__(self):
        self.times, self.save_s, self._mark = [], 0.0, 0.0

    def on_train_begin(self, args, state, control, **kw):
        self._mark = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        self.times.append(now - self._mark)
        self._mark = now

    def on_save(self, args, state, control, **kw):
        now = time.perf_counter()
        self.save_s += now - self._mark
        self._mark = now


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
    # Saves every eval_every steps, the model only (no optimizer, scheduler or RNG state): scored afterwards.
    args = TrainingArguments(output_dir=str(work / "hf_out"), max_steps=s.steps, per_device_train_batch_size=s.batch,
                             learning_rate=s.lr, warmup_steps=s.warmup, lr_scheduler_type="linear",
                             weight_decay=0.01, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-6,
                             max_grad_norm=1.0, save_strategy="steps", save_steps=s.eval_every, save_only_model=True,
                             report_to=[], logging_strategy="no", dataloader_num_workers=0, use_cpu=True, seed=SEED,
                             disable_tqdm=True)
    steps = StepTimes()
    trainer = Trainer(model=model, args=args, train_dataset=Windows(),
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15),
                      callbacks=[steps])
    result = trainer.train()
    saved = {int(c.name.split("-")[1]): c for c in (work / "hf_out").glob("checkpoint-*")}
    models = [(k, lambda c=saved[k]: MegatronBertForMaskedLM.from_pretrained(c)) for k in sorted(saved)]
    if s.steps not in saved:  # the last step is no multiple of eval_every: score the final model as it is
        models.append((s.steps, lambda: model))
    return models, dict(runtime_s=result.metrics["train_runtime"], step_s=steps.times, save_s=steps.save_s,
                        optim=str(getattr(args.optim, "value", args.optim)))


def crossing(curve: list[dict], target: float) -> dict | None:
    """Where the curve first gets at or below target: time and step interpolated linearly between
    the two evaluations that bracket the crossing; None if it never does."""
    i = next((i for i, point in enumerate(curve) if point["loss"] <= target), None)
    if i is None or i == 0:
        return None if i is None else dict(time_s=0.0, step=0.0)
    a, b = curve[i - 1], curve[i]
    f = (a["loss"] - target) / (a["loss"] - b["loss"])  # in (0, 1]: a is above target, b at or below
    return dict(time_s=a["time_s"] + f * (b["time_s"] - a["time_s"]), step=a["step"] + f * (b["step"] - a["step"]))


def ratios(hf_curve: list[dict], ours_curve_: list[dict], hf_steps: list[float], ours_steps: list[float]) -> dict:
    hf_final, ours_final = hf_curve[-1]["loss"], ours_curve_[-1]["loss"]
    reached = next((point for point in ours_curve_[1:] if point["loss"] <= hf_final), None)
    target = max(hf_final, ours_final)
    ours_at, hf_at = crossing(ours_curve_, target), crossing(hf_curve, target)
    return dict(
        to_hf_final=dict(ratio=reached["time_s"] / sum(hf_steps) if reached else None, reached=reached,
                         hf_time_s=sum(hf_steps)),
        common_target=dict(target=target, ours=ours_at, hf=hf_at,
                           ratio=ours_at["time_s"] / hf_at["time_s"] if hf_at["time_s"] > 0 else None),
        step_time=statistics.median(ours_steps) / statistics.median(hf_steps))


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
    p.add_argument("--eval-every", type=int, default=None,
                   help="steps between the saved (and scored) models of both runs (default 10%%)")
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
        initial = token_losses(load_hf(work / "init_hf"), held)
        run_dir = run_ours(s, vocab, args.data, init, work, args.threads, args.compile)
        curve, ours_final, ours_steps = ours_curve(run_dir, tokens, held, initial)
        hf_models, hf = run_hf(s, args.data, windows, work)
        hf["curve"], hf_final = scored_curve(hf_models, held, initial, hf["step_s"])
    result = dict(setup=s.__dict__, threads=args.threads, compile=args.compile, vocab=vocab, load_average=load,
                  evaluator=dict(batches=len(held), masked_tokens=int(initial.numel()),
                                 difference_sem=sem(ours_final - hf_final)),
                  hf=dict(hf, train_s=sum(hf["step_s"]), heldout_loss=float(hf_final.mean()),
                          heldout_sem=sem(hf_final)),
                  ours=dict(train_s=sum(ours_steps), step_s=ours_steps, curve=curve,
                            heldout_loss=float(ours_final.mean()), heldout_sem=sem(ours_final)),
                  ratios=ratios(hf["curve"], curve, hf["step_s"], ours_steps))
    result["ratio"] = result["ratios"]["to_hf_final"]["ratio"]
    report(s, args, result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def load_hf(path: Path):
    from transformers import MegatronBertForMaskedLM
    return MegatronBertForMaskedLM.from_pretrained(path)


def report(s: Setup, args, r: dict) -> None:
    hf, ours, ev, q = r["hf"], r["ours"], r["evaluator"], r["ratios"]
    print(f"bench_time_to_loss: model h{s.hidden} x {s.layers} layers ({s.heads} heads, I {4 * s.hidden}), "
          f"vocab {r['vocab']}, seq {s.seq}, batch {s.batch}, {s.steps} steps, lr {s.lr:g} warmup {s.warmup} linear, "
          f"dropout 0.1, MLM-only, threads {args.threads}, ours compile={args.compile}, HF optim {hf['optim']}, "
          f"load average {r['load_average']:.2f} at start")
    print(f"data: {args.data}; evaluator: {ev['batches']} held-out batches, {ev['masked_tokens']} masked tokens, "
          f"fixed masks, every {s.eval_every} steps")
    print("train s: the sum of training-step times (batch loading in, checkpoint saving out)")
    print("| run | steps | train s | median step ms | final held-out loss | s.e. |")
    print("|---|---|---|---|---|---|")
    for name, run in (("HF Trainer", hf), ("mbert-train", ours)):
        print(f"| {name} | {s.steps} | {run['train_s']:.1f} | {1000 * statistics.median(run['step_s']):.0f} | "
              f"{run['heldout_loss']:.4f} | {run['heldout_sem']:.4f} |")
    print(f"HF train_runtime {hf['runtime_s']:.1f} s ({hf['save_s']:.1f} s of it saving {len(hf['curve']) - 1} "
          f"models)")
    print(f"evaluator noise: standard error of the mean held-out loss (per-token std / sqrt({ev['masked_tokens']})) "
          f"HF {hf['heldout_sem']:.4f}, ours {ours['heldout_sem']:.4f}; of the paired difference ours - HF "
          f"({ours['heldout_loss'] - hf['heldout_loss']:+.4f}) on the same tokens {ev['difference_sem']:.4f}")
    for name, run in (("HF", hf), ("ours", ours)):
        print(f"{name} by step: " + ", ".join(f"{c['step']}: {c['loss']:.4f} at {c['time_s']:.1f} s"
                                              for c in run["curve"]))
    first, common = q["to_hf_final"], q["common_target"]
    if first["reached"]:
        hit = first["reached"]
        print(f"ratio: time to HF's final held-out loss ours/HF {first['ratio']:.2f}x (ours {hit['loss']:.4f} <= "
              f"{hf['heldout_loss']:.4f} at step {hit['step']}, {hit['time_s']:.1f} s; HF {first['hf_time_s']:.1f} s "
              f"to step {s.steps})")
    else:
        print(f"ratio: time to HF's final held-out loss ours/HF not reached (ours' best "
              f"{min(c['loss'] for c in ours['curve']):.4f} > {hf['heldout_loss']:.4f}; HF {first['hf_time_s']:.1f} s "
              f"to step {s.steps})")
    shown = "n/a (HF's initial loss is at or below it)" if common["ratio"] is None else f"{common['ratio']:.2f}x"
    print(f"ratio at a common target loss {common['target']:.4f} (the larger final loss): ours/HF {shown} "
          f"(ours {common['ours']['time_s']:.1f} s at step ~{common['ours']['step']:.0f}, HF "
          f"{common['hf']['time_s']:.1f} s at step ~{common['hf']['step']:.0f}; linear interpolation in time "
          f"between the evaluations that bracket it)")
    print(f"ratio: median step time ours/HF {q['step_time']:.2f}x ({1000 * statistics.median(ours['step_s']):.0f} / "
          f"{1000 * statistics.median(hf['step_s']):.0f} ms)")

if __name__ == "__main__":
    sys.exit(main())
