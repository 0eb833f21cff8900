"""Every command of the documentation runs, on CPU, with a short-run override appended.

Where commands are read from, and how (`blocks`):
- README.md and docs/*.md: every fenced block opened with ```bash (commands) or ```python (a
  script, run whole).
- launch/*: the header comment (the leading `#` lines): each line indented 3 or more spaces
  after its `#` is a command line.
- conf/experiment/*.yaml: the first comment line that is not `# @package ...`.
In a bash block a line ending in `\\` continues on the next, `#` starts a comment, `&&` separates
commands, `export A=1` sets A for the rest of the block and `A=1 cmd` for cmd; `...` is skipped.

Every command is either run (`RUNNERS`, by its program) or on `NOT_RUN` with the reason it cannot
run here; anything else fails `test_every_command_is_run_or_listed`, so a new example cannot go
stale unseen. A block's commands run in order, in a fresh directory holding the inputs the
documentation assumes (`INPUTS`: `corpus/`, `/data/wiki`, `runs/my-run`, ...; an absolute
`/data/...` or `/shared/...` path lands under `root/` there).

How each kind runs:
- `mbert-train` and the other `mbert-*` tools: in this process, through their console-script entry
  points (the process boundary proves nothing for them); Hydra's GlobalHydra is cleared and
  the environment, working directory and signal handlers restored after each.
- Training commands get `SHORT` appended: one step of one micro-batch of 2 samples per rank, no
  W&B, progress bar or export, DataLoader workers off; a new `run.dir` unless the command names
  one (a sweep gets its own `hydra.sweep.dir`). A command that picks a model preset other than
  `tiny` (`model=...`, or through an experiment) also gets `shrink`: one layer of 8 dims per head
  and an MLP 4 times as wide, the preset's head count kept (and with it what TP must divide). The
  big presets do not train on a CPU box at full size, and this keeps the test short.
- `torchrun` and the `launch/` scripts: subprocesses with 2 ranks on this machine. A multi-node
  command runs as two local "nodes" (NODE_RANK 0 and 1, one rank each) on 127.0.0.1; `sbatch`
  runs the script itself with `srun` and `scontrol` emulated (two nodes); the DeepSpeed launcher
  gets a one-host hostfile. A SLURM sweep through Hydra's submitit launcher is composed, not
  submitted: `-m` dropped, each sweep's first value, `--cfg hydra`.
- `mkdir`: a subprocess.
- The same launcher command, or `mbert-train` command without a `run.dir` of its own (no later
  line can read its output), met again (in another file, for instance) runs once.
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext, redirect_stdout
from dataclasses import dataclass, field
from glob import glob
from importlib.metadata import entry_points
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# ---- what is not run, and why ---------------------------------------------------------------
NOT_RUN = {
    # The install commands: CI (.ci/run) runs them in a fresh virtual environment, then this suite.
    "python3 -m venv": "creates the virtual environment this test already runs in",
    ". .venv/bin/activate": "activates that virtual environment",
    "pip install": "installs packages over the network; .ci/run installs in a fresh environment",
    "pytest": "runs the test suite, which this test is part of",
    "tensorboard --logdir": "starts a web server that runs until stopped",
    "wandb sync": "uploads to a W&B account over the network",
    "cp launch/hostfile.example launch/hostfile": "the user edits the copy; the test writes its own hostfile",
    "python benchmarks/": "benchmarks run for minutes; tests/test_benchmarks.py runs each at its smallest shape",
}

SHORT = ["trainer.max_steps=1", "trainer.micro_batch_size=2", "trainer.global_batch_size=0", "trainer.eval_batches=1",
         "trainer.export_hf=false", "logging.wandb_mode=disabled", "logging.progress_bar=false", "data.num_workers=0"]
TIMEOUT_S = 300

MBERT_TOOLS = ("mbert-train", "mbert-prep", "mbert-convert", "mbert-plan", "mbert-plot")
LAUNCH_SCRIPTS = ("launch/torchrun_single.sh", "launch/torchrun_multinode.sh", "launch/torchrun_elastic.sh",
                  "launch/deepspeed_launch.sh")
# Set by the test where a launcher runs on this machine instead of a cluster: not part of what
# makes two launcher commands the same.
EMULATED = {"NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "NPROC_PER_NODE", "RUN_DIR", "RDZV_ID"}
# Distributed settings a surrounding launcher or SLURM allocation may have exported.
INHERITED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
             "NNODES", "NODE_RANK", "NPROC_PER_NODE", "RUN_DIR", "HOSTFILE", "MAX_RESTARTS", "RDZV_ID")


# ---- extraction -----------------------------------------------------------------------------
@dataclass
class Block:
    where: str
    lang: str
    lines: list[tuple[int, str]]
    source: str = ""


@dataclass
class Command:
    where: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return " ".join(self.argv)


def markdown_blocks(path: Path) -> list[Block]:
    rel, out = path.relative_to(REPO).as_posix(), []
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^(\s*)```\s*([\w-]*)\s*$", lines[i])
        if not opening:
            i += 1
            continue
        indent, lang, body = len(opening.group(1)), opening.group(2), []
        j = i + 1
        while j < len(lines) and not re.match(r"^\s*```\s*$", lines[j]):
            body.append((j + 1, lines[j][indent:]))
            j += 1
        if lang in ("bash", "python"):
            out.append(Block(f"{rel}:{i + 1}", lang, body, rel))
        i = j + 1
    return out


def header_blocks(path: Path) -> list[Block]:
    rel, out, block = path.relative_to(REPO).as_posix(), [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if n == 1 and line.startswith("#!"):
            continue
        if not line.startswith("#"):
            break
        example = re.match(r"^#\s{3,}(\S.*)$", line)
        if example:
            block.append((n, example.group(1)))
        elif block:
            out.append(Block(f"{rel}:{block[0][0]}", "bash", block, rel))
            block = []
    if block:
        out.append(Block(f"{rel}:{block[0][0]}", "bash", block, rel))
    return out


def experiment_blocks(path: Path) -> list[Block]:
    rel = path.relative_to(REPO).as_posix()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith("#") and not line.startswith("# @package"):
            return [Block(f"{rel}:{n}", "bash", [(n, line[1:].strip())], rel)]
    return []


def blocks() -> list[Block]:
    out = [b for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))] for b in markdown_blocks(p)]
    out += [b for p in sorted(q for q in (REPO / "launch").rglob("*") if q.is_file()) for b in header_blocks(p)]
    out += [b for p in sorted((REPO / "conf" / "experiment").glob("*.yaml")) for b in experiment_blocks(p)]
    return out


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    out, buf, start = [], "", None
    for n, line in lines:
        start = n if start is None else start
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        out.append((start, buf + line))
        buf, start = "", None
    return out


def commands(block: Block) -> list[Command]:
    """The block's commands, in order; `export` lines only set the environment of the ones after."""
    exports: dict[str, str] = {}
    out = []
    for n, line in logical_lines(block.lines):
        if line.strip() in ("", "..."):
            continue
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = list(lex)
        segments: list[list[str]] = [[]]
        for token in tokens:
            if token == "&&":
                segments.append([])
            elif re.fullmatch(r"[;&|<>()]+", token):
                raise ValueError(f"{block.source}:{n}: `{token}` is shell syntax tests/test_examples.py does not "
                                 f"run; write one command per line, or join commands with &&")
            else:
                segments[-1].append(token)
        for seg in filter(None, segments):
            if seg[0] == "export":
                exports.update(a.split("=", 1) for a in seg[1:])
                continue
            env = dict(exports)
            while seg and re.match(r"^[A-Za-z_]\w*=", seg[0]):
                key, value = seg.pop(0).split("=", 1)
                env[key] = value
            out.append(Command(f"{block.source}:{n}", seg, env))
    return out


