"""One training step (forward, backward, AdamW) of our MegatronBert against the reference
`transformers.MegatronBertForPreTraining`, and of our ModernBert against
`transformers.ModernBertForMaskedLM`, in the configuration users train with, next to the
same-math floor: time, CPU time, throughput, MFU and memory at the same shapes.

    python benchmarks/bench_model.py --data DIR             # BERT-base S=128 and S=512, real batches
    python benchmarks/bench_model.py                        # the same on synthetic batches (says so)
    python benchmarks/bench_model.py --shapes tiny --steps 1 --warmup 0    # a dry run
    python benchmarks/bench_model.py --bf16 --shapes large512 --batch 16   # CUDA: bf16 autocast, MFU
    python benchmarks/bench_model.py --profile base128      # torch.profiler top ops of each model
    python benchmarks/bench_model.py --data DIR --shapes modern1024 --warmup 1   # ModernBERT-base S=1024

DIR is an `mbert-prep` dataset, e.g. `mbert-prep ../shared/corpora/wikitext-2/valid.txt -o
/tmp/wt2`. Batches then come from our own data pipeline (`build_loaders`: NSP pairs, BERT's
masking with its prediction cap, 20 at seq 128 and 80 at seq 512, each batch padded to its
longest sample rounded up to 8, as the collator does); without --data they are synthetic
with the same length distribution targets and the same collator, and the header says so.

ModernBERT (shapes `modern*`, benchmarks/modern.py): the modernbert-base preset composed as a
run composes it, its dropouts (0, as published) and its data settings (MLM only,
data.objective=none, 30 % of the tokens masked, no prediction cap); the reference gets
input_ids, attention_mask and labels (its dense MLM head, the loss over the masked positions)
with SDPA attention, transformers' fastest on CPU for it (`--ref-attention eager` for the
other); ours its training forward on the batch as the collator built it (packed, the last
layer and the MLM head on the masked tokens); the weights are the reference's seeded init,
loaded with `modernbert_hf.load_hf_state_dict`. The loss check and the memory counters are the
same as below.

Fairness: both models hold the same weights (the reference's seeded init, copied into ours with
`hf_to_full` + `shard_state_dict`), see the same batches, run the presets' dropout (0.1 on
hidden states and attention probabilities; `--dropout 0` for the old comparison) in train
mode, and optimise the same MLM + NSP loss with fused AdamW. Dropout masks differ between the
two implementations, so the losses are compared on a dropout-0 forward of the first batch
(eval mode), which must agree to 1e-4 in fp32. Ours runs TP=1 in one process with
`mlm_masked_only=True` (the trainer's default) and its default attention dropout (fused SDPA
on CUDA); the reference runs SDPA where transformers offers it for MegatronBERT, else eager.

Same-math floor: the encoder's dense GEMMs at the same shapes (QKV, attention-out, MLP-in,
MLP-out of every layer, forward + both backward GEMMs, on the padded tokens) plus the fused
AdamW step over the model's parameters, timed in a fresh process like the models. No
implementation of the same math on the padded batch can step in less, so ref/floor is the
largest speed-up possible for it. Ours packs each batch (`unpad`: the layers run on the real
tokens only), so it can step in less; the same GEMMs on the real tokens only ("floor on real
tokens") are its own cap, and ours/real floor is how far it is from it.

MFU (CUDA) and achieved TFLOP/s credit both models the same model FLOPs, counted on the real
(unpadded) tokens by `mbert_train.arithmetic` with the MLM head on the masked tokens.

Memory: each (model, shape) runs in a fresh subprocess. On CPU the worker reads the kernel's
counters: once the model, optimizer and batches exist, `malloc_trim(0)`, reset the high-water
mark (`echo 5 > /proc/self/clear_refs`), VmRSS is the baseline; "step MB" is VmHWM minus that
baseline over all steps. On CUDA "step MB" is `max_memory_allocated()` minus
`memory_allocated()` at the same point, and "peak MB" is `max_memory_allocated()` itself.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import common
import modern
import torch
from common import (
    DROPOUT,
    Shape,
    batch_stats,
    data_dir_or_none,
    dataset_vocab,
    step_model_flops,
    with_overrides,
)

SHAPES = {**common.SHAPES, **modern.SHAPES}
MODELS = ("ref", "ours")
WORKERS = ("ref", "ours", "floor", "floor_real")
LOSS_TOL = {"fp32": 1e-4, "bf16": 2e-2}
TARGET_SPEEDUP = {"base128": 1.5, "base512": 1.7, "modern1024": 1.3}
TARGET_MEMORY = {"base512": 1.3, "modern1024": 1.3}


def family(shape: Shape):
    """The module that builds this shape's models and batches: common (MegatronBERT) or modern."""
    return modern if shape.arch == "modernbert" else common


