"""Checkpoint save and load: the layout-independent format (optimizer state through
torch.distributed.checkpoint, `mbert_train/reshard.py`) against the per-rank format it
replaced (each rank `torch.save`s DeepSpeed's ZeRO optimizer state dict), side by side in one
run, on the same engine.

    python benchmarks/bench_checkpoint.py                       # BERT-base, TP1 x DP2, ZeRO-1
    python benchmarks/bench_checkpoint.py --shape tiny --repeats 1   # a dry run

Two gloo ranks build the model and a DeepSpeed engine as `mbert-train` does, take one step so
the Adam state exists, then each format saves and loads `--repeats` times into a fresh
directory (page cache dropped where allowed; otherwise say so). Reported per rank: seconds to
save (files written and fsynced), seconds to load, bytes written. Weights (safetensors, the
same in both formats) are not part of either figure. Target: new save <= 1.5x the old one.
Also reported: what the checkpoint manifest adds to the new format (`mbert_train/manifest.py`),
the CRC-32 of the rank's files at save and their check at load.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from common import SHAPES

TARGET = 1.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def rank_main(rank: int, world: int, args, port: int, out: str) -> None:
    import torch.distributed as dist

    from mbert_train import manifest, reshard
    from mbert_train.config import TrainConfig
    from mbert_train.engine import build_engine
    from mbert_train.model import MegatronBert
    from mbert_train.model.config import ModelConfig
    from mbert_train.model.weights import full_shapes
    from mbert_train.parallel.layout import init_parallel

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    state = init_parallel(1, timeout_s=600)
    s = SHAPES[args.shape]
    mcfg = ModelConfig(vocab_size=s.vocab, hidden_size=s.hidden, num_layers=s.layers, num_heads=s.heads,
                       intermediate_size=s.intermediate, max_position_embeddings=512)
    cfg = TrainConfig()
    cfg.model = mcfg
    cfg.parallel.zero_stage = args.zero
    cfg.trainer.micro_batch_size = 1
    torch.manual_seed(0)
    model = MegatronBert(mcfg, state.tp_group)
    engine = build_engine(model, cfg, state)
    ids = torch.randint(5, s.vocab, (1, 32))
    step = engine(input_ids=ids, token_type_ids=torch.zeros_like(ids), attention_mask=torch.ones_like(ids),
                 mlm_labels=ids.masked_fill(torch.rand(ids.shape) > 0.15, -100), nsp_labels=torch.zeros(1).long())
    engine.backward(step.loss)
    engine.step()
    shapes = {n: tuple(v) for n, v in full_shapes(mcfg).items()}
    root = Path(args.dir)
    rows = {"old_save": [], "old_load": [], "new_save": [], "new_load": [], "manifest_save": [], "manifest_load": []}
    for i in range(args.repeats):
        old, new = root / f"old{i}", root / f"new{i}"
        if rank == 0:
            old.mkdir(parents=True)
        dist.barrier()
        # The per-rank format: DeepSpeed's partitioned state dict, one torch.save per rank.
        start = time.perf_counter()
        path = old / f"trainer_rank{rank:05d}.pt"
        sd = engine.optimizer.state_dict()
        sd.pop("param_slice_mappings", None)
        sd.pop("loss_scaler", None)
        with open(path, "wb") as f:
            torch.save(sd, f)
            f.flush()
            os.fsync(f.fileno())
        dist.barrier()
        rows["old_save"].append(time.perf_counter() - start)
        old_bytes = path.stat().st_size
        start = time.perf_counter()
        loaded = torch.load(path, map_location="cpu", weights_only=False)
        per_dp = [None] * state.dims.data_parallel
        per_dp[state.dp_rank] = loaded
        if engine.zero:
            engine.optimizer.load_state_dict(per_dp, load_optimizer_states=True, load_from_fp32_weights=True)
        else:
            engine.optimizer.load_state_dict(loaded)
        dist.barrier()
        rows["old_load"].append(time.perf_counter() - start)
        # The layout-independent format.
        start = time.perf_counter()
        names = reshard.save_state(new, engine.fragments(), shapes, tp=1, tp_rank=0, write=engine.zero or rank == 0,
                                   kinds=engine.state_kinds())
        dist.barrier()
        rows["new_save"].append(time.perf_counter() - start)
        new_bytes = sum(p.stat().st_size for p in new.glob(f"__{rank}_*"))
        start = time.perf_counter()
        files = manifest.describe(new, [new / name for name in names], rank=rank)
        dist.barrier()
        rows["manifest_save"].append(time.perf_counter() - start)
        every = [None] * world
        dist.all_gather_object(every, files)
        files = {name: entry for part in every for name, entry in part.items()}
        start = time.perf_counter()
        assert manifest.verify(new, files) is None
        rows["manifest_load"].append(time.perf_counter() - start)
        start = time.perf_counter()
        reshard.load_state(new, engine.fragments(), shapes, tp=1, tp_rank=0, kinds=engine.state_kinds())
        dist.barrier()
        rows["new_load"].append(time.perf_counter() - start)
        if rank == 0:
            shutil.rmtree(old)
            shutil.rmtree(new)
    result = {k: statistics.median(v) for k, v in rows.items()}
    result.update(old_bytes=old_bytes, new_bytes=new_bytes, rank=rank)
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="base128", choices=sorted(SHAPES))
    parser.add_argument("--zero", type=int, default=1, choices=(0, 1, 2))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir under /tmp)")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        args.dir = scratch
        mp.start_processes(rank_main, args=(2, args, _free_port(), out), nprocs=2, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    s = SHAPES[args.shape]
    print(f"checkpoint optimizer state, {args.shape} (h{s.hidden} x {s.layers} layers), TP1 x DP2, "
          f"ZeRO-{args.zero}, fp32, median of {args.repeats}; load average at start {load:.2f}")
    for r in ranks:
        print(f"rank {r['rank']}: save old {r['old_save']:.2f} s  new {r['new_save']:.2f} s "
              f"({r['new_save'] / r['old_save']:.2f}x) | load old {r['old_load']:.2f} s  new {r['new_load']:.2f} s "
              f"({r['new_load'] / r['old_load']:.2f}x) | bytes old {r['old_bytes'] / 2**20:.1f} MiB  "
              f"new {r['new_bytes'] / 2**20:.1f} MiB | manifest +{r['manifest_save']:.2f} s save, "
              f"+{r['manifest_load']:.2f} s load")
    ratio = max(r["new_save"] for r in ranks) / max(r["old_save"] for r in ranks)
    print(f"save time new/old (slowest rank): {ratio:.2f}x (target <= {TARGET}x)")
    print("JSON " + json.dumps({"shape": args.shape, "zero": args.zero, "ranks": ranks, "save_ratio": ratio,
                                "load_average": load}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