def not_run_reason(cmd: Command) -> str | None:
    return next((reason for prefix, reason in NOT_RUN.items() if cmd.text.startswith(prefix)), None)


def runner_of(cmd: Command):
    program = cmd.argv[0]
    if program == "bash" and len(cmd.argv) > 1:
        program = cmd.argv[1]
    if program in MBERT_TOOLS:
        return run_tool
    if program == "torchrun":
        return run_torchrun
    if program in ("launch/torchrun_multinode.sh", "launch/torchrun_elastic.sh"):
        return run_two_nodes
    if program in LAUNCH_SCRIPTS:
        return run_launcher
    if program == "sbatch":
        return run_sbatch
    if program == "mkdir":
        return run_mkdir
    return None


ALL_BLOCKS = blocks()


def _parsed() -> tuple[list[tuple[Block, list[Command]]], list[str]]:
    parsed, problems = [], []
    for block in ALL_BLOCKS:
        try:
            parsed.append((block, commands(block) if block.lang == "bash" else []))
        except ValueError as exc:
            problems.append(str(exc))
    return parsed, problems


def test_every_command_is_run_or_listed():
    parsed, problems = _parsed()
    used = set()
    for _, cmds in parsed:
        for cmd in cmds:
            reason = not_run_reason(cmd)
            if reason:
                used.add(next(p for p in NOT_RUN if cmd.text.startswith(p)))
            elif runner_of(cmd) is None:
                problems.append(f"{cmd.where}: `{cmd.text}` is neither run by tests/test_examples.py (RUNNERS) nor "
                                f"listed in its NOT_RUN with a reason; make it runnable or list it")
    problems += [f"NOT_RUN entry {p!r} matches no documented command; remove it" for p in NOT_RUN if p not in used]
    assert not problems, "\n".join(problems)
    assert len(parsed) >= 20, "the extraction found suspiciously few blocks"