def dropout_for(shape: Shape, args) -> float:
    """--dropout, else the family's presets' (MegatronBERT 0.1, ModernBERT 0)."""
    if args.dropout is not None:
        return args.dropout
    return modern.preset_dropout() if shape.arch == "modernbert" else DROPOUT


def resolve_shape(name: str, args) -> Shape:
    return with_overrides(SHAPES[name], batch=args.batch, vocab=dataset_vocab(args.data) if args.data else None)


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def train_step(fam, which, model, opt, batch, bf16: bool) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    with _autocast(batch["input_ids"].device, bf16):
        loss = fam.loss_of(which, model, batch)
    loss.backward()
    opt.step()
    return loss.detach()


def loss_without_dropout(fam, which, model, batch, bf16: bool) -> float:
    """The loss of a dropout-free forward (eval mode): comparable between the two models."""
    model.eval()
    with torch.no_grad(), _autocast(batch["input_ids"].device, bf16):
        loss = fam.loss_of(which, model, batch).item()
    model.train()
    return loss


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_baseline(device: torch.device) -> tuple[float, str]:
    """Current bytes in use, after resetting the peak counter so that later peaks are the step's."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), "cuda.max_memory_allocated"
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (no peak reset: includes model build)"
    return _proc_status_kb("VmRSS") * 1024.0, method


def memory_peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # kB on Linux


def peak_flops(device: torch.device, bf16: bool, override: float | None) -> float | None:
    """Peak FLOP/s of the device at the precision the matmuls run in (the one table)."""
    from mbert_train.arithmetic import peak_tflops
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    precision = "bf16" if bf16 else ("tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
    peak = peak_tflops(torch.cuda.get_device_name(device), precision)
    return peak * 1e12 if peak else None


def timed(step, batches: list[dict], device: torch.device) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of `step(batch)` for each batch."""
    times, cpu_times = [], []
    for batch in batches:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return times, cpu_times


def model_worker(args, shape: Shape, device: torch.device) -> dict:
    fam = family(shape)
    cfg = fam.model_config(shape, dropout_for(shape, args))
    model, ref_attention = fam.build(args.model, cfg, device, args.ref_attention)
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in fam.batches_for(args.data, shape, args.warmup + args.steps)]
    check_loss = loss_without_dropout(fam, args.model, model, batches[0], args.bf16)
    # Fused AdamW for both: what mbert-train's engine uses and what transformers' Trainer
    # defaults to on torch >= 2.8; the optimizer costs the same and only the models differ.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    baseline, method = memory_baseline(device)
    losses = []
    times, cpu_times = timed(lambda b: losses.append(train_step(fam, args.model, model, opt, b, args.bf16).item()),
                             batches, device)
    return dict(times=times, cpu_times=cpu_times, losses=losses, check_loss=check_loss,
                batch_stats=[batch_stats(b) for b in batches], vocab=shape.vocab, batch=shape.batch,
                params=sum(p.numel() for p in model.parameters()), base_mb=baseline / 2**20,
                step_mb=(memory_peak(device) - baseline) / 2**20, peak_mb=memory_peak(device) / 2**20,
                mem_method=method, ref_attention=ref_attention)


