"""Loaders: batch format, exact resume (with workers), DP sharding, cross-process determinism."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_prep.config import PrepConfig
from data_prep.prep import prepare
from mbert_train.batch import BATCH_KEYS, Packing
from mbert_train.data import DataConfig, PretrainingDataset, TrainLoader, build_loaders, open_dataset
from mbert_train.data.dataset import SHUFFLE_STREAM, stream_rng
from mbert_train.data.sampler import ShardedBatchSampler
from tests.test_data_corpus import embedded_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def embedded_dir(corpus_cache) -> str:
    return embedded_corpus(corpus_cache)


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def same(x, y) -> bool:
    """Tensors, ints and the tuples and `Packing`s made of them, equal."""
    if isinstance(x, Packing):
        return type(y) is Packing and all(same(getattr(x, f.name), getattr(y, f.name)) for f in dataclasses.fields(x))
    return torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(same(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_batches_have_the_trainer_format(embedded_dir):
    for objective in ("nsp", "none"):
        cfg = DataConfig(objective=objective, num_workers=0)
        train, evals = build_loaders(cfg, embedded_dir, seed=0, micro_batch_size=4, dp_rank=0,
                                     dp_size=1)
        for batch in take(train, 5) + list(evals)[:2]:
            b, s = batch["input_ids"].shape
            assert s % 8 == 0 and s <= 128
            for key in ("input_ids", "token_type_ids", "attention_mask", "mlm_labels"):
                assert batch[key].dtype == torch.long and batch[key].shape == (b, s)
            pad = batch["attention_mask"] == 0
            assert (batch["input_ids"][pad] == 0).all() and (batch["mlm_labels"][pad] == -100).all()
            if objective == "nsp":
                assert batch["nsp_labels"].shape == (b,) and batch["nsp_labels"].dtype == torch.long
            else:
                assert "nsp_labels" not in batch
            # The packing comes built, from the batch's own masks.
            assert same(batch["packing"], Packing.from_masks(batch["attention_mask"], batch["mlm_labels"]))
            assert set(batch) <= set(BATCH_KEYS)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_uninterrupted_batches(embedded_dir, workers):
    cfg = DataConfig(num_workers=workers, prefetch_factor=2)
    kwargs = dict(seed=5, micro_batch_size=48, dp_rank=1, dp_size=2)
    reference, _ = build_loaders(cfg, embedded_dir, **kwargs)
    per_epoch = reference.batches_in_epoch(0)
    total = per_epoch + 6  # crosses into the second epoch
    expected = take(reference, total)
    assert reference.epoch == 1
    for k in (3, per_epoch - 1, per_epoch + 2):
        first, _ = build_loaders(cfg, embedded_dir, **kwargs)
        assert same_batches(take(first, k), expected[:k])
        buffer = io.BytesIO()
        torch.save(first.state_dict(), buffer)  # the checkpoint path: weights_only-safe
        first.close()
        buffer.seek(0)
        resumed, _ = build_loaders(cfg, embedded_dir, **kwargs)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        assert same_batches(take(resumed, total - k), expected[k:])


def test_resume_with_a_new_global_batch_continues_the_same_samples(embedded_dir):
    cfg = DataConfig(num_workers=0)
    small, _ = build_loaders(cfg, embedded_dir, seed=1, micro_batch_size=8, dp_rank=0, dp_size=1)
    take(small, 4)
    state = small.state_dict()
    assert (state["epoch"], state["sample"], state["global_samples"]) == (0, 32, 32)
    tail = take(small, 2)
    big, _ = build_loaders(cfg, embedded_dir, seed=1, micro_batch_size=16, dp_rank=0, dp_size=1)
    assert big.load_state_dict(state) == ("global batch changed from 8 to 16 samples (micro_batch_size "
                                          "x grad_accum x DP); continuing at global sample 32 of the "
                                          "data stream")
    merged = next(big)
    rows = [row for b in tail for row in zip(b["input_ids"], b["attention_mask"])]
    for (ids, mask), big_ids, big_mask in zip(rows, merged["input_ids"],
                                              merged["attention_mask"]):
        assert torch.equal(ids[mask.bool()], big_ids[big_mask.bool()])
    assert len(rows) == len(merged["input_ids"]) == 16
    assert big.global_samples == 48
    other, _ = build_loaders(cfg, embedded_dir, seed=2, micro_batch_size=8, dp_rank=0,
                             dp_size=1)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


def test_dp_ranks_are_disjoint_equal_and_cover_the_epoch(embedded_dir):
    ds = PretrainingDataset(open_dataset(embedded_dir), "train", DataConfig(), seed=9)
    n = ds.epoch_size(0)
    per_rank = []
    for rank in range(2):
        sampler = ShardedBatchSampler(ds.epoch_size, seed=9, micro_batch_size=8, dp_rank=rank,
                                      dp_size=2)
        batches = list(sampler.epoch_batches(0))
        assert all(len(b) == 8 for b in batches)
        per_rank.append([i for b in batches for _, i in b])
    assert len(per_rank[0]) == len(per_rank[1]) == (n // 16) * 8
    assert not set(per_rank[0]) & set(per_rank[1])
    covered = set(per_rank[0]) | set(per_rank[1])
    assert len(covered) == n - n % 16 and covered <= set(range(n))
    # The loaders deliver exactly those samples, padded.
    cfg = DataConfig(num_workers=0)
    loader, _ = build_loaders(cfg, embedded_dir, seed=9, micro_batch_size=8, dp_rank=1,
                              dp_size=2)
    batch = next(loader)
    for row, index in enumerate(per_rank[1][:8]):
        ids = ds.sample(0, index)["input_ids"]
        assert torch.equal(batch["input_ids"][row, :len(ids)], torch.from_numpy(ids))


def test_each_epoch_is_a_new_permutation_fixed_by_the_seed():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = ShardedBatchSampler(lambda e: 64, seed=seed, micro_batch_size=8, dp_rank=0, dp_size=1)
        return [i for batch in sampler.epoch_batches(epoch) for _, i in batch]

    orders = [order(3, epoch) for epoch in range(3)]
    for o in orders:
        assert sorted(o) == list(range(64)) and o != list(range(64))
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]
    assert orders == [order(3, epoch) for epoch in range(3)]
    assert order(4, 0) != orders[0]
    # The infinite stream crosses into epoch 1 with epoch 1's order.
    stream = iter(ShardedBatchSampler(lambda e: 64, seed=3, micro_batch_size=8, dp_rank=0, dp_size=1))
    flat = [key for _ in range(16) for key in next(stream)]
    assert flat == [(0, i) for i in orders[0]] + [(1, i) for i in orders[1]]


def test_eval_loader_is_fixed_and_sharded(embedded_dir):
    cfg = DataConfig(num_workers=0)
    runs = []
    for seed in (0, 1):
        _, evals = build_loaders(cfg, embedded_dir, seed=seed, micro_batch_size=8, dp_rank=0,
                                 dp_size=1)
        assert len(evals) > 0
        runs.append(list(evals))
        assert same_batches(list(evals), runs[-1])
    assert same_batches(runs[0], runs[1])  # independent of the training seed
    shards = [build_loaders(cfg, embedded_dir, seed=0, micro_batch_size=8, dp_rank=r,
                            dp_size=2)[1] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) and shards[0].num_samples == shards[1].num_samples
    assert not {k for b in shards[0].batches for k in b} & {k for b in shards[1].batches for k in b}


def sample_digest(directory: str, seed: int) -> str:
    """Hash of a few samples from scattered epochs and indices."""
    ds = PretrainingDataset(open_dataset(directory), "train",
                            DataConfig(whole_word_masking=True), seed=seed)
    h = hashlib.sha256()
    for epoch, index in [(0, 0), (0, 17), (3, 5), (1, 999)]:
        s = ds.sample(epoch, index)
        for key in sorted(s):
            h.update(np.asarray(s[key]).tobytes())
    return h.hexdigest()


def test_samples_are_identical_in_another_process(embedded_dir):
    probe = "import sys; from tests.test_data_loader import sample_digest as d; " \
            "print(d(sys.argv[1], int(sys.argv[2])))"
    done = subprocess.run([sys.executable, "-c", probe, embedded_dir, "42"], check=True,
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.stdout.strip() == sample_digest(embedded_dir, 42)
    assert sample_digest(embedded_dir, 43) != sample_digest(embedded_dir, 42)


def test_corpora_that_cannot_work_fail_with_one_line(tmp_path):
    text = tmp_path / "one.txt"
    text.write_text(" ".join(f"Sentence number {i} is here." for i in range(400)) + "\n")
    out = tmp_path / "one"
    prepare(PrepConfig(inputs=[str(text)], output=str(out), vocab_size=100, quiet=True))
    for objective in ("nsp", "sop"):
        with pytest.raises(ValueError, match="needs at least 2 documents") as info:
            build_loaders(DataConfig(objective=objective), str(out), seed=0, micro_batch_size=2,
                          dp_rank=0, dp_size=1)
        assert "\n" not in str(info.value)
    train, evals = build_loaders(DataConfig(objective="none", max_seq_length=32, num_workers=0),
                                 str(out), seed=0, micro_batch_size=2, dp_rank=0, dp_size=1)
    assert next(train)["input_ids"].shape == (2, 32) and len(evals) == 0
    with pytest.raises(ValueError, match="micro_batch_size=4096"):
        build_loaders(DataConfig(objective="none"), str(out), seed=0, micro_batch_size=4096,
                      dp_rank=0, dp_size=1)


def test_config_errors_name_the_field():
    for kwargs, needle in [(dict(objective="mlm"), "data.objective"),
                           (dict(max_seq_length=4), "data.max_seq_length"),
                           (dict(masked_lm_prob=0.0), "data.masked_lm_prob"),
                           (dict(num_workers=-1), "data.num_workers"),
                           (dict(max_predictions_per_seq=500), "data.max_predictions_per_seq")]:
        with pytest.raises(ValueError, match=needle):
            DataConfig(**kwargs)


# ---- the data position across layouts, on sample keys alone ------------------------------------
class KeyDataset(torch.utils.data.Dataset):
    """Each sample is its own (epoch, index) key; epochs of varying size, as the pair maps have."""

    def __init__(self, fail_at: tuple[int, int] | None = None):
        self.cfg = SimpleNamespace(objective="nsp", max_seq_length=16, short_seq_prob=0.1,
                                   accept_changed_corpus=False)
        self.corpus = SimpleNamespace(metadata={"num_tokens": 1000}, fingerprint="keys", path="/keys")
        self.fail_at = fail_at

    def epoch_size(self, epoch: int) -> int:
        return 37 + 5 * (epoch % 3)  # tails of 1, 2, 3 samples at a global batch of 4

    def __getitem__(self, key: tuple[int, int]) -> tuple[int, int]:
        if key == self.fail_at:
            self.fail_at = None
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal")
        return key


def key_loaders(mb: int, accum: int, dp: int, dataset: KeyDataset | None = None) -> list[TrainLoader]:
    """One loader per DP rank of the layout micro_batch_size x grad_accum x DP."""
    return [TrainLoader(dataset or KeyDataset(), list, seed=7, micro_batch_size=mb, dp_rank=r,
                        dp_size=dp, num_workers=0, prefetch_factor=2, grad_accum=accum)
            for r in range(dp)]


def steps(group: list[TrainLoader], n: int) -> list[list[list[tuple[int, int]]]]:
    """n optimizer steps of all ranks; a step is its chunks k = micro_step * DP + rank, in order."""
    accum, dp = group[0].grad_accum, group[0].dp_size
    per_rank = [[loader.take(accum) for _ in range(n)] for loader in group]
    return [[per_rank[r][s][a] for a in range(accum) for r in range(dp)] for s in range(n)]


def flat(step: list[list[tuple[int, int]]]) -> list[tuple[int, int]]:
    return [key for chunk in step for key in chunk]


def saved_state(group: list[TrainLoader]) -> dict:
    """Rank 0's state, through a weights_only round trip; every rank holds the same."""
    states = [loader.state_dict() for loader in group]
    assert all(state == states[0] for state in states)
    buffer = io.BytesIO()
    torch.save(states[0], buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("x, y, total, resume_at", [
    ((2, 1, 2), (2, 2, 1), 30, (3, 8, 9, 19, 25)),  # DP2 -> DP1 with grad_accum doubled
    ((4, 2, 1), (2, 2, 2), 12, (2, 4, 9)),  # DP1 -> DP2, micro-batch halved
    ((2, 1, 2), (1, 1, 4), 30, (5, 9, 20)),  # DP2 micro 2 -> DP4 micro 1
    ((2, 2, 2), (2, 2, 2), 12, (4, 7)),  # same layout
])
def test_same_global_batch_on_another_layout_feeds_the_uninterrupted_samples(x, y, total, resume_at):
    reference = steps(key_loaders(*x), total)
    assert {key[0] for step in reference for key in flat(step)} == {0, 1, 2}  # crosses two epochs
    for step in reference:  # a step never straddles epochs, and the tail is dropped
        assert len({epoch for epoch, _ in flat(step)}) == 1 and len(flat(step)) == x[0] * x[1] * x[2]
    for k in resume_at:
        first = key_loaders(*x)
        assert steps(first, k) == reference[:k]
        state = saved_state(first)
        resumed = key_loaders(*y)
        assert {loader.load_state_dict(state) for loader in resumed} == {None}
        assert resumed[0].global_samples == k * x[0] * x[1] * x[2]
        rest = steps(resumed, total - k)
        # The same samples in each step, in the same order of (micro-step, rank) chunks; with the
        # same micro_batch_size, the same chunk on the same (micro-step, rank) of that layout.
        assert [flat(s) for s in rest] == [flat(s) for s in reference[k:]]
        if x[0] == y[0]:
            assert rest == reference[k:]


def test_the_stream_at_grad_accum_1_is_one_global_micro_batch_per_step():
    # The stream before grad_accum counted: global micro-batch j of epoch e is perm[j*G:(j+1)*G],
    # G = mb x DP, rank r reads [r*mb:(r+1)*mb] of it, the tail shorter than G is dropped.
    mb, dp, rank = 2, 2, 1
    expected = []
    for epoch in range(3):
        size = KeyDataset().epoch_size(epoch)
        perm = stream_rng(SHUFFLE_STREAM, 7, epoch).permutation(size)
        expected += [[(epoch, int(i)) for i in perm[j * 4 + rank * mb:j * 4 + rank * mb + mb]]
                     for j in range(size // (mb * dp))]
    assert len(expected) == 30
    assert [step[rank] for step in steps(key_loaders(mb, 1, dp), 30)] == expected


def test_a_resume_in_the_middle_of_a_step_continues_it_where_the_layout_allows():
    reference = steps(key_loaders(2, 4, 1), 6)
    for micro, y, note in [(2, (2, 2, 2), None), (1, (2, 2, 2), "not a multiple")]:
        first = key_loaders(2, 4, 1)[0]
        delivered = [next(first) for _ in range(4 + micro)]  # one step and `micro` micro-steps
        assert delivered == reference[0] + reference[1][:micro]
        resumed = key_loaders(*y)
        notes = {loader.load_state_dict(first.state_dict()) for loader in resumed}
        if note is None:
            assert notes == {None}
            assert [resumed[r].take(1)[0] for r in range(2)] == reference[1][2:4]
        else:
            (line,) = notes
            assert note in line and "global sample 10 of the data stream" in line
            assert flat(steps(resumed, 1)[0]) == flat(reference[1])[2:] + flat(reference[2])[:2]


@pytest.mark.parametrize("k", [3, 8])  # 8: fewer than the new global batch left in epoch 0
def test_a_new_global_batch_continues_at_the_same_global_sample_and_says_so(k):
    reference = [key for step in steps(key_loaders(2, 1, 2), 40) for key in flat(step)]
    first = key_loaders(2, 1, 2)
    steps(first, k)
    bigger = key_loaders(2, 2, 2)
    notes = {loader.load_state_dict(saved_state(first)) for loader in bigger}
    assert notes == {"global batch changed from 4 to 8 samples (micro_batch_size x grad_accum x DP); "
                     f"continuing at global sample {4 * k} of the data stream"}
    assert bigger[0].global_samples == 4 * k
    rest = [key for step in steps(bigger, 5) for key in flat(step)]
    assert bigger[0].global_samples == 4 * k + 40
    continued = [key for key in reference[4 * k:] if key[0] > 0] if k == 8 else reference[4 * k:]
    # Epoch 0 has 37 samples: at 32 the new batch of 8 no longer fits and epoch 1 starts.
    assert rest == continued[:40]
    assert len(set(rest)) == 40 and {key[0] for key in rest} <= {0, 1}


def test_a_state_of_the_micro_batch_count_format_still_loads():
    reference = steps(key_loaders(2, 1, 2), 25)
    per_epoch0 = 37 // 4
    # Before the corpus fingerprint, the signature's last part was the corpus' token count.
    old = {"epoch": 1, "position": 3, "seed": 7, "micro_batch_size": 2, "dp_size": 2, "signature": "nsp/16/0.1/1000"}
    for layout in ((2, 1, 2), (2, 2, 1)):
        resumed = key_loaders(*layout)
        assert {loader.load_state_dict(old) for loader in resumed} == {None}
        assert resumed[0].global_samples == (per_epoch0 + 3) * 4
        assert [flat(s) for s in steps(resumed, 5)] == [flat(s) for s in reference[per_epoch0 + 3:][:5]]


def test_take_is_all_or_none_and_rewind_restores_the_position():
    reference = steps(key_loaders(2, 2, 1), 3)
    loader = key_loaders(2, 2, 1, KeyDataset(fail_at=reference[1][1][0]))[0]
    assert loader.take(2) == reference[0]
    mark = loader.mark()
    with pytest.raises(RuntimeError, match="DataLoader worker"):
        loader.take(2)
    assert loader.mark() == mark and loader.global_samples == 4
    assert loader.take(2) == reference[1]
    loader.rewind(mark)
    assert loader.global_samples == 4 and loader.take(2) == reference[1]
    assert loader.take(2) == reference[2]
