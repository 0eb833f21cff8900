"""A wheel built from this checkout works on its own: installed apart from the checkout and from
the editable install, `mbert-train` trains on the embedded corpus from an empty folder (its
Hydra configs come from inside the wheel) and `mbert-prep` prepares a text file."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from setuptools import find_namespace_packages

from data_prep import format as fmt
from tests.test_data_prep import prose
from tests.train_util import env

ROOT = Path(__file__).resolve().parents[1]
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "conf", "mbert_train", "data_prep")
"""What the wheel is built from; copied first, so the build writes nothing into the checkout."""


def test_pyproject_lists_every_package():
    """pyproject.toml lists its packages by hand (to map `conf/` to `mbert_train.conf`): a new
    package or conf group missing from the list would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    code = find_namespace_packages(str(ROOT), include=["mbert_train", "mbert_train.*", "data_prep", "data_prep.*"],
                                   exclude=["*.__pycache__"])
    conf = ["mbert_train.conf", *(f"mbert_train.conf.{d.name}" for d in (ROOT / "conf").iterdir() if d.is_dir())]
    assert sorted(listed) == sorted(code + conf)


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.mark.slow
def test_wheel_trains_and_prepares_outside_the_checkout(tmp_path, corpus_cache):
    src, dist, site, work = (tmp_path / d for d in ("src", "dist", "site", "work"))
    src.mkdir()
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / name, src / name)
    # No network: the build uses this environment's setuptools, the install takes nothing else.
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", dist, src])
    (wheel,) = dist.glob("mbert_train-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "--target", site, wheel])
    shutil.rmtree(src)

    work.mkdir()
    # The wheel's copy first on sys.path; the editable install's finder only answers after it.
    child = {**env(corpus_cache), "PYTHONPATH": str(site)}
    where = _run([sys.executable, "-c", "import data_prep, mbert_train, mbert_train.config as c; "
                  "print(mbert_train.__file__); print(data_prep.__file__); print(c.CONF_DIR)"],
                 cwd=work, env=child).stdout.split()
    assert len(where) == 3 and all(Path(p).resolve().is_relative_to(site.resolve()) for p in where), where
    assert (Path(where[2]) / "config.yaml").is_file()

    _run([site / "bin" / "mbert-train", "trainer.max_steps=2", "logging.wandb_mode=disabled"], cwd=work, env=child,
         timeout=240)
    (run_dir,) = (work / "runs").iterdir()
    steps = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 2

    (work / "tiny.txt").write_text("\n\n".join(prose(6, seed) for seed in range(12)) + "\n")
    _run([site / "bin" / "mbert-prep", "tiny.txt", "--output", "ds", "--vocab-size", "200", "--quiet"], cwd=work,
         env=child, timeout=240)
    assert fmt.is_prepared_dataset(str(work / "ds"))
