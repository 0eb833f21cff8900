"""Resume at any layout: weights and optimizer state move between TP, DP, ZeRO stage and grad_accum.

The geometry (which rectangles of the full parameter a rank's flat fragment holds) is checked
on its own for every layout; the end-to-end runs check that a run stopped at layout X and
resumed at layout Y continues with the losses and Adam moments of the run never stopped.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from mbert_train.checkpoint.dcp import Fragment, Part, chunks
from mbert_train.engine import MOMENTS
from mbert_train.model.config import ModelConfig
from mbert_train.model.weights import full_shapes, shard_full, template
from mbert_train.parallel.layers import sharding
from tests.dist import spawn
from tests.train_util import ONE_STEP, losses, train

TINY = ModelConfig(vocab_size=301, hidden_size=16, num_layers=1, num_heads=4, intermediate_size=32,
                   max_position_embeddings=32)


def _fragments_of(tp: int, tp_rank: int, dp: int, dp_rank: int, zero: bool, shards: dict[str, torch.Tensor],
                  model) -> list[Fragment]:
    """What a rank holds, ZeRO-style: the TP shard's parameters flattened in order, cut into `dp`
    equal partitions (the last one padded), and each parameter's piece of partition `dp_rank`."""
    params = dict(model.named_parameters())
    names = list(params)
    total = sum(shards[n].numel() for n in names)
    size = -(-total // dp)
    lo, hi = (dp_rank * size, (dp_rank + 1) * size) if zero else (0, total)
    out, offset = [], 0
    for name in names:
        n = shards[name].numel()
        start, stop = max(lo, offset), min(hi, offset + n)
        if start < stop:
            p = params[name]
            flat = shards[name].reshape(-1)
            out.append(Fragment(name, tuple(shards[name].shape), start - offset, stop - start,
                                {"exp_avg": flat[start - offset:stop - offset]}, sharding(p)))
        offset += n
    return out


@pytest.mark.parametrize("tp,dp,zero", [(1, 1, False), (2, 1, False), (4, 1, True), (1, 3, True), (2, 3, True),
                                        (4, 2, True), (2, 2, False)])
def test_fragments_tile_the_full_parameters_exactly_once(tp, dp, zero):
    """Every element of every full parameter is written by exactly one rank, from the right
    place: the writers' chunks reassemble the full tensors (fused-QKV stride blocks, row-parallel
    columns, vocabulary padding dropped)."""
    torch.manual_seed(0)
    full = {n: torch.randn(s) for n, s in full_shapes(TINY).items()}
    shapes = {n: tuple(s) for n, s in full_shapes(TINY).items()}
    model = template(TINY)
    rebuilt = {n: torch.full(s, float("nan")) for n, s in shapes.items()}
    writes = {n: torch.zeros(s, dtype=torch.int64) for n, s in shapes.items()}
    for tp_rank in range(tp):
        shards = shard_full(full, TINY, tp, tp_rank)
        for dp_rank in range(dp):
            if not zero and dp_rank:
                continue  # replicas write nothing
            for frag in _fragments_of(tp, tp_rank, dp, dp_rank, zero, shards, model):
                if not frag.sharding.sharded and tp_rank:
                    continue
                assert frag.full_shape(tp, TINY.vocab_size) == shapes[frag.name]  # from the shard alone
                found, padding = chunks(frag, "exp_avg", tp, tp_rank, shapes[frag.name])
                for c in found:
                    region = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))
                    rebuilt[frag.name][region] = c.tensor
                    writes[frag.name][region] += 1
                for view in padding:
                    assert frag.name in ("word_embeddings.weight", "mlm_bias")
                    assert torch.all(view == 0)  # padding rows of a fresh shard are zero
    for name in shapes:
        assert torch.equal(writes[name], torch.ones_like(writes[name])), name
        assert torch.equal(rebuilt[name], full[name]), name