# ---- inputs the documentation assumes --------------------------------------------------------
def _text_docs(rng: random.Random, n_docs: int) -> str:
    words = [f"w{i}" for i in range(400)]
    docs = ["\n".join(" ".join(rng.choices(words, k=rng.randint(6, 20))).capitalize() + "."
                      for _ in range(rng.randint(3, 8))) for _ in range(n_docs)]
    return "\n\n".join(docs) + "\n"


def _tool(name: str):
    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == name]
    return ep.load()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, corpus_cache) -> Path:
    """What the documentation's commands read: raw text (`corpus/`, `valid.txt`, `shards/`), a
    prepared dataset (`/data/wiki`), a finished run with checkpoints at steps 10 and 20
    (`runs/my-run`), a MegatronBERT-345M (shrunk as the examples that train it are) with a
    30522-entry vocabulary in Hugging Face (`hf/megatron-bert-uncased-345m`) and Megatron-LM
    (`megatron/bert_345m`) form, a ModernBERT-base (shrunk too) with its byte-level BPE tokenizer as
    `save_pretrained` writes it (`hf/ModernBERT-base`), and a Megatron-LM indexed dataset with its
    vocabulary file."""
    import numpy as np
    import torch

    from mbert_train.convert.common import write_model_dir
    from mbert_train.model.config import ModelConfig
    from mbert_train.model.weights import full_shapes

    root = tmp_path_factory.mktemp("doc-inputs")
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for i in range(2):
        (root / "corpus" / f"part-{i}.txt").write_text(_text_docs(rng, 40))
    (root / "valid.txt").write_text(_text_docs(rng, 6))
    (root / "shards").mkdir()
    (root / "shards" / "part-0.jsonl").write_text(
        "".join(json.dumps({"body": d}) + "\n" for d in _text_docs(rng, 30).split("\n\n")))
    wiki = root / "root" / "data" / "wiki"
    wiki.parent.mkdir(parents=True)
    run_in_process(["mbert-prep", "corpus", "--output", str(wiki), "--vocab-size", "1000", "--quiet"], root, {})
    run_in_process(["mbert-train", f"run.dir={root / 'runs' / 'my-run'}", "trainer.max_steps=20",
                    "trainer.checkpoint_every=10", "trainer.eval_every=10", "trainer.eval_batches=1", "trainer.micro_batch_size=4",
                    "logging.wandb_mode=disabled", "logging.progress_bar=false", "data.num_workers=0"], root, {})

    vocab = (wiki / "vocab.txt").read_text().splitlines()
    taken = set(vocab)
    vocab += [t for t in (f"[unused{i}]" for i in range(40000)) if t not in taken][:30522 - len(vocab)]
    (root / "bert-large-uncased-vocab.txt").write_text("\n".join(vocab) + "\n")
    sizes = {k.split(".")[1]: int(v) for k, v in (a.split("=") for a in shrink("megatron-345m"))}
    cfg = ModelConfig(vocab_size=30522, num_heads=16, max_position_embeddings=512, layer_norm_eps=1e-5, **sizes)
    g = torch.Generator().manual_seed(0)
    full = {n: torch.randn(s, generator=g) * 0.02 for n, s in full_shapes(cfg).items()}
    write_model_dir(full, cfg, root / "model-345m", 1)
    hf = root / "hf" / "megatron-bert-uncased-345m"
    run_in_process(["mbert-convert", "to-hf", str(root / "model-345m"), str(hf)], root, {})
    shutil.copy(root / "bert-large-uncased-vocab.txt", hf / "vocab.txt")
    run_in_process(["mbert-convert", "to-megatron", str(root / "model-345m"), str(root / "megatron" / "bert_345m")],
                   root, {})
    from tests.tiny_modernbert import save_tiny_modernbert, texts

    sizes = {k.split(".")[1]: int(v) for k, v in (a.split("=") for a in shrink("modernbert-base"))}
    save_tiny_modernbert(root / "hf" / "ModernBERT-base", texts(40), num_heads=12, **sizes)

    with warnings.catch_warnings():  # megatron.core warns that Apex/Transformer Engine are absent
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    tokens = np.load(wiki / "tokens.npy")
    sentences, docs = np.load(wiki / "sentence_offsets.npy"), np.load(wiki / "doc_offsets.npy")
    prefix = root / "my-corpus_text_sentence"
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(len(vocab)))
    for d in range(len(docs) - 1):
        for s in range(docs[d], docs[d + 1]):
            builder.add_item(torch.tensor(tokens[sentences[s]:sentences[s + 1]].astype(np.int64)))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")
    return root


