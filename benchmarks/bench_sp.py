"""Sequence parallelism: activation bytes per rank and TP traffic per layer, SP on against off,
at TP=2 (2 gloo processes), in one run, in two configurations.

    python benchmarks/bench_sp.py                          # BERT-large layers, S=512, dropout 0.1
    # a dry run:
    python benchmarks/bench_sp.py --hidden 64 --heads 4 --intermediate 256 --seq 64 --vocab 64 --layers 6

1. One layer, no recomputation. Activation bytes are counted, not sampled: every tensor autograd
   saves for backward during one training forward is recorded through
   `torch.autograd.graph.saved_tensors_hooks` (each storage once, parameters excluded). The
   per-layer figure is the difference between models of 3 and 2 layers (the added layer is a
   sequence-parallel one; the last layer runs replicated either way).
2. A stack of `--layers` layers with full activation checkpointing (`activation_checkpointing=True`:
   torch.utils.checkpoint, non-reentrant, per layer), whose saved tensors those hooks cannot see.
   Measured from real allocations: torch.profiler with profile_memory=True logs every CPU
   allocator allocation and free (address, bytes) of one forward+backward. The peak is the
   largest sum, over the step, of the bytes live in allocations made during the step: the
   checkpoints of all layers, one layer's recomputed activations, the activation gradients,
   every temporary, and the embeddings and heads (a small vocabulary: not what is measured).
   Left out: the parameters (allocated before the step) and the parameter gradients (the
   allocations at the `.grad` addresses still live at the end; checked to be exactly the
   gradients' bytes), and the staging buffers of the collectives (`_StagedCollectives`). The
   stack is also measured at about half its depth; the difference per layer is what a layer's
   checkpoint holds (its input: 4 sbh bytes in fp32 without SP, 4/t with), which cross-checks
   the method and gives the figure at any depth.

TP traffic counts, per layer, the bytes each rank sends in a ring for every collective of the
forward and backward (all-reduce 2(t-1)/t x size; all-gather and reduce-scatter (t-1)/t x the
full size). Dropout masks are those of the default mode (per-rank streams); on CPU attention
with dropout is blockwise (`mbert_train/model/blockwise.py`): it keeps a bool (s x s) drop mask
per local head and no (s x s) float tensor.
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


class _StagedCollectives:
    """Runs gloo's all-reduce and all-gather on buffers of this object's own (one per shape and
    slot, kept for the whole run), copying in and out.

    gloo's worker thread often holds the last reference to the tensors of a collective, so they
    are freed on that thread, where the profiler does not record the free: they would look live
    to the end of the step. Staged, the model's own tensors are allocated and freed on the main
    thread like any other; the buffers (what NCCL's internal buffers are on GPUs) are left out
    of the peak by address, as the gradients are."""

    def __init__(self):
        import torch.distributed as dist

        self.buffers: dict[tuple, torch.Tensor] = {}
        all_reduce, all_gather = dist.all_reduce, dist.all_gather

        def staged_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
            buf = self._buffer(tensor, "in").copy_(tensor)
            all_reduce(buf, op=op, group=group)
            tensor.copy_(buf)

        def staged_all_gather(tensor_list, tensor, group=None, async_op=False):
            outs = [self._buffer(t, i) for i, t in enumerate(tensor_list)]
            all_gather(outs, self._buffer(tensor, "in").copy_(tensor), group=group)
            for t, o in zip(tensor_list, outs):
                t.copy_(o)

        dist.all_reduce, dist.all_gather = staged_all_reduce, staged_all_gather

    def _buffer(self, like: torch.Tensor, slot) -> torch.Tensor:
        key = (tuple(like.shape), like.dtype, slot)
        if key not in self.buffers:
            self.buffers[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return self.buffers[key]

    def addresses(self) -> set[int]:
        return {b.untyped_storage().data_ptr() for b in self.buffers.values()}


def _allocations(prof) -> list[tuple[int, int, int]]:
    """(time ns, address, bytes: + allocated, - freed) of every CPU allocator event in a profile
    taken with profile_memory=True, in time order."""
    from torch._C._profiler import _EventType

    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.typed[0] == _EventType.Allocation and event.typed[1].device.type == "cpu":
            events.append((event.start_time_ns, event.typed[1].ptr, event.typed[1].alloc_size))
    return sorted(events, key=lambda e: e[0])


def _peak_step_bytes(events, excluded: set[int]) -> tuple[int, dict[int, int]]:
    """(peak bytes live in allocations made during the step, bytes left out per address).

    Left out are the allocations at the `excluded` addresses (the `.grad` storages, the staging
    buffers) still live at the end, and everything allocated before the step (parameters, the
    batch)."""
    last_alloc = {ptr: i for i, (_, ptr, size) in enumerate(events) if size > 0}
    freed_after = {ptr for i, (_, ptr, size) in enumerate(events) if size < 0 and i > last_alloc.get(ptr, -1)}
    left_out = {last_alloc[ptr]: ptr for ptr in excluded if ptr in last_alloc and ptr not in freed_after}
    live: dict[int, int] = {}
    total = peak = 0
    for i, (_, ptr, size) in enumerate(events):
        if i in left_out:
            continue
        if size > 0:
            live[ptr] = size
            total += size
            peak = max(peak, total)
        elif ptr in live:  # a free of something allocated before the step is not counted
            total -= live.pop(ptr)
    return peak, {ptr: events[i][2] for i, ptr in left_out.items()}


def _measure_checkpointed(cfg, tp, batch) -> tuple[int, int, int]:
    """(peak activation bytes, ring bytes sent, parameter-gradient bytes left out) of one
    forward+backward of the model with per-layer activation checkpointing."""
    from torch.profiler import ProfilerActivity, profile

    from mbert_train.model import MegatronBert

    torch.manual_seed(0)
    model = MegatronBert(cfg, tp, activation_checkpointing=True).train()
    before = _TRAFFIC.bytes
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(**batch).loss.backward()
    sent = _TRAFFIC.bytes - before
    grads = {p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes() for p in model.parameters()}
    peak, left_out = _peak_step_bytes(_allocations(prof), set(grads) | _STAGED.addresses())
    gradient_bytes = sum(left_out.get(ptr, 0) for ptr in grads)
    if gradient_bytes != sum(grads.values()):  # the gradients must be exactly what is left out
        raise RuntimeError(f"found {gradient_bytes} gradient bytes among the allocations, the .grad storages "
                           f"hold {sum(grads.values())}")
    return peak, sent, gradient_bytes


_TRAFFIC: _Traffic | None = None
_STAGED: _StagedCollectives | None = None


def rank_main(rank: int, world: int, args, port: int, out_dir: str) -> None:
    import dataclasses

    import torch.distributed as dist

    from mbert_train.model.config import ModelConfig
    from mbert_train.parallel.context import TPContext

    global _TRAFFIC, _STAGED
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _TRAFFIC = _Traffic(world)
    _STAGED = _StagedCollectives()
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
    short = max(2, args.layers // 2)
    result = {}
    for name, sp, keep in (("off", False, False), ("on", True, False), ("keep_gathered", True, True)):
        tp = TPContext(dist.group.WORLD, sequence_parallel=sp, sp_keep_gathered=keep)
        two = _measure(base, tp, batch)
        three = _measure(dataclasses.replace(base, num_layers=3), tp, batch)
        if keep:  # parallel.sp_keep_gathered: one layer only
            result[name] = {"activation_bytes_per_layer": three[0] - two[0], "ring_bytes_per_layer": three[1] - two[1]}
            continue
        full = _measure_checkpointed(dataclasses.replace(base, num_layers=args.layers), tp, batch)
        half = _measure_checkpointed(dataclasses.replace(base, num_layers=short), tp, batch)
        result[name] = {
            "activation_bytes_per_layer": three[0] - two[0], "ring_bytes_per_layer": three[1] - two[1],
            "checkpointed": {"layers": args.layers, "peak_activation_bytes": full[0],
                             "gradient_bytes_excluded": full[2], "half_layers": short,
                             "half_peak_activation_bytes": half[0],
                             "checkpoint_bytes_per_layer": (full[0] - half[0]) / (args.layers - short),
                             "ring_bytes_per_layer": (full[1] - half[1]) / (args.layers - short)}}
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
    parser.add_argument("--layers", type=int, default=24, help="depth of the checkpointed stack (>= 3)")
    args = parser.parse_args()
    if args.layers < 3:
        parser.error(f"--layers {args.layers}: the checkpointed stack needs at least 3 layers")
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(rank_main, args=(2, args, _free_port(), out), nprocs=2, start_method="spawn")
        r = json.loads(Path(out, "rank0.json").read_text())
    off, on, keep = r["off"], r["on"], r["keep_gathered"]
    ratio, traffic, formula = _report_layer(args, off, on, keep)
    stack_ratio, stack_traffic = _report_stack(args, off["checkpointed"], on["checkpointed"])
    print("JSON " + json.dumps({"off": off, "on": on, "keep_gathered": keep, "activation_ratio": ratio, "traffic_ratio": traffic,
                                "formula_ratio": formula, "checkpointed_activation_ratio": stack_ratio,
                                "checkpointed_traffic_ratio": stack_traffic, "load_average": os.getloadavg()}))
    return 0


TARGET = 0.65  # the goal for activation bytes per rank: SP on <= 0.65x SP off


def _verdict(ratio: float) -> str:
    return f"target <= {TARGET}x {'met' if ratio <= TARGET else 'NOT met'}"


def _report_layer(args, off: dict, on: dict, keep: dict) -> tuple[float, float, float]:
    s, b, h, a, t = args.seq, args.batch, args.hidden, args.heads, 2
    sbh = s * b * h
    print(f"1. one layer, no recomputation: h{h} x {a} heads x I{args.intermediate}, S={s}, b={b}, fp32, "
          f"dropout {args.dropout}, TP=2")
    for name, row in (("SP off", off), ("SP on", on), ("SP on, sp_keep_gathered", keep)):
        print(f"  {name:<7} activations {row['activation_bytes_per_layer'] / 2**20:8.1f} MiB/rank "
              f"({row['activation_bytes_per_layer'] / sbh:5.1f} sbh) | TP traffic "
              f"{row['ring_bytes_per_layer'] / 2**20:7.1f} MiB sent/rank")
    ratio = on["activation_bytes_per_layer"] / off["activation_bytes_per_layer"]
    traffic = on["ring_bytes_per_layer"] / off["ring_bytes_per_layer"]
    # Korthikanti et al. 2022 in sbh units, 4-byte activations and 1-byte masks: replicated without
    # SP are the two LayerNorm inputs, the two column-parallel inputs and two dropout masks; split
    # by t either way the QKV output, the context, the two MLP activations, and (blockwise attention
    # keeps no score tensor) the bool attention drop mask, a*s/h, in place of the paper's 5as/h.
    e = 4
    repl = 4 * e + 2
    shard = 4 * e + 2 * e * args.intermediate / h + (a * s / h if args.dropout > 0 else 0)
    formula = ((repl + shard) / t) / (repl + shard / t)
    print(f"SP on / off (one layer): activations {ratio:.3f}x (Korthikanti et al.'s count for what this code "
          f"keeps: {formula:.3f}x; {_verdict(ratio)}), TP traffic {traffic:.3f}x")
    print(f"SP on with parallel.sp_keep_gathered / off (one layer): activations "
          f"{keep['activation_bytes_per_layer'] / off['activation_bytes_per_layer']:.3f}x, TP traffic "
          f"{keep['ring_bytes_per_layer'] / off['ring_bytes_per_layer']:.3f}x")
    return ratio, traffic, formula


def _report_stack(args, off: dict, on: dict) -> tuple[float, float]:
    sbh = args.seq * args.batch * args.hidden
    print(f"2. {args.layers} layers, full activation checkpointing (non-reentrant, per layer), same shape: "
          f"peak over forward+backward")
    for name, row in (("SP off", off), ("SP on", on)):
        print(f"  {name:<7} peak activations {row['peak_activation_bytes'] / 2**20:8.1f} MiB/rank "
              f"({row['peak_activation_bytes'] / sbh:6.1f} sbh; {row['half_layers']} layers: "
              f"{row['half_peak_activation_bytes'] / 2**20:.1f} MiB) | checkpoint per layer "
              f"{row['checkpoint_bytes_per_layer'] / sbh:4.2f} sbh | TP traffic "
              f"{row['ring_bytes_per_layer'] / 2**20:5.1f} MiB sent/rank/layer")
    ratio = on["peak_activation_bytes"] / off["peak_activation_bytes"]
    traffic = on["ring_bytes_per_layer"] / off["ring_bytes_per_layer"]
    print(f"SP on / off ({args.layers} layers, checkpointed): peak activations {ratio:.3f}x ({_verdict(ratio)}), "
          f"TP traffic {traffic:.3f}x")
    return ratio, traffic


if __name__ == "__main__":
    sys.exit(main())
