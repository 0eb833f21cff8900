"""Sequence parallelism: activation bytes per rank and TP traffic per layer, SP on against off,
at TP=2 (2 gloo processes), in one run.

    python benchmarks/bench_sp.py                          # BERT-large layers, S=512, dropout 0.1
    python benchmarks/bench_sp.py --hidden 64 --heads 4 --intermediate 256 --seq 64   # a dry run

Activation bytes are counted, not sampled: every tensor autograd saves for backward during one
training forward is recorded through `torch.autograd.graph.saved_tensors_hooks` (each storage
once, parameters excluded). The per-layer figure is the difference between models of 3 and 2
layers (the added layer is a sequence-parallel one; the last layer runs replicated either way).
TP traffic counts, per layer, the bytes each rank sends in a ring for every collective of the
forward and backward (all-reduce 2(t-1)/t x size; all-gather and reduce-scatter (t-1)/t x the
full size). Dropout masks are those of the default mode (per-rank streams); on CPU the
attention probabilities with dropout are materialised, so their s x s term is in both figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Traffic:
    """Wraps the collectives of `mbert_train.parallel.mappings` to count ring bytes sent."""

    def __init__(self, tp: int):
        from mbert_train.parallel import mappings

        self.tp, self.bytes, self.depth = tp, 0, 0
        for name, factor, which in (("_all_reduce", 2, "in"), ("_gather_seq", 1, "out"),
                                    ("_reduce_scatter_seq", 1, "in"), ("_gather_last", 1, "out")):
            setattr(mappings, name, self._wrap(getattr(mappings, name), factor, which))

    def _wrap(self, fn, factor: int, which: str):
        def counted(x, group):
            self.depth += 1
            try:
                out = fn(x, group)
            finally:
                self.depth -= 1
            if self.depth == 0:  # gloo's reduce-scatter runs an all-reduce inside: count once
                size = (x if which == "in" else out).numel() * x.element_size()
                self.bytes += factor * (self.tp - 1) * size // self.tp
            return out
        return counted


def _measure(cfg, tp, batch) -> tuple[int, int]:
    """(bytes saved for backward, ring bytes sent) of one forward+backward."""
    from mbert_train.model import MegatronBert

    torch.manual_seed(0)
    model = MegatronBert(cfg, tp).train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    traffic = _TRAFFIC
    before = traffic.bytes
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    out.loss.backward()
    return sum(seen.values()), traffic.bytes - before


_TRAFFIC: _Traffic | None = None


def rank_main(rank: int, world: int, args, port: int, out_dir: str) -> None:
    import dataclasses

    import torch.distributed as dist

    from mbert_train.model.config import ModelConfig
    from mbert_train.parallel.context import TPContext

    global _TRAFFIC
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _TRAFFIC = _Traffic(world)
    base = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=2, num_heads=args.heads,
                       intermediate_size=args.intermediate, max_position_embeddings=args.seq,
                       hidden_dropout=args.dropout, attention_dropout=args.dropout)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, args.vocab, (args.batch, args.seq), generator=g)
    labels = torch.full_like(ids, -100)
    pick = torch.rand(ids.shape, generator=g) < 0.15
    labels[pick] = ids[pick]
    batch = dict(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids),
                 mlm_labels=labels, nsp_labels=torch.zeros(args.batch, dtype=torch.long))
    result = {}
    for sp in (False, True):
        tp = TPContext(dist.group.WORLD, sequence_parallel=sp)
        two = _measure(base, tp, batch)
        three = _measure(dataclasses.replace(base, num_layers=3), tp, batch)
        result["on" if sp else "off"] = {"activation_bytes_per_layer": three[0] - two[0],
                                        "ring_bytes_per_layer": three[1] - two[1]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--vocab", type=int, default=1024, help="small: the heads are not what is measured")
    parser.add_argument("--dropout", type=float, default=0.1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(rank_main, args=(2, args, _free_port(), out), nprocs=2, start_method="spawn")
        r = json.loads(Path(out, "rank0.json").read_text())
    s, b, h, a, t = args.seq, args.batch, args.hidden, args.heads, 2
    off, on = r["off"], r["on"]
    print(f"one layer h{h} x {a} heads x I{args.intermediate}, S={s}, b={b}, fp32, dropout {args.dropout}, TP=2")
    for name, row in (("SP off", off), ("SP on", on)):
        print(f"  {name:<7} activations {row['activation_bytes_per_layer'] / 2**20:8.1f} MiB/rank "
              f"({row['activation_bytes_per_layer'] / (s * b * h):5.1f} sbh) | TP traffic "
              f"{row['ring_bytes_per_layer'] / 2**20:7.1f} MiB sent/rank")
    ratio = on["activation_bytes_per_layer"] / off["activation_bytes_per_layer"]
    traffic = on["ring_bytes_per_layer"] / off["ring_bytes_per_layer"]
    # Korthikanti et al. 2022 with 4-byte activations and 1-byte masks, attention scores included.
    e = 4
    repl, shard = (4 * e + 2), 4 * e + 2 * e * args.intermediate / h + (2 * e + 1) * a * s / h
    formula = ((repl + shard) / t) / (repl + shard / t)
    print(f"SP on / off: activations {ratio:.3f}x (the paper's formula for this shape: {formula:.3f}x), "
          f"TP traffic {traffic:.3f}x")
    print("JSON " + json.dumps({"off": off, "on": on, "activation_ratio": ratio, "traffic_ratio": traffic,
                                "formula_ratio": formula, "load_average": os.getloadavg()[0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
