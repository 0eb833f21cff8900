"""One training step (forward, backward, AdamW) of our MegatronBert against the reference
`transformers.MegatronBertForPreTraining`: time, throughput and peak memory at the same shapes.

    python benchmarks/bench_model.py                        # all shapes, CUDA if present else CPU
    python benchmarks/bench_model.py --shapes small --steps 5
    python benchmarks/bench_model.py --bf16                 # CUDA: bf16 autocast for both models
    python benchmarks/bench_model.py --profile base128      # torch.profiler top ops of each model

Fairness: both models hold the same weights (the reference's seeded init, copied into ours with
`hf_to_full` + `shard_state_dict`), see the same batch (15% of positions masked, full-length
sequences, NSP labels), run with dropout 0 in train mode, and optimise the same loss (MLM + NSP);
the first-step losses are printed and must agree to 1e-4 in fp32. Ours runs TP=1 in one process
with `mlm_masked_only=True`; the reference uses its default attention (eager; it offers no SDPA).

Memory: each (model, shape) runs in a fresh subprocess. CPU tensors are invisible to tracemalloc,
so on CPU we read the kernel's resident-set counters: after the model, optimizer and batch exist,
`malloc_trim(0)` returns freed heap pages, writing 5 to /proc/self/clear_refs resets the
high-water mark, and VmRSS is the baseline. "step MB" is VmHWM (== ru_maxrss after the reset)
minus that baseline over all steps: gradients, AdamW state, activations, logits, temporaries.
On CUDA it is torch.cuda.max_memory_allocated() minus memory_allocated() at the same point.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

MODELS = ("ref", "ours")
LOSS_TOL = {"fp32": 1e-4, "bf16": 2e-2}
# Dense peak FLOP/s per device (bf16 tensor core, fp32 without TF32), from NVIDIA data sheets.
PEAK_FLOPS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
              "L40S": (362e12, 91.6e12), "A10": (125e12, 31.2e12)}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seq: int
    batch: int
    vocab: int = 30522


SHAPES = {
    "small": Shape(hidden=256, layers=4, heads=4, intermediate=1024, seq=128, batch=8),
    "base128": Shape(hidden=768, layers=12, heads=12, intermediate=3072, seq=128, batch=8),
    "base512": Shape(hidden=768, layers=12, heads=12, intermediate=3072, seq=512, batch=2),
}
TARGET_SPEEDUP = {"base128": 1.5, "base512": 2.0}


def model_config(shape: Shape):
    from mbert_train.model import ModelConfig
    return ModelConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_layers=shape.layers,
                       num_heads=shape.heads, intermediate_size=shape.intermediate,
                       max_position_embeddings=max(512, shape.seq), hidden_dropout=0.0, attention_dropout=0.0)


def make_batch(shape: Shape, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    b, s = shape.batch, shape.seq
    ids = torch.randint(1, shape.vocab, (b, s), generator=g)
    labels = torch.full((b, s), -100)
    picked = torch.rand(b, s, generator=g) < 0.15
    labels[picked] = ids[picked]
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, s // 2:] = 1
    batch = dict(input_ids=ids, token_type_ids=types, attention_mask=torch.ones(b, s, dtype=torch.long),
                 mlm_labels=labels, nsp_labels=torch.randint(0, 2, (b,), generator=g))
    return {k: v.to(device) for k, v in batch.items()}


def build(which: str, shape: Shape):
    """The reference with its seeded init, or ours holding exactly those weights."""
    from transformers import MegatronBertConfig, MegatronBertForPreTraining
    cfg = model_config(shape)
    torch.manual_seed(0)
    hf_cfg = MegatronBertConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    ref = MegatronBertForPreTraining(hf_cfg).float()
    if which == "ref":
        return ref
    from mbert_train.model import MegatronBert
    from mbert_train.model.weights import hf_to_full, shard_state_dict
    ours = MegatronBert(cfg, mlm_masked_only=True)
    ours.load_state_dict(shard_state_dict(hf_to_full(ref.state_dict(), cfg), ours))
    return ours


def loss_of(which: str, model, batch) -> torch.Tensor:
    if which == "ours":
        return model(**batch).loss
    return model(input_ids=batch["input_ids"], token_type_ids=batch["token_type_ids"],
                 attention_mask=batch["attention_mask"], labels=batch["mlm_labels"],
                 next_sentence_label=batch["nsp_labels"]).loss


def train_step(which, model, opt, batch, bf16: bool) -> torch.Tensor:
    opt.zero_grad(set_to_none=True)
    with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = loss_of(which, model, batch)
    loss.backward()
    opt.step()
    return loss.detach()


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


def step_flops(shape: Shape, masked: int) -> float:
    """Model FLOPs of one training step (3x forward): dense matmuls, attention, and the MLM head
    on the masked positions only (what the loss needs), so both models are credited the same."""
    h, s, tokens = shape.hidden, shape.seq, shape.batch * shape.seq
    per_token = shape.layers * (2 * h * 3 * h + 2 * h * h + 4 * h * shape.intermediate + 4 * s * h)
    head = masked * (2 * h * h + 2 * h * shape.vocab)
    return 3.0 * (tokens * per_token + head)


def peak_flops(device: torch.device, bf16: bool, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16_peak, fp32_peak) in PEAK_FLOPS.items():
        if key in name:
            return bf16_peak if bf16 else fp32_peak
    return None


def worker(args) -> dict:
    """Runs in a fresh process: build one model, time its steps, report as JSON."""
    device = torch.device(args.device)
    shape = SHAPES[args.shape]
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args.model, shape).to(device).train()
    batch = make_batch(shape, device)
    # Fused AdamW for both: what mbert-train's engine uses and what transformers' Trainer
    # defaults to on torch >= 2.8; the optimizer costs the same and only the models differ.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    params = sum(p.numel() for p in model.parameters())
    baseline, method = memory_baseline(device)
    times, cpu_times, losses = [], [], []
    for _ in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = train_step(args.model, model, opt, batch, args.bf16)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        losses.append(loss.item())
    step_s = statistics.median(times[args.warmup:])
    masked = int((batch["mlm_labels"] != -100).sum())
    peak = peak_flops(device, args.bf16, args.peak_tflops)
    flops = step_flops(shape, masked)
    return dict(model=args.model, shape=args.shape, step_s=step_s, times=times, first_loss=losses[0],
                min_s=min(times[args.warmup:]), cpu_s=statistics.median(cpu_times[args.warmup:]),
                cpu_times=cpu_times,
                tokens_per_s=shape.batch * shape.seq / step_s, achieved_tflops=flops / step_s / 1e12,
                mfu=flops / step_s / peak if peak else None, params=params, base_mb=baseline / 2**20,
                step_mb=(memory_peak(device) - baseline) / 2**20, mem_method=method,
                threads=torch.get_num_threads(), device=str(device))


def run_worker(model: str, shape: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", model, "--shapes", shape, "--device", args.device,
           "--steps", str(args.steps), "--warmup", str(args.warmup)]
    if args.bf16:
        cmd.append("--bf16")
    if args.peak_tflops:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {model}/{shape} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reference_sdpa_note() -> str:
    """Whether the reference offers SDPA attention (MegatronBERT in transformers 5 does not)."""
    import transformers
    from transformers import MegatronBertConfig, MegatronBertForPreTraining
    tiny = MegatronBertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=8)
    try:
        MegatronBertForPreTraining._from_config(tiny, attn_implementation="sdpa")
    except (ValueError, ImportError) as exc:
        return f"reference attn_implementation='sdpa': not supported by transformers {transformers.__version__} " \
               f"({str(exc).split(' Please')[0]})"
    return "reference attn_implementation='sdpa': supported but not benchmarked here; eager is its default"


def print_table(results: dict, args) -> bool:
    """Print per-model rows and ratios; return whether every loss check passed."""
    ok = True
    tol = LOSS_TOL["bf16" if args.bf16 else "fp32"]
    with_mfu = all(r["mfu"] is not None for pair in results.values() for r in pair.values())
    print(f"| shape | model | step ms (median) | min ms | CPU s | tokens/s | {'MFU | ' if with_mfu else ''}"
          f"step MB | params+batch MB | first loss |")
    print("|---" * (9 + with_mfu) + "|")
    for shape, pair in results.items():
        for model in MODELS:
            r = pair[model]
            mfu = f"{100 * r['mfu']:.1f}% | " if with_mfu else ""
            print(f"| {shape} | {model} | {1000 * r['step_s']:.0f} | {1000 * r['min_s']:.0f} | {r['cpu_s']:.1f} | "
                  f"{r['tokens_per_s']:.0f} | {mfu}{r['step_mb']:.0f} | {r['base_mb']:.0f} | {r['first_loss']:.6f} |")
    print()
    print("| shape | time ref/ours (median) | (min) | CPU time ref/ours | step memory ref/ours | loss |ref-ours| "
          "| target (on the median) |")
    print("|---" * 7 + "|")
    for shape, pair in results.items():
        ref, ours = pair["ref"], pair["ours"]
        speedup, mem = ref["step_s"] / ours["step_s"], ref["step_mb"] / max(ours["step_mb"], 1e-9)
        diff = abs(ref["first_loss"] - ours["first_loss"])
        ok &= diff <= tol
        verdict = [f"memory {'met' if mem >= 1.0 else 'MISSED'}"]
        if shape in TARGET_SPEEDUP:
            target = TARGET_SPEEDUP[shape]
            verdict.insert(0, f"speed >={target}x {'met' if speedup >= target else 'MISSED'}")
        print(f"| {shape} | {speedup:.2f}x | {ref['min_s'] / ours['min_s']:.2f}x | {ref['cpu_s'] / ours['cpu_s']:.2f}x "
              f"| {mem:.2f}x | {diff:.1e} {'ok' if diff <= tol else 'FAIL'} | {', '.join(verdict)} |")
    return ok


CATEGORIES = ("optimizer (AdamW)", "vocab-sized: MLM decoder, loss, embedding grad",
              "attention: scores, softmax, context, head reshapes", "dense GEMMs: QKV, out, MLP, heads",
              "other: LayerNorm, GELU, residuals, embeddings, copies")


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

    from mbert_train.parallel.layout import padded_vocab_size
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
    """torch.profiler over one step of each model, in this process (timings, not memory)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    device = torch.device(args.device)
    shape = SHAPES[shape_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    breakdowns = {}
    for which in MODELS:
        model = build(which, shape).to(device).train()
        batch = make_batch(shape, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        for _ in range(args.warmup):
            train_step(which, model, opt, batch, args.bf16)
        # Several profiled steps, keep the fastest: on a shared machine noise only adds time.
        best = None
        for _ in range(args.steps):
            with torch_profile(activities=activities, record_shapes=True) as prof:
                train_step(which, model, opt, batch, args.bf16)
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
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {', '.join(SHAPES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA only)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU when its name is not in the built-in table")
    p.add_argument("--profile", metavar="SHAPE", help="print a torch.profiler table per model instead")
    p.add_argument("--profile-rows", type=int, default=20)
    p.add_argument("--json", metavar="PATH", help="also write the raw results here")
    p.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.bf16 and not args.device.startswith("cuda"):
        p.error("--bf16 needs a CUDA device")
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        p.error(f"unknown shape {unknown[0]!r}; choose from {', '.join(SHAPES)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.model, args.shape = args.worker, args.shapes
        print(json.dumps(worker(args)))
        return 0
    if args.profile:
        profile(args.profile, args)
        return 0
    print(f"device={args.device} dtype={'bf16 autocast' if args.bf16 else 'fp32'} torch={torch.__version__} "
          f"threads={args.threads or torch.get_num_threads()} warmup={args.warmup} timed steps={args.steps} "
          f"(median) load average at start={os.getloadavg()[0]:.2f}")
    print(reference_sdpa_note())
    results = {}
    for shape in args.shapes.split(","):
        results[shape] = {model: run_worker(model, shape, args) for model in MODELS}
        pair = results[shape]
        print(f"{shape}: ref {1000 * pair['ref']['step_s']:.0f} ms, ours {1000 * pair['ours']['step_s']:.0f} ms; "
              f"first loss ref={pair['ref']['first_loss']:.6f} ours={pair['ours']['first_loss']:.6f}", flush=True)
    print(f"memory method: {results[next(iter(results))]['ours']['mem_method']}; "
          f"load average at end={os.getloadavg()[0]:.2f}\n")
    ok = print_table(results, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