def workspace(inputs: Path, where: Path) -> Path:
    """A fresh working directory for one block: read-only inputs linked, `runs/my-run` copied (its
    commands resume and extend it), `launch/` linked for the scripts and `hydra.searchpath`."""
    where.mkdir(parents=True)
    for name in ("corpus", "valid.txt", "shards", "hf", "megatron", "bert-large-uncased-vocab.txt",
                 "my-corpus_text_sentence.bin", "my-corpus_text_sentence.idx"):
        (where / name).symlink_to(inputs / name)
    (where / "root" / "data").mkdir(parents=True)
    (where / "root" / "data" / "wiki").symlink_to(inputs / "root" / "data" / "wiki")
    shutil.copytree(inputs / "runs" / "my-run", where / "runs" / "my-run", symlinks=True)
    (where / "launch").symlink_to(REPO / "launch")
    return where


# ---- running ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _absolute(value: str, ws: Path) -> str:
    """`/data/...` and `/shared/...`, paths on a user's cluster, under the workspace's `root/`."""
    return re.sub(r"(^|[=,:])/(data|shared)/", lambda m: f"{m.group(1)}{ws}/root/{m.group(2)}/", value)


def _is_training(args: list[str]) -> bool:
    return not any(a in ("--cfg", "-c", "--help", "-h", "--info", "--hydra-help") for a in args)


