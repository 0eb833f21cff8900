"""Loaders: batch format, exact resume (with workers), DP sharding, cross-process determinism."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_prep.config import PrepConfig
from data_prep.prep import prepare
from mbert_train.data import DataConfig, PretrainingDataset, build_loaders, open_dataset
from mbert_train.data.sampler import ShardedBatchSampler
from tests.test_data_corpus import embedded_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def embedded_dir(corpus_cache) -> str:
    return embedded_corpus(corpus_cache)


def take(loader, n: int) -> list[dict]:
    return [next(loader) for _ in range(n)]


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


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
    assert (state["epoch"], state["position"]) == (0, 4)
    tail = take(small, 2)
    big, _ = build_loaders(cfg, embedded_dir, seed=1, micro_batch_size=16, dp_rank=0, dp_size=1)
    big.load_state_dict(state)
    merged = next(big)
    rows = [row for b in tail for row in zip(b["input_ids"], b["attention_mask"])]
    for (ids, mask), big_ids, big_mask in zip(rows, merged["input_ids"],
                                              merged["attention_mask"]):
        assert torch.equal(ids[mask.bool()], big_ids[big_mask.bool()])
    assert len(rows) == len(merged["input_ids"]) == 16
    other, _ = build_loaders(cfg, embedded_dir, seed=2, micro_batch_size=8, dp_rank=0,
                             dp_size=1)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    odd, _ = build_loaders(cfg, embedded_dir, seed=1, micro_batch_size=24, dp_rank=0,
                           dp_size=1)
    with pytest.raises(ValueError, match="not a multiple"):
        odd.load_state_dict(state)


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
