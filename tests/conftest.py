import os

import pytest


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """One embedded-corpus cache for the whole session (built on first use, then reused)."""
    path = os.environ.get("MBERT_TEST_CACHE") or str(tmp_path_factory.mktemp("mbert-cache"))
    os.environ["MBERT_CACHE"] = path
    return path