def _preset(args: list[str]) -> str:
    """The model preset a command trains: `model=X`, else its experiment's, else the default."""
    for a in reversed(args):
        if a.startswith("model="):
            return a.split("=", 1)[1]
    for a in reversed(args):
        if re.match(r"\+?experiment=", a):
            text = (REPO / "conf" / "experiment" / f"{a.split('=', 1)[1]}.yaml").read_text()
            found = re.search(r"override /model: *(\S+)", text)
            if found:
                return found.group(1)
    return "tiny"


def shrink(preset: str) -> list[str]:
    if preset == "tiny":
        return []
    heads = int(re.search(r"num_heads: *(\d+)", (REPO / "conf" / "model" / f"{preset}.yaml").read_text()).group(1))
    return ["model.num_layers=1", f"model.hidden_size={8 * heads}", f"model.intermediate_size={32 * heads}"]


def _short(args: list[str]) -> list[str]:
    return [*SHORT, *shrink(_preset(args))]


def _with_overrides(args: list[str], extra: list[str]) -> list[str]:
    """Hydra takes its overrides before its flags (`--cfg job`): insert there."""
    at = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    return [*args[:at], *extra, *args[at:]]


@contextmanager
def _process_state(cwd: Path, env: dict[str, str]):
    from hydra.core.global_hydra import GlobalHydra

    saved_cwd, saved_env, saved_argv = os.getcwd(), dict(os.environ), list(sys.argv)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    for key in INHERITED:
        os.environ.pop(key, None)
    os.environ.update(env)
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        GlobalHydra.instance().clear()


def run_in_process(argv: list[str], cwd: Path, env: dict[str, str], *, capture: bool = False) -> str:
    """Run a console script's entry point here; its stdout returned with `capture`."""
    main, out = _tool(argv[0]), io.StringIO()
    with _process_state(cwd, env), (redirect_stdout(out) if capture else nullcontext()):
        sys.argv = list(argv)
        try:
            status = main()
        except SystemExit as exc:
            status = exc.code
    assert status in (0, None), f"`{shlex.join(argv)}` exited with {status}:\n{out.getvalue()[-3000:]}"
    return out.getvalue()


def run_tool(cmd: Command, ws: Path, n: int) -> None:
    argv = [_absolute(a, ws) for a in cmd.argv]
    env = {k: _absolute(v, ws) for k, v in cmd.env.items()}
    if argv[0] == "mbert-train":
        args = argv[1:]
        if "hydra/launcher=slurm" in args:  # a SLURM sweep: compose it (one point of it), submit nothing
            args = [a if a.startswith(("hydra.", "hydra/")) else a.split(",")[0] for a in args if a != "-m"]
            out = run_in_process([argv[0], *args, "--cfg", "hydra"], ws, env, capture=True)
            assert "submitit_launcher.SlurmLauncher" in out, f"the SLURM launcher was not composed:\n{out[-3000:]}"
            return
        elif _is_training(args):
            where = ([f"hydra.sweep.dir={ws}/multirun-{n}"] if "-m" in args or "--multirun" in args
                     else [] if any(a.startswith("run.dir=") for a in args) else [f"run.dir={ws}/runs/example-{n}"])
            args = _with_overrides(args, [*_short(args), *where])
        argv = [argv[0], *args]
    # The shell's globbing (`corpus/*.txt`), relative to the workspace.
    argv = [x for a in argv for x in ((sorted(glob(a, root_dir=ws)) or [a]) if "*" in a else [a])]
    if argv[0] == "mbert-prep" and "--num-proc" in argv and argv[argv.index("--num-proc") + 1] != "1":
        # Its worker pool forks: from this process, which holds threads (torch's, gloo's), a
        # fork may inherit a lock held mid-operation and crash, so it runs as users run it.
        _run_all([(argv, _subprocess_env(env, ws))], ws, f"prep-{n}")
        return
    run_in_process(argv, ws, env)


