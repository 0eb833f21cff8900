"""No secret reaches disk: a canary given on the command line (a secret-named key, also inside
a dict override) and one in the environment are grepped for in every file a real run writes,
Hydra's `.hydra/` record and the checkpoints' `meta.json` (their run record) included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mbert_train.metrics import is_secret_key, redact, redact_argv, secret_values
from mbert_train.train import _override_secrets
from tests.train_util import start, train

CLI_CANARY = "CANARY123cli"
DICT_CANARY = "CANARY789dict"
ENV_CANARY = "CANARY456env"
SECRETS = [f"+trainer.deepspeed.comet.api_key={CLI_CANARY}",
           # docs/configuration.md's dict form with a secret inside, replacing the first: the final config
           # holds only DICT_CANARY, yet the command line Hydra and W&B record holds both.
           f"trainer.deepspeed={{zero_optimization: {{reduce_bucket_size: 2e8}}, comet: {{api_key: {DICT_CANARY}}}}}"]
SECRET_ENV = {"WANDB_API_KEY": ENV_CANARY}


def _leaks(root: Path) -> list[str]:
    """Every file under `root` (binary too, symlinks followed once) holding a canary."""
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files, f"nothing written under {root}"
    return [f"{p}: {c}" for p in files for c in (CLI_CANARY, DICT_CANARY, ENV_CANARY)
            if c.encode() in p.read_bytes()]


def test_identifiers_are_not_secrets_and_secret_values_are_scrubbed_everywhere():
    assert not is_secret_key("pad_token_id") and not is_secret_key("access_key_id")
    assert is_secret_key("api_key") and is_secret_key("hf_token")
    config = {"model": {"pad_token_id": 12345}, "ds": {"comet": {"api_key": "abcd1234"}},
              "note": "see https://x/?k=abcd1234", "short": {"token": "ab"}}
    assert secret_values(config) >= {"abcd1234"} and "12345" not in secret_values(config)
    assert redact(config) == {"model": {"pad_token_id": 12345}, "ds": {"comet": {"api_key": "***"}},
                              "note": "***", "short": {"token": "***"}}
    argv = ["ds={comet: {api_key: abcd1234}}", "+ds.comet.api_key=abcd1234", "model.pad_token_id=1"]
    assert redact_argv(argv, values=secret_values(config)) == ["***", "+ds.comet.api_key=***", argv[2]]


def test_command_line_secrets_include_replaced_and_nested_values():
    overrides = ["trainer.deepspeed={comet: {api_key: abcd1234}}", "++trainer.deepspeed.comet.api_key=wxyz9876",
                 "model.pad_token_id=12345", "optim.lr=1e-3,2e-3"]
    assert _override_secrets(overrides) == {"abcd1234", "wxyz9876"}


@pytest.mark.slow
def test_no_secret_anywhere_under_the_run_dir(tmp_path, corpus_cache):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # an empty folder (as the launchers make) is a fine run.dir
    overrides = ["trainer.max_steps=2", "trainer.checkpoint_every=1", "trainer.eval_every=0", "trainer.keep_last=5",
                 "logging.wandb_mode=offline", *SECRETS]
    first = train(run_dir, corpus_cache, overrides, extra_env=SECRET_ENV, timeout=300)
    assert "new run" in first.stdout
    # A rerun of the same run.dir resumes (and rewrites .hydra/ and config.yaml).
    second = train(run_dir, corpus_cache, [*overrides, "trainer.max_steps=3"], extra_env=SECRET_ENV, timeout=300)
    assert "resumed at step 2" in second.stdout, second.stdout
    written = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert {".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "config.yaml",
            "checkpoints/step_00000001/meta.json", "checkpoints/step_00000003/meta.json"} <= written
    assert any(p.startswith("wandb/") for p in written)
    assert _leaks(run_dir) == []
    # The run record (the redacted config) is in meta.json, so the grep covered it.
    meta = json.loads((run_dir / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["run"]["config"]["trainer"]["deepspeed"]["comet"]["api_key"] == "***"
    # The redacted records still say what was run (so the grep is not vacuous).
    overrides_yaml = (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "+trainer.deepspeed.comet.api_key=***" in overrides_yaml and "trainer.max_steps=3" in overrides_yaml
    assert "reduce_bucket_size: 200000000.0" in (run_dir / "config.yaml").read_text()


@pytest.mark.slow
def test_no_secret_in_hydra_default_output_dir(tmp_path, corpus_cache):
    """Without run.dir Hydra picks runs/DATE_TIME; it writes nothing there itself, and what we
    write is redacted, also when the run then fails (here on a missing dataset)."""
    proc = start(None, corpus_cache, ["data.path=no/such/dataset", "logging.wandb_mode=offline", *SECRETS],
                 extra_env=SECRET_ENV, cwd=tmp_path).result(timeout=120)
    assert proc.returncode == 2 and "data.path" in proc.stderr, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / ".hydra" / "hydra.yaml").is_file() and (run_dir / "config.yaml").is_file()
    assert _leaks(tmp_path) == []
