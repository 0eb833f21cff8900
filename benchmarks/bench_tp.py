"""Tensor-parallel overhead: step time of our model at TP=2 (2 processes x 1 thread, gloo) over
TP=1 (1 process x 2 threads), the same total cores, the same model, the same batches.

    python benchmarks/bench_tp.py --data DIR              # BERT-base S=128, batches from our pipeline
    python benchmarks/bench_tp.py                         # the same on synthetic batches (says so)
    python benchmarks/bench_tp.py --shape tiny --steps 1 --warmup 0    # a dry run

A step is what the trainer's engine runs on one micro-batch at ZeRO-0 without DeepSpeed around
it: forward, backward, fused AdamW on the rank's shards, in train mode with the presets' dropout
(0.1; each TP rank draws its own heads' attention-dropout masks, the default). Every rank holds
its shard of the same model: TP=N draws the full master weights and keeps its shard, so both
runs train exactly the same network. Time is measured on rank 0 between barriers, so a step
lasts until the slowest rank is done. Target: TP=2 / TP=1 <= 1.10 at BERT-base.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp
from common import (DROPOUT, SHAPES, batches_for, batches_label, data_dir_or_none, dataset_vocab, model_config,
                    with_overrides)

TARGET = 1.10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, tp: int, args, port: int, out_path: str) -> None:
    import torch.distributed as dist

    from mbert_train.model import MegatronBert
    from mbert_train.parallel.layout import init_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(tp),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(max(1, args.threads // tp))
    state = init_parallel(tp, timeout_s=300)
    shape = with_overrides(SHAPES[args.shape], batch=args.batch, vocab=dataset_vocab(args.data) if args.data else None)
    torch.manual_seed(0)
    model = MegatronBert(model_config(shape, args.dropout), state.tp_group, mlm_masked_only=True).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batches = batches_for(args.data, shape, args.warmup + args.steps)
    times, losses = [], []
    for batch in batches:
        dist.barrier()
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        dist.barrier()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(tp=tp, threads=torch.get_num_threads(), times=times, losses=losses,
                           step_s=statistics.median(times[args.warmup:]), min_s=min(times[args.warmup:])), f)
    dist.destroy_process_group()


def run(tp: int, args) -> dict:
    """TP=1 runs in this process, TP=2 in two spawned ones."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        if tp == 1:
            rank_main(0, 1, args, _free_port(), out)
        else:
            mp.start_processes(rank_main, args=(tp, args, _free_port(), out), nprocs=tp, start_method="spawn")
        with open(out) as f:
            return json.load(f)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="base128", choices=SHAPES)
    p.add_argument("--data", metavar="DIR", help="an mbert-prep dataset: batches from our data pipeline")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default: the shape's)")
    p.add_argument("--dropout", type=float, default=DROPOUT)
    p.add_argument("--threads", type=int, default=2, help="cores in total: TP=1 gets them all, each TP=2 rank half")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--json", metavar="PATH", help="also write the raw results here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 2:
        p.error("--steps must be >= 1, --warmup >= 0 and --threads >= 2")
    args.data = data_dir_or_none(args.data)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    shape = with_overrides(SHAPES[args.shape], batch=args.batch)
    print(f"shape={args.shape} ({shape.layers} layers, hidden {shape.hidden}, seq {shape.seq}, batch {shape.batch}) "
          f"dropout={args.dropout} torch={torch.__version__} warmup={args.warmup} timed steps={args.steps} (median) "
          f"load average at start={os.getloadavg()[0]:.2f}")
    print(batches_label(args.data))
    results = {tp: run(tp, args) for tp in (1, 2)}
    print(f"load average at end={os.getloadavg()[0]:.2f}\n")
    print("| layout | processes x threads | step ms (median) | min ms | first loss (own dropout masks per TP rank) |")
    print("|---|---|---|---|---|")
    for tp, r in results.items():
        print(f"| TP={tp} | {tp} x {r['threads']} | {1000 * r['step_s']:.0f} | {1000 * r['min_s']:.0f} | "
              f"{r['losses'][0]:.6f} |")
    ratio = results[2]["step_s"] / results[1]["step_s"]
    print(f"\nratio {args.shape}: TP=2/TP=1 step time {ratio:.2f} (min {results[2]['min_s'] / results[1]['min_s']:.2f}; "
          f"target <= {TARGET:.2f}: {'met' if ratio <= TARGET else 'MISSED'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "ratio": ratio}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