def _subprocess_env(env: dict[str, str], ws: Path) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items()
           if k not in INHERITED and not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))}
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out['PATH']}"
    out.update(WANDB_SILENT="true", PYTHONUNBUFFERED="1", MAX_RESTARTS="0")
    out.update({k: _absolute(v, ws) for k, v in env.items()})
    return out


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _run_all(procs: list[tuple[list[str], dict[str, str]]], ws: Path, what: str) -> str:
    """Start every process at once (the nodes of one job), wait for all; fail with their logs."""
    started = []
    for i, (argv, env) in enumerate(procs):
        log = ws / f"{what}-{i}.log"
        with open(log, "w") as out:
            started.append((subprocess.Popen(argv, env=env, cwd=ws, stdout=out, stderr=subprocess.STDOUT), log))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc, _ in started:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                for child in _descendants(proc.pid):
                    child.kill()
                proc.kill()
                proc.wait()
    texts = [log.read_text() for _, log in started]
    report = "\n".join(f"--- {log.name} (rc {p.returncode}):\n{t[-4000:]}" for (p, log), t in zip(started, texts))
    assert all(p.returncode == 0 for p, _ in started), report
    return "\n".join(texts)


def run_torchrun(cmd: Command, ws: Path, n: int) -> None:
    argv = [_absolute(a, ws) for a in cmd.argv]
    i = argv.index("-m")  # torchrun [options] -m mbert_train.train OVERRIDES
    options = argv[1:i]
    for j, a in enumerate(options):
        if a.startswith(("--nproc_per_node", "--nproc-per-node")):
            if "=" in a:
                options[j] = a.split("=")[0] + "=2"
            else:
                options[j + 1] = "2"
    overrides = argv[i + 2:]
    where = [] if any(a.startswith("run.dir=") for a in overrides) else [f"run.dir={ws}/runs/example-{n}"]
    full = ["torchrun", f"--master_port={_free_port()}", *options, "-m", argv[i + 1],
            *overrides, *_short(overrides), *where]
    _run_all([(full, _subprocess_env(cmd.env, ws))], ws, f"torchrun-{n}")


def _script_call(cmd: Command, ws: Path) -> tuple[list[str], list[str]]:
    argv = [_absolute(a, ws) for a in cmd.argv]
    if argv[0] == "bash":
        argv = argv[1:]
    return [str(REPO / argv[0])], argv[1:]


def run_launcher(cmd: Command, ws: Path, n: int) -> None:
    script, args = _script_call(cmd, ws)
    env = _subprocess_env(cmd.env, ws) | {"NPROC_PER_NODE": "2", "MASTER_PORT": str(_free_port())}
    if script[0].endswith("deepspeed_launch.sh"):
        (ws / "hostfile").write_text("localhost slots=2\n")
        env["HOSTFILE"] = str(ws / "hostfile")
    _run_all([([*script, *args, *_short(args)], env)], ws, f"launch-{n}")


def run_two_nodes(cmd: Command, ws: Path, n: int) -> None:
    script, args = _script_call(cmd, ws)
    env = _subprocess_env(cmd.env, ws) | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
                                          "NPROC_PER_NODE": "1", "RDZV_ID": uuid.uuid4().hex,
                                          "RDZV_CONF": "last_call_timeout=1"}
    if ":" not in env.get("NNODES", ""):
        env["NNODES"] = "2"
    env.setdefault("RUN_DIR", str(ws / "runs" / f"two-nodes-{n}"))
    _run_all([([*script, *args, *_short(args)], env | {"NODE_RANK": str(node)}) for node in range(2)], ws,
             f"node-{n}")


_FAKE_SRUN = """#!{python}
# srun --ntasks-per-node=1 ... CMD: CMD once per node, with that node's SLURM_NODEID; signals forwarded.
import os, signal, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
procs = [subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node),
                                         SLURM_LOCALID="0"))
         for node in range(int(os.environ["SLURM_NNODES"]))]
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda s, f: [p.send_signal(s) for p in procs])
sys.exit(max(p.wait() for p in procs))
"""
_FAKE_SCONTROL = """#!/bin/bash
case "$1 ${2:-}" in
    "show hostnames") echo 127.0.0.1; echo 127.0.0.1 ;;
    *) echo "emulated scontrol: $*" >&2; exit 1 ;;
esac
"""