def _save_then_load(directory: str, save_layout: tuple, load_layout: tuple) -> None:
    """On 2 gloo ranks: write state at `save_layout` (tp, dp, zero), read it at `load_layout`."""
    import torch.distributed as dist

    from mbert_train.checkpoint import dcp

    rank = dist.get_rank()
    torch.manual_seed(0)
    full = {n: torch.randn(s) for n, s in full_shapes(TINY).items()}
    model = template(TINY)

    def mine(layout):
        tp, dp, zero = layout
        tp_rank, dp_rank = rank % tp, rank // tp
        shards = shard_full(full, TINY, tp, tp_rank)
        return tp, tp_rank, dp_rank, zero, _fragments_of(tp, tp_rank, dp, dp_rank, zero, shards, model)

    tp, tp_rank, dp_rank, zero, frags = mine(save_layout)
    writes = zero or dp_rank == 0
    blobs = {f"rng/{rank}": bytes([rank]) * 3, **({"scalars": b'{"step": 3}'} if rank == 0 else {})}
    dcp.save_state(Path(directory), [Part(frags if writes else [], ("exp_avg",))], blobs, tp=tp, tp_rank=tp_rank,
                   vocab_size=TINY.vocab_size)
    tp, tp_rank, dp_rank, zero, expected = mine(load_layout)
    targets = [Fragment(f.name, f.local_shape, f.start, f.numel, {"exp_avg": torch.full_like(f.views["exp_avg"], 7.0)},
                        f.sharding) for f in expected]
    got_blobs = dcp.load_state(Path(directory), [Part(targets, ("exp_avg",))], ["scalars", f"rng/{1 - rank}"],
                               tp=tp, tp_rank=tp_rank, vocab_size=TINY.vocab_size)
    assert got_blobs == {"scalars": b'{"step": 3}', f"rng/{1 - rank}": bytes([1 - rank]) * 3}
    for want, got in zip(expected, targets):
        assert torch.equal(got.views["exp_avg"], want.views["exp_avg"]), (rank, want.name)
    if rank == 0:  # one process, no group: every full tensor, as mbert-convert reads a checkpoint
        whole = dcp.read_full(Path(directory), "exp_avg")
        assert whole.keys() == full.keys() and all(torch.equal(whole[n], full[n]) for n in full)


@pytest.mark.parametrize("save_layout,load_layout", [((2, 1, True), (1, 2, True)), ((1, 2, False), (2, 1, False)),
                                                     ((1, 2, True), (2, 1, True))])
def test_state_saved_at_one_layout_loads_at_another(tmp_path, save_layout, load_layout):
    spawn(_save_then_load, 2, str(tmp_path / "state"), save_layout, load_layout)


# ---- end to end: stop at layout X, resume at layout Y --------------------------------------

# Dropout 0 where exactness is asserted; micro_batch_size fixed so every layout sees the same
# micro-batches (the global batch mb x accum x DP stays 8).
BASE = ["model.hidden_dropout=0", "model.attention_dropout=0", "trainer.micro_batch_size=4", "trainer.max_steps=4",
        "trainer.checkpoint_every=1", "trainer.keep_last=4", "trainer.eval_every=0", "trainer.export_hf=false",
        "logging.wandb_mode=disabled", "data.num_workers=0"]
K, N = 2, 4
LAYOUTS = {  # name: (processes, overrides)
    "tp2_dp1_z1": (2, ["parallel.tensor_parallel=2", "parallel.zero_stage=1", "trainer.grad_accum=2"]),
    "tp1_dp2_z2": (2, ["parallel.zero_stage=2", "trainer.grad_accum=1"]),
    "tp1_dp2_z0": (2, ["parallel.zero_stage=0", "trainer.grad_accum=1"]),
    "tp2_dp1_z1_accum2": (2, ["parallel.tensor_parallel=2", "parallel.zero_stage=1", "trainer.grad_accum=2"]),
    "tp1_dp1_z0_accum2": (1, ["parallel.zero_stage=0", "trainer.grad_accum=2"]),
    "tp2_dp2_z1": (4, ["parallel.tensor_parallel=2", "parallel.zero_stage=1", "trainer.grad_accum=1",
                       "trainer.micro_batch_size=2"]),
    "tp1_dp2_z1": (2, ["parallel.zero_stage=1", "trainer.grad_accum=1", "trainer.micro_batch_size=2"]),
}
TRANSITIONS = [("tp2_dp1_z1", "tp1_dp2_z2"), ("tp1_dp2_z0", "tp2_dp1_z1_accum2"), ("tp1_dp2_z0", "tp1_dp1_z0_accum2"),
               ("tp2_dp2_z1", "tp1_dp2_z1")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus_cache):
    root = tmp_path_factory.mktemp("reshard")
    for name in sorted({x for x, _ in TRANSITIONS}):
        nproc, overrides = LAYOUTS[name]
        train(root / name, corpus_cache, [*BASE, *overrides], nproc=nproc)
    return root