def floor_worker(args, shape: Shape, device: torch.device) -> dict:
    """The encoder's dense GEMMs (forward, input grad, weight grad) at the models' shapes on the
    padded tokens of each batch (`floor`) or on its real tokens only (`floor_real`), plus the
    fused AdamW step over the model's parameters."""
    fam = family(shape)
    cfg = fam.model_config(shape, dropout_for(shape, args))
    torch.manual_seed(0)
    with torch.device(device):
        params = fam.floor_parameters(cfg)  # for their count and shapes only
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    dims = fam.gemm_dims(shape)  # (out, in): QKV, attention-out, MLP-in, MLP-out
    weights = [[torch.randn(o, n, device=device, dtype=dtype) * 0.02 for o, n in dims] for _ in range(shape.layers)]
    batches = fam.batches_for(args.data, shape, args.warmup + args.steps)
    if args.model == "floor_real":
        widths = [int(b["attention_mask"].sum()) for b in batches]  # tokens per step
    else:
        widths = [b["input_ids"].numel() for b in batches]
    buffers = {}
    for t in set(widths):
        buffers[t] = [(torch.randn(t, n, device=device, dtype=dtype), torch.randn(t, o, device=device, dtype=dtype))
                      for o, n in dims]

    def step(width: int) -> None:
        for layer in weights:
            for weight, (x, dy) in zip(layer, buffers[width], strict=True):
                x @ weight.T       # forward
                dy @ weight        # input gradient
                dy.T @ x           # weight gradient
        opt.step()

    times, cpu_times = timed(step, widths, device)
    return dict(times=times, cpu_times=cpu_times, params=sum(p.numel() for p in params))