def run_sbatch(cmd: Command, ws: Path, n: int) -> None:
    argv = [_absolute(a, ws) for a in cmd.argv]
    i = next(j for j, a in enumerate(argv) if not a.startswith("-") and j > 0)
    script, args = argv[i], argv[i + 1:]
    fake = ws / "fake-slurm"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text(_FAKE_SRUN.format(python=sys.executable))
    (fake / "scontrol").write_text(_FAKE_SCONTROL)
    for tool in ("srun", "scontrol"):
        (fake / tool).chmod(0o755)
    env = _subprocess_env(cmd.env, ws)
    env.update(PATH=f"{fake}{os.pathsep}{env['PATH']}", SLURM_JOB_ID=str(random.randrange(10**6)),
               SLURM_NNODES="2", SLURM_JOB_NODELIST="127.0.0.1", SLURM_SUBMIT_DIR=str(ws), SLURM_GPUS_ON_NODE="1",
               MASTER_PORT=str(_free_port()))
    _run_all([(["bash", str(REPO / script), *args, *_short(args)], env)], ws, f"sbatch-{n}")


def run_mkdir(cmd: Command, ws: Path, n: int) -> None:
    _run_all([([_absolute(a, ws) for a in cmd.argv], _subprocess_env(cmd.env, ws))], ws, f"mkdir-{n}")


def run_python(block: Block, ws: Path, n: int) -> None:
    code = "\n".join(line for _, line in block.lines)
    _run_all([([sys.executable, "-c", code], _subprocess_env({}, ws))], ws, f"python-{n}")


_DONE: set = set()


def _launch_key(cmd: Command):
    """What makes two commands the same run; None for those that must run wherever they appear."""
    runner = runner_of(cmd)
    if runner in (None, run_mkdir) or runner is run_tool and (
            cmd.argv[0] != "mbert-train" or any(a.startswith("run.dir=") for a in cmd.argv)):
        return None
    return tuple(cmd.argv), tuple(sorted((k, v) for k, v in cmd.env.items() if k not in EMULATED))


def _covered_by_sbatch() -> set:
    """The emulated `sbatch launch/slurm.sbatch ARGS` runs `launch/torchrun_multinode.sh ARGS` on
    two local nodes: the same multi-node command elsewhere need not run again."""
    keys = set()
    for _, cmds in _parsed()[0]:
        for cmd in cmds:
            if runner_of(cmd) is run_sbatch:
                i = next(j for j, a in enumerate(cmd.argv) if j > 0 and not a.startswith("-"))
                keys.add(_launch_key(Command(cmd.where, ["launch/torchrun_multinode.sh", *cmd.argv[i + 1:]], cmd.env)))
    return keys


COVERED = _covered_by_sbatch()
RUNNABLE = [b for b, cmds in _parsed()[0]
            if b.lang == "python" or any(runner_of(c) and not not_run_reason(c) for c in cmds)]


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.where for b in RUNNABLE])
def test_example(block, inputs, tmp_path, capfd):
    ws = workspace(inputs, tmp_path / "ws")
    if block.lang == "python":
        run_python(block, ws, 0)
        return
    for n, cmd in enumerate(commands(block)):
        if not_run_reason(cmd):
            continue
        key = _launch_key(cmd)
        if key is not None and (key in _DONE or key in COVERED):
            continue
        failure = None
        try:
            runner_of(cmd)(cmd, ws, n)
        except AssertionError as exc:
            failure = str(exc)
        if failure is not None:
            captured = capfd.readouterr()
            pytest.fail(f"{cmd.where}: `{cmd.text}` failed:\n{failure}\n{captured.out[-3000:]}\n{captured.err[-3000:]}",
                        pytrace=False)
        if key is not None:
            _DONE.add(key)
        capfd.readouterr()
