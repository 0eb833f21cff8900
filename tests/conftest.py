import os

import pytest

from tests.train_util import LAYOUTS, SECRET, STEPS, train


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """One embedded-corpus cache for the whole session (built on first use, then reused)."""
    path = os.environ.get("MBERT_TEST_CACHE") or str(tmp_path_factory.mktemp("mbert-cache"))
    os.environ["MBERT_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def runs(tmp_path_factory, corpus_cache):
    """One 20-step run per layout, shared by every test that compares against them."""
    root = tmp_path_factory.mktemp("layouts")
    for name, (nproc, overrides) in LAYOUTS.items():
        train(root / name, corpus_cache, [*STEPS, *overrides], nproc=nproc,
              extra_env={"WANDB_API_KEY": SECRET} if name == "tp1" else None)
    return root
