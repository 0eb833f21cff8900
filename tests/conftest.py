import os

import pytest

from tests.train_util import LAYOUTS, ONE_STEP, SECRET, STEPS, train


def pytest_configure(config):
    """One intra-op thread in this process and every process it starts (forked ranks,
    subprocesses), set before the test modules import torch: the tests' tensors are tiny, and on
    2 shared cores an OpenMP hand-off between threads costs more than the op (a 6x6 softmax:
    20 ms, not 5 us)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """One embedded-corpus cache for the whole session, the corpus built here, once: no rank
    builds it under a collective's (short) timeout, and every later run finds it."""
    from mbert_train.data import DataConfig, prepare_default_corpus

    path = os.environ.get("MBERT_TEST_CACHE") or str(tmp_path_factory.mktemp("mbert-cache"))
    os.environ["MBERT_CACHE"] = path
    prepare_default_corpus(DataConfig(cache_dir=path))
    return path


@pytest.fixture(scope="session")
def runs(tmp_path_factory, corpus_cache):
    """One 20-step run per layout, shared by every test that compares against them. Only tp1's
    W&B files are checked (test_run_artifacts); the others leave W&B off (3 s a run)."""
    root = tmp_path_factory.mktemp("layouts")
    for name, (nproc, overrides) in LAYOUTS.items():
        wandb = ["logging.wandb_mode=offline"] if name == "tp1" else []
        train(root / name, corpus_cache, [*STEPS, *overrides, *wandb], nproc=nproc,
              extra_env={"WANDB_API_KEY": SECRET} if name == "tp1" else None)
    return root


@pytest.fixture(scope="session")
def one_step_run(tmp_path_factory, corpus_cache):
    """A 1-step run with its step-1 checkpoint; copy it before changing anything."""
    run_dir = tmp_path_factory.mktemp("one-step") / "run"
    train(run_dir, corpus_cache, ["trainer.max_steps=1", *ONE_STEP], timeout=300)
    return run_dir