def worker(args) -> dict:
    """Runs in a fresh process: one model (or the floor), its steps, reported as JSON."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    gc.collect()  # in-process runs: the previous model's memory is back before this one starts
    if device.type == "cuda":
        torch.cuda.empty_cache()
    shape = resolve_shape(args.shapes, args)
    out = (floor_worker if args.model.startswith("floor") else model_worker)(args, shape, device)
    w = args.warmup
    out.update(model=args.model, shape=args.shapes, step_s=statistics.median(out["times"][w:]),
               min_s=min(out["times"][w:]), cpu_s=statistics.median(out["cpu_times"][w:]),
               threads=torch.get_num_threads(), device=str(device),
               device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")
    return out


def _worker_flags(args) -> list[str]:
    flags = ["--device", args.device, "--steps", str(args.steps), "--warmup", str(args.warmup),
             "--ref-attention", args.ref_attention]
    for name in ("threads", "batch", "data", "peak_tflops", "dropout"):
        if getattr(args, name) is not None:
            flags += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return flags + (["--bf16"] if args.bf16 else [])


def run_worker(model: str, shape: str, args) -> dict:
    if args.in_process:
        return worker(argparse.Namespace(**{**vars(args), "model": model, "shapes": shape}))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, "--shapes", shape, *_worker_flags(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {model}/{shape} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    memory = f", step {out['step_mb']:.0f} MB" if "step_mb" in out else ""
    print(f"  {shape} {model}: steps {', '.join(f'{t:.2f}' for t in out['times'])} s{memory}", file=sys.stderr,
          flush=True)  # progress, and what a cut-short run leaves
    return out


def summarise(shape_name: str, trio: dict, args) -> dict:
    """Throughput and MFU of both models over the timed steps, on the batches they saw."""
    ours = trio["ours"]
    shape = with_overrides(SHAPES[shape_name], batch=ours["batch"], vocab=ours["vocab"])
    cfg = family(shape).model_config(shape, dropout_for(shape, args))
    stats = ours["batch_stats"][args.warmup:]
    flops = sum(step_model_flops(cfg, s) for s in stats)
    real = sum(s["real"] for s in stats)
    padded = sum(s["rows"] * s["width"] for s in stats)
    device = torch.device(args.device)
    peak = peak_flops(device, args.bf16, args.peak_tflops) if device.type == "cuda" else (
        args.peak_tflops * 1e12 if args.peak_tflops else None)
    for r in (trio["ref"], ours):
        total = sum(r["times"][args.warmup:])
        r.update(tokens_per_s=real / total, achieved_tflops=flops / total / 1e12,
                 mfu=flops / total / peak if peak else None)
    return dict(real_tokens=real, padded_tokens=padded, masked=sum(s["masked"] for s in stats),
                model_flops=flops)


def print_tables(results: dict, summaries: dict, args) -> bool:
    """Per-model rows, then ratios and one `ratio` line per shape; whether every loss check passed."""
    ok = True
    tol = LOSS_TOL["bf16" if args.bf16 else "fp32"]
    with_mfu = all(r.get("mfu") is not None for trio in results.values() for r in (trio["ref"], trio["ours"]))
    print(f"| shape | model | step ms (median) | min ms | CPU s | real tokens/s | TFLOP/s | {'MFU | ' if with_mfu else ''}"
          "step MB | peak MB | loss, dropout 0 |")
    print("|---" * (10 + with_mfu) + "|")
    for shape, trio in results.items():
        for model in MODELS:
            r = trio[model]
            mfu = f"{100 * r['mfu']:.1f}% | " if with_mfu else ""
            print(f"| {shape} | {model} | {1000 * r['step_s']:.0f} | {1000 * r['min_s']:.0f} | {r['cpu_s']:.2f} | "
                  f"{r['tokens_per_s']:.0f} | {r['achieved_tflops']:.3f} | {mfu}{r['step_mb']:.0f} | "
                  f"{r['peak_mb']:.0f} | {r['check_loss']:.6f} |")
        for name, label in (("floor", "floor (GEMMs + AdamW)"), ("floor_real", "floor on real tokens")):
            f = trio[name]
            print(f"| {shape} | {label} | {1000 * f['step_s']:.0f} | {1000 * f['min_s']:.0f} | "
                  f"{f['cpu_s']:.2f} | | | {'| ' if with_mfu else ''}| | |")
    print()
    print("| shape | time ref/ours (median) | (min) | CPU time ref/ours | step memory ref/ours | ref/floor | ours/floor "
          "| ours/real floor | loss |ref-ours|, dropout 0 | targets |")
    print("|---" * 10 + "|")
    lines = []
    for shape, trio in results.items():
        ref, ours, floor = trio["ref"], trio["ours"], trio["floor"]
        speed, mem = ref["step_s"] / ours["step_s"], ref["step_mb"] / max(ours["step_mb"], 1e-9)
        ref_floor, ours_floor = ref["step_s"] / floor["step_s"], ours["step_s"] / floor["step_s"]
        ours_real_floor = ours["step_s"] / trio["floor_real"]["step_s"]
        diff = abs(ref["check_loss"] - ours["check_loss"])
        ok &= diff <= tol
        verdict = []
        if shape in TARGET_SPEEDUP:
            verdict.append(f"speed >= {TARGET_SPEEDUP[shape]}x {'met' if speed >= TARGET_SPEEDUP[shape] else 'MISSED'}")
        if shape in TARGET_MEMORY:
            verdict.append(f"memory >= {TARGET_MEMORY[shape]}x {'met' if mem >= TARGET_MEMORY[shape] else 'MISSED'}")
        print(f"| {shape} | {speed:.2f}x | {ref['min_s'] / ours['min_s']:.2f}x | {ref['cpu_s'] / ours['cpu_s']:.2f}x "
              f"| {mem:.2f}x | {ref_floor:.2f}x | {ours_floor:.2f}x | {ours_real_floor:.2f}x "
              f"| {diff:.1e} {'ok' if diff <= tol else 'FAIL'} "
              f"| {', '.join(verdict) or '-'} |")
        lines.append(f"ratio {shape}: time ref/ours {speed:.2f}x, step memory ref/ours {mem:.2f}x, "
                     f"ref/floor {ref_floor:.2f}x, ours/floor {ours_floor:.2f}x, ours/real floor {ours_real_floor:.2f}x, "
                     f"padding {1 - summaries[shape]['real_tokens'] / summaries[shape]['padded_tokens']:.1%}")
    print()
    print("\n".join(lines))
    return ok


CATEGORIES = ("optimizer (AdamW)", "vocab-sized: MLM decoder, loss, embedding grad",
              "attention: scores, softmax, context, head reshapes", "dense GEMMs: QKV, out, MLP, heads",
              "other: LayerNorm, GELU, dropout, residuals, embeddings, copies")


ATTENTION_OPS = ("bmm", "softmax", "scaled_dot_product")


def _category(event, vocab_dims: set[int]) -> str:
    """Attribute a profiler event (by itself and its ancestors' names and input shapes)."""
    chain, node = [], event
    while node is not None:
        chain.append(node)
        node = node.cpu_parent
    if any(e.name.startswith("Optimizer.step") for e in chain):
        return CATEGORIES[0]
    shapes = [shape for e in chain for shape in (e.input_shapes or []) if isinstance(shape, list)]
    if any(vocab_dims.intersection(shape) for shape in shapes):
        return CATEGORIES[1]
    # Neither model uses batched matmuls or (b, n, s, d) tensors outside attention; backward
    # nodes carry only their gradient's shape, hence the name check on the whole chain.
    names = " ".join(e.name.lower() for e in chain)
    if any(len(shape) in (4, 5) for shape in shapes) or any(k in names for k in ATTENTION_OPS):
        return CATEGORIES[2]
    if event.name in ("aten::mm", "aten::addmm"):
        return CATEGORIES[3]
    return CATEGORIES[4]


def time_breakdown(prof, shape: Shape, device: torch.device) -> dict[str, float]:
    """Self time (ms) per category; self times partition the step, so the categories sum to it."""
    from torch.autograd import DeviceType

    from mbert_train.arithmetic import padded_vocab_size
    vocab_dims = {shape.vocab, padded_vocab_size(shape.vocab, 1)}
    totals = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.events():
        # Kernels appear both as their own events and inside the CPU op that launched them.
        if event.device_type != DeviceType.CPU:
            continue
        us = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        totals[_category(event, vocab_dims)] += us / 1000.0
    return totals


def profile(shape_name: str, args) -> None:
    """torch.profiler over steps of each model, in this process (timings, not memory)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile
    device = torch.device(args.device)
    shape = resolve_shape(shape_name, args)
    fam = family(shape)
    if args.threads:
        torch.set_num_threads(args.threads)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in fam.batches_for(args.data, shape, args.warmup + args.steps)]
    print(fam.batches_label(args.data))
    breakdowns = {}
    for which in MODELS:
        model = fam.build(which, fam.model_config(shape, dropout_for(shape, args)), device, args.ref_attention)[0]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        for batch in batches[:args.warmup]:
            train_step(fam, which, model, opt, batch, args.bf16)
        # Several profiled steps, keep the fastest: on a shared machine noise only adds time.
        best = None
        for batch in batches[args.warmup:]:
            with torch_profile(activities=activities, record_shapes=True) as prof:
                train_step(fam, which, model, opt, batch, args.bf16)
            totals = time_breakdown(prof, shape, device)
            if best is None or sum(totals.values()) < sum(best[1].values()):
                best = prof, totals
        print(f"\n=== {which} @ {shape_name}: top ops by self time (fastest of {args.steps} steps) ===")
        print(best[0].key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=args.profile_rows,
                                                                     max_name_column_width=40))
        breakdowns[which] = best[1]
        del model, opt, best
    print(f"\n| {shape_name}: self time per category (ms, fastest profiled step) | ref | ours | ref - ours |")
    print("|---|---|---|---|")
    for cat in CATEGORIES + ("total",):
        ref = sum(breakdowns["ref"].values()) if cat == "total" else breakdowns["ref"][cat]
        ours = sum(breakdowns["ours"].values()) if cat == "total" else breakdowns["ours"][cat]
        print(f"| {cat} | {ref:.0f} | {ours:.0f} | {ref - ours:+.0f} |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="base128,base512", help=f"comma-separated subset of {', '.join(SHAPES)}")
    p.add_argument("--data", metavar="DIR", help="an mbert-prep dataset: batches from our data pipeline")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default: the shape's)")
    p.add_argument("--dropout", type=float, default=None,
                   help="hidden and attention dropout (default: the presets': MegatronBERT 0.1, ModernBERT 0)")
    p.add_argument("--ref-attention", choices=("auto", "sdpa", "eager"), default="auto",
                   help="the reference's attention (auto: MegatronBERT SDPA where transformers offers it, else "
                        "eager; ModernBERT SDPA, its fastest on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU when its name is not in mbert_train.arithmetic.PEAK_TFLOPS")
    p.add_argument("--profile", metavar="SHAPE", help="print a torch.profiler table per model instead")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--json", metavar="PATH", help="also write the raw results here")
    p.add_argument("--in-process", action="store_true",
                   help="run the models in this process, one after the other (faster start; memory not isolated)")
    p.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bf16 and not args.device.startswith("cuda"):
        p.error("--bf16 needs a CUDA device")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown or (args.profile and args.profile not in SHAPES):
        p.error(f"unknown shape {(unknown or [args.profile])[0]!r}; choose from {', '.join(SHAPES)}")
    args.data = data_dir_or_none(args.data)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.model = args.worker
        print(json.dumps(worker(args)))
        return 0
    if args.profile:
        profile(args.profile, args)
        return 0
    shapes = [SHAPES[name] for name in args.shapes.split(",")]
    dropouts = ", ".join(sorted({str(dropout_for(shape, args)) for shape in shapes}))
    print(f"device={args.device} dtype={'bf16 autocast' if args.bf16 else 'fp32'} dropout={dropouts} "
          f"torch={torch.__version__} threads={args.threads or torch.get_num_threads()} warmup={args.warmup} "
          f"timed steps={args.steps} (median) load average at start={os.getloadavg()[0]:.2f}")
    for fam in dict.fromkeys(family(shape) for shape in shapes):
        print(fam.batches_label(args.data))
    results, summaries = {}, {}
    for shape in args.shapes.split(","):
        trio = results[shape] = {w: run_worker(w, shape, args) for w in ("ref", "ours", "floor")}
        stats = trio["ours"]["batch_stats"]
        if any(s["real"] < s["rows"] * s["width"] for s in stats):
            trio["floor_real"] = run_worker("floor_real", shape, args)
        else:  # no padding: the real tokens' GEMMs are the padded ones
            trio["floor_real"] = trio["floor"]
        summaries[shape] = summarise(shape, trio, args)
        print(f"{shape}: ref {1000 * trio['ref']['step_s']:.0f} ms, ours {1000 * trio['ours']['step_s']:.0f} ms, "
              f"floor {1000 * trio['floor']['step_s']:.0f} ms", flush=True)
    first = results[next(iter(results))]
    isolation = "in one process, not isolated" if args.in_process else "a fresh process per model"
    attention = ", ".join(f"{shape} {trio['ref']['ref_attention']}" for shape, trio in results.items())
    print(f"reference attention: {attention}; memory: {first['ours']['mem_method']}, {isolation}; "
          f"device: {first['ours']['device_name']}; load average at end={os.getloadavg()[0]:.2f}\n")
    ok = print_tables(results, summaries, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "worker"}, "summaries": summaries,
                       "results": results}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
