"""Checkpoint save and resume through the trainer, per rank: peak resident memory while resuming
against the peak of the same run while training and saving, bytes read at resume, save and
resume times, at several TP degrees.

    python benchmarks/bench_checkpoint.py                            # megatron-345m, TP 2 and 4
    python benchmarks/bench_checkpoint.py --shape tiny --tp 2        # a dry run

For each TP degree, TP gloo ranks (DP 1, ZeRO-0, fp32, 1 thread each) run twice, each time in
fresh processes, as `mbert-train` builds a run (the model, the DeepSpeed engine, a `Trainer`):

- *train + save*: one training step (micro-batch 1), then `Trainer.save()`, as a run does at
  `trainer.checkpoint_every`;
- *resume*: `Trainer.resume(CHECKPOINT)` of what the first wrote, as a restarted run does.

Peak memory is the process's VmHWM over the phase, reset (`/proc/self/clear_refs`) once the
model and engine are built, so both phases start from the same resident model. Bytes read are
the rank's read(2) bytes (`rchar`) over the resume; safetensors files are read through mmap,
which `rchar` misses, so the bytes of every safetensors file the resume maps are added. The
page cache is not dropped (the machine is shared); each phase reports the load average.
Target: peak while resuming <= 1.05x the peak while training and saving, on every rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from common import SHAPES

TARGET = 1.05
NAMES = {"large128": "megatron-345m"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(key: str) -> int:
    """A /proc/self/status entry in bytes (VmHWM, VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise KeyError("rchar")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _Loader:
    """The loader seam the checkpoint saves and restores (a position only)."""

    def state_dict(self) -> dict:
        return {"batches": 1}

    def load_state_dict(self, state: dict) -> None:
        return None


def _build(rank: int, world: int, args, port: int):
    from mbert_train.config import TrainConfig
    from mbert_train.engine import build_engine
    from mbert_train.model import MegatronBert
    from mbert_train.model.config import ModelConfig
    from mbert_train.parallel.context import TPContext
    from mbert_train.parallel.layout import init_parallel
    from mbert_train.trainer import Trainer

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    state = init_parallel(world, timeout_s=1800)
    s = SHAPES[args.shape]
    cfg = TrainConfig()
    cfg.model = ModelConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                            intermediate_size=s.intermediate, max_position_embeddings=512)
    cfg.parallel.tensor_parallel, cfg.parallel.zero_stage = world, 0
    cfg.trainer.micro_batch_size, cfg.trainer.max_steps = 1, 10
    torch.manual_seed(0)
    model = MegatronBert(cfg.model, TPContext(group=state.tp_group))
    engine = build_engine(model, cfg, state)
    trainer = Trainer(cfg, state, engine, _Loader(), None, Path(args.dir), torch.device("cpu"))
    return trainer, s


def _digest(trainer) -> float:
    return float(sum(p.detach().double().square().sum() for p in trainer.engine.module.parameters()))


def save_main(rank: int, world: int, args, port: int, out: str) -> None:
    import torch.distributed as dist

    trainer, s = _build(rank, world, args, port)
    engine = trainer.engine
    dist.barrier()
    built = _status("VmRSS")
    _reset_peak()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, s.vocab, (1, args.seq), generator=g)
    step = engine(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids),
                  mlm_labels=ids.masked_fill(torch.rand(ids.shape, generator=g) > 0.15, -100),
                  nsp_labels=torch.zeros(1).long())
    engine.backward(step.loss)
    engine.step()
    trainer.step = 1
    dist.barrier()
    start = time.perf_counter()
    trainer.save()
    dist.barrier()
    save_s = time.perf_counter() - start
    result = {"rank": rank, "built_rss": built, "train_save_peak": _status("VmHWM"), "save_s": save_s,
              "digest": _digest(trainer)}
    Path(out, f"save{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def resume_main(rank: int, world: int, args, port: int, out: str) -> None:
    import torch.distributed as dist

    trainer, _ = _build(rank, world, args, port)
    checkpoint = Path(args.dir) / "checkpoints" / "step_00000001"
    mapped = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))  # read through mmap: not in rchar
    dist.barrier()
    built = _status("VmRSS")
    _reset_peak()
    read_before = _rchar()
    start = time.perf_counter()
    trainer.resume(checkpoint)
    dist.barrier()
    resume_s = time.perf_counter() - start
    result = {"rank": rank, "resume_built_rss": built, "resume_peak": _status("VmHWM"), "resume_s": resume_s,
              "bytes_read": _rchar() - read_before + mapped, "mapped_bytes": mapped, "step": trainer.step,
              "resumed_digest": _digest(trainer)}
    Path(out, f"resume{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure(tp: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        run = argparse.Namespace(**{**vars(args), "dir": scratch})
        load = [os.getloadavg()[0]]
        mp.start_processes(save_main, args=(tp, run, _free_port(), out), nprocs=tp, start_method="spawn")
        checkpoint = Path(scratch) / "checkpoints" / "step_00000001"
        meta = json.loads((checkpoint / "meta.json").read_text())
        written = [sum(e["size"] for e in meta.get("files", {}).values() if e["rank"] == r) for r in range(tp)]
        total = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
        load.append(os.getloadavg()[0])
        mp.start_processes(resume_main, args=(tp, run, _free_port(), out), nprocs=tp, start_method="spawn")
        load.append(os.getloadavg()[0])
        ranks = []
        for r in range(tp):
            row = {**json.loads(Path(out, f"save{r}.json").read_text()),
                   **json.loads(Path(out, f"resume{r}.json").read_text())}
            row.update(tp=tp, bytes_written=written[r], checkpoint_bytes=total, load_average=load,
                       ratio=row["resume_peak"] / row["train_save_peak"])
            if row["step"] != 1 or row["digest"] != row["resumed_digest"]:
                raise SystemExit(f"rank {r}: the resumed weights differ from the saved ones")
            ranks.append(row)
        shutil.rmtree(checkpoint.parent, ignore_errors=True)
    return ranks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="large128", choices=sorted(SHAPES),
                        help="model shape (default large128 = model=megatron-345m)")
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 4], help="TP degrees, one world each")
    parser.add_argument("--seq", type=int, default=64, help="sequence length of the training step")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir under /tmp)")
    parser.add_argument("--repeats", type=int, default=1, help="kept for older command lines; one run per TP")
    args = parser.parse_args()
    s = SHAPES[args.shape]
    rows = []
    for tp in args.tp:
        rows += measure(tp, args)
    mib = 2**20
    print(f"checkpoint through the trainer, {NAMES.get(args.shape, args.shape)} (h{s.hidden} x {s.layers} layers, "
          f"vocab {s.vocab}), DP1 ZeRO-0 fp32, 1 thread per rank")
    for r in rows:
        print(f"TP{r['tp']} rank {r['rank']}: peak RSS train+save {r['train_save_peak'] / mib:.0f} MiB, resume "
              f"{r['resume_peak'] / mib:.0f} MiB ({r['ratio']:.2f}x) | read at resume {r['bytes_read'] / mib:.0f} MiB "
              f"| written {r['bytes_written'] / mib:.0f} MiB | save {r['save_s']:.2f} s, resume {r['resume_s']:.2f} s "
              f"| load {'/'.join(f'{x:.1f}' for x in r['load_average'])}")
    worst = max(r["ratio"] for r in rows)
    print(f"peak RSS resume / train+save (worst rank): {worst:.2f}x (target <= {TARGET}x)")
    print("JSON " + json.dumps({"shape": args.shape, "ranks": rows, "worst_ratio": worst}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