def _moments(step_dir: Path) -> dict[str, torch.Tensor]:
    from mbert_train.checkpoint.dcp import read_full

    return {f"{name}/{kind}": t for kind in MOMENTS for name, t in read_full(step_dir, kind).items()}


@pytest.mark.slow
@pytest.mark.parametrize("x,y", TRANSITIONS, ids=[f"{x}->{y}" for x, y in TRANSITIONS])
def test_resume_at_another_layout_continues_the_run(uninterrupted, tmp_path, corpus_cache, x, y):
    a = uninterrupted / x
    b = tmp_path / "b"
    shutil.copytree(a, b)
    for step in range(K + 1, N + 1):
        shutil.rmtree(b / "checkpoints" / f"step_{step:08d}")
    (b / "checkpoints" / "latest").write_text(f"step_{K:08d}\n")
    nproc, overrides = LAYOUTS[y]
    proc = train(b, corpus_cache, [*BASE, *overrides], nproc=nproc)
    first = f"resharding checkpoint step_{K:08d} from "
    assert any(line.startswith(f"[mbert-train] {first}") for line in proc.stdout.splitlines()), proc.stdout
    want, got = losses(a), losses(b)
    assert sorted(got) == list(range(1, N + 1))
    for step in range(1, N + 1):
        assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got[step], want[step])
    # The Adam moments after the first resumed step, gathered to full tensors from both runs.
    ma, mb = _moments(a / "checkpoints" / f"step_{K + 1:08d}"), _moments(b / "checkpoints" / f"step_{K + 1:08d}")
    assert ma.keys() == mb.keys()
    for key in ma:
        scale = ma[key].abs().max().item()
        assert scale > 0, key
        assert (ma[key] - mb[key]).abs().max().item() <= 1e-6 * scale, key


class _Boom:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_pickle_in_the_checkpoint_metadata_is_refused_without_running(tmp_path):
    import pickle

    from mbert_train.checkpoint import CheckpointError
    from mbert_train.checkpoint.dcp import SafeReader, UnsafeCheckpoint
    from mbert_train.checkpoint.state import _dcp_errors

    optim = tmp_path / "step"
    optim.mkdir()
    marker = tmp_path / "pwned"
    (optim / ".metadata").write_bytes(pickle.dumps(_Boom(marker)))
    with pytest.raises(UnsafeCheckpoint):
        SafeReader(str(optim)).read_metadata()
    with pytest.raises(CheckpointError) as info:
        with _dcp_errors(optim, "reading the training state from"):
            SafeReader(str(optim)).read_metadata()
    assert not marker.exists()
    assert str(info.value) == (f"checkpoint file {optim / '.metadata'} names the Python global posix.system, which "
                               "no checkpoint holds; refusing to load it")


def test_truncated_training_state_stops_mbert_train_with_one_line(one_step_run, tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    shutil.copytree(one_step_run, run_dir)
    optim = run_dir / "checkpoints" / "step_00000001"
    # Without its manifest, whose check would refuse the file before DCP reads it.
    meta_file = optim / "meta.json"
    meta_file.write_text(json.dumps({k: v for k, v in json.loads(meta_file.read_text()).items() if k != "files"}))
    data = next(optim.glob("__0_*.distcp"))
    data.write_bytes(data.read_bytes()[:100])
    proc = train(run_dir, corpus_cache, ["trainer.max_steps=2", *ONE_STEP], check=False, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mbert-train: error: checkpoint state {optim} is truncated or corrupt"), last
    (optim / ".metadata").unlink()
    proc = train(run_dir, corpus_cache, ["trainer.max_steps=2", *ONE_STEP], check=False, timeout=300)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"mbert-train: error: checkpoint file {optim / '.metadata'} is missing; "
        "delete the checkpoint dir or point run.dir elsewhere"), proc.stderr[-2000:]
