"""mbert-convert from-megatron / to-megatron against the referee, the `convert_megatron_bert_checkpoint.py`
that transformers shipped in its 4.x releases (it reads TP=1 sources only; a TP=2 source is merged for it
here from Megatron-LM's definition of the per-rank layout). Synthetic checkpoints are built from that
definition: per-head Q, K, V tensors stacked per checkpoint_version and cut per TP rank. The referee
comes from the package index (pip download, once); the tests that use it skip without the index."""

import argparse
import enum
import importlib.util
import os
import random
import shutil
import socket
import subprocess
import sys
import urllib.request
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import MegatronBertConfig

from mbert_train.arithmetic import padded_vocab_size
from mbert_train.convert import main
from mbert_train.convert.common import load_model_dir, write_model_dir
from mbert_train.model.config import ModelConfig
from mbert_train.model.weights import full_shapes
from tests.train_util import run_python

REFEREE_VERSION = "4.46.3"
REFEREE_MEMBER = "transformers/models/megatron_bert/convert_megatron_bert_checkpoint.py"
CACHE = Path.home() / ".cache" / "mbert-train-tests"
H, HEADS, LAYERS, FFN, POS, PADDED = 32, 4, 2, 64, 24, 256  # 256: padded for TP=2 (128 x 2)
HN = H // HEADS


def index_unreachable(timeout_s: float = 5.0) -> str | None:
    """Why pip's package index cannot be reached (a TCP connect to it, or to the proxy pip would
    use), or None when it can: only then may a failed download count as a failure."""
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                            timeout=60).stdout
    settings = dict(line.split("=", 1) for line in listed.splitlines() if "=" in line)
    url = next((settings[k].strip("'\"") for k in (":env:.index-url", "download.index-url", "global.index-url")
                if k in settings), "https://pypi.org/simple")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return None  # a local index
    proxy = None if urllib.request.proxy_bypass(parts.hostname) else urllib.request.getproxies().get(parts.scheme)
    address = urlsplit(proxy) if proxy else parts
    port = address.port or (443 if address.scheme == "https" else 80)
    try:
        socket.create_connection((address.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        return f"{address.hostname}:{port} ({'the proxy for ' if proxy else ''}{url}) cannot be reached: {exc}"
    return None


@pytest.fixture(scope="session")
def referee():
    """`convert_megatron_checkpoint` of transformers 4.x, extracted from its wheel. Needs the package
    index once: the wheel is downloaded with pip into ~/.cache/mbert-train-tests (only that one
    pure-Python script is used). Skipped when the index cannot be reached; any other failure fails."""
    script = CACHE / f"transformers-{REFEREE_VERSION}" / "convert_megatron_bert_checkpoint.py"
    if not script.is_file():
        wheels = CACHE / "wheels"
        wheel = wheels / f"transformers-{REFEREE_VERSION}-py3-none-any.whl"
        if not wheel.is_file():
            offline = index_unreachable()
            if offline:
                pytest.skip(f"needs the package index to download the referee transformers=={REFEREE_VERSION} "
                            f"(or {wheel.name} put into {wheels} by hand): {offline}")
            proc = subprocess.run([sys.executable, "-m", "pip", "download", f"transformers=={REFEREE_VERSION}",
                                   "--no-deps", "--only-binary", ":all:", "-d", str(wheels)],
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode or not wheel.is_file():
                pytest.fail(f"cannot obtain the referee (pip download transformers=={REFEREE_VERSION} failed: "
                            f"{(proc.stderr or proc.stdout).strip().splitlines()[-1:]}); put {wheel.name} into "
                            f"{wheels} by hand")
        script.parent.mkdir(parents=True, exist_ok=True)
        tmp = script.with_suffix(f".tmp{os.getpid()}")
        with zipfile.ZipFile(wheel) as zf:
            tmp.write_bytes(zf.read(REFEREE_MEMBER))
        os.replace(tmp, script)
    spec = importlib.util.spec_from_file_location("referee_convert_megatron_bert", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.convert_megatron_checkpoint


# ---- synthetic Megatron checkpoints, from Megatron-LM's definition --------------------------

def canonical(seed: int, *, binary_head: bool = True, hidden: int = H, padded: int = PADDED) -> dict:
    """A Megatron BERT's weights in whole-model form; Q, K, V as (heads, hn, ...) per head."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)
    heads, hn = hidden // HN, HN
    w = {"word": r(padded, hidden), "pos": r(POS, hidden), "type": r(2, hidden), "final_ln": (r(hidden), r(hidden)),
         "lm_dense": (r(hidden, hidden), r(hidden)), "lm_ln": (r(hidden), r(hidden)), "lm_bias": r(padded)}
    if binary_head:
        w["pooler"], w["binary"] = (r(hidden, hidden), r(hidden)), (r(2, hidden), r(2))
    w["layers"] = [{"ln1": (r(hidden), r(hidden)), "ln2": (r(hidden), r(hidden)),
                    "q": (r(heads, hn, hidden), r(heads, hn)), "k": (r(heads, hn, hidden), r(heads, hn)),
                    "v": (r(heads, hn, hidden), r(heads, hn)), "dense": (r(hidden, hidden), r(hidden)),
                    "fc1": (r(FFN, hidden), r(FFN)), "fc2": (r(hidden, FFN), r(hidden))} for _ in range(LAYERS)]
    return w


def fused_qkv(layer: dict, version: float, tp: int, rank: int, kind: int) -> torch.Tensor:
    """Rank `rank`'s query_key_value weight (kind 0) or bias (kind 1), laid out as `version` stores it:
    0: [3, np, hn], 1.0: [np, hn, 3], 2.0/3.0: [np, 3, hn] over the rank's np heads."""
    q, k, v = (layer[n][kind] for n in "qkv")
    heads = q.shape[0] // tp
    q, k, v = (t[rank * heads:(rank + 1) * heads] for t in (q, k, v))
    dim = {0: 0, 1.0: 2}.get(version, 1)
    stacked = torch.stack([q, k, v], dim=dim)
    return stacked.reshape(-1, *stacked.shape[3:])


def megatron_state(w: dict, version: float, tp: int, rank: int, *, args: bool = True, newest_names: bool = False
                   ) -> dict:
    """Rank `rank`'s model_optim_rng.pt content (vocab and column-parallel rows, row-parallel columns cut)."""
    def cut(t, dim):
        return t.chunk(tp, dim=dim)[rank].clone()
    norm = "norm" if newest_names else "layernorm"
    attn = "self_attention" if newest_names or version >= 2.0 else "attention"
    enc = {}
    for i, layer in enumerate(w["layers"]):
        p = f"layers.{i}."
        enc[p + ("input_norm" if newest_names else "input_layernorm") + ".weight"] = layer["ln1"][0]
        enc[p + ("input_norm" if newest_names else "input_layernorm") + ".bias"] = layer["ln1"][1]
        enc[p + f"{attn}.query_key_value.weight"] = fused_qkv(layer, version, tp, rank, 0)
        enc[p + f"{attn}.query_key_value.bias"] = fused_qkv(layer, version, tp, rank, 1)
        enc[p + f"{attn}.dense.weight"] = cut(layer["dense"][0], 1)
        enc[p + f"{attn}.dense.bias"] = layer["dense"][1]
        ln2 = "post_attention_norm" if newest_names else "post_attention_layernorm"
        enc[p + f"{ln2}.weight"], enc[p + f"{ln2}.bias"] = layer["ln2"]
        enc[p + "mlp.dense_h_to_4h.weight"] = cut(layer["fc1"][0], 0)
        enc[p + "mlp.dense_h_to_4h.bias"] = cut(layer["fc1"][1], 0)
        enc[p + "mlp.dense_4h_to_h.weight"] = cut(layer["fc2"][0], 1)
        enc[p + "mlp.dense_4h_to_h.bias"] = layer["fc2"][1]
    final = "final_norm" if newest_names else "final_layernorm"
    enc[f"{final}.weight"], enc[f"{final}.bias"] = w["final_ln"]
    lm = {"embedding": {"word_embeddings": {"weight": cut(w["word"], 0)}, "position_embeddings": {"weight": w["pos"]},
                        "tokentype_embeddings": {"weight": w["type"]}},
          "encoder" if version >= 2.0 else "transformer": enc}
    model = {"language_model": lm,
             "lm_head": {"bias": cut(w["lm_bias"], 0), "dense.weight": w["lm_dense"][0], "dense.bias": w["lm_dense"][1],
                         f"{norm}.weight": w["lm_ln"][0], f"{norm}.bias": w["lm_ln"][1]}}
    if "binary" in w:
        lm["pooler"] = {"dense.weight": w["pooler"][0], "dense.bias": w["pooler"][1]}
        model["binary_head"] = {"weight": w["binary"][0], "bias": w["binary"][1]}
    state = {"model": model, "iteration": 7}
    if version:
        state["checkpoint_version"] = version
    if args:
        hidden = w["word"].shape[1]
        tp_key = "tensor_model_parallel_size" if version >= 3.0 else "model_parallel_size"
        state["args"] = argparse.Namespace(
            num_layers=LAYERS, hidden_size=hidden, ffn_hidden_size=FFN, num_attention_heads=hidden // HN,
            max_position_embeddings=POS, padded_vocab_size=w["word"].shape[0], tokenizer_type="BertWordPieceLowerCase",
            make_vocab_size_divisible_by=128, **{tp_key: tp})
    return state


def write_megatron(root: Path, w: dict, version: float, tp: int, *, iteration: int | None = 7, zip_format=True,
                   **kwargs) -> Path:
    """DIR/latest_checkpointed_iteration.txt + iter_0000007 (or release)/mp_rank_XX/model_optim_rng.pt;
    `zip_format=False`: torch's pre-1.6 serialization, which checkpoints published in 2019-2020 may use."""
    sub = "release" if iteration is None else f"iter_{iteration:07d}"
    for rank in range(tp):
        (root / sub / f"mp_rank_{rank:02d}").mkdir(parents=True)
        torch.save(megatron_state(w, version, tp, rank, **kwargs), root / sub / f"mp_rank_{rank:02d}" /
                   "model_optim_rng.pt", _use_new_zipfile_serialization=zip_format)
    (root / "latest_checkpointed_iteration.txt").write_text("release" if iteration is None else str(iteration))
    return root


def convert(*argv) -> None:
    assert main([str(a) for a in argv]) == 0


def ours_via_hf(src: Path, tmp_path: Path, *extra) -> dict[str, torch.Tensor]:
    convert("from-megatron", src, tmp_path / "ours", "--tp", 2, *extra)
    convert("to-hf", tmp_path / "ours", tmp_path / "hf")
    return load_file(str(tmp_path / "hf" / "model.safetensors"))


def assert_same_as_referee(ours: dict, ref: dict) -> None:
    decoder = ref.pop("cls.predictions.decoder.weight")  # HF ties it; our export omits the tied copy
    assert torch.equal(decoder, ours["bert.embeddings.word_embeddings.weight"])
    assert sorted(ours) == sorted(ref)
    for name, tensor in ref.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


# ---- from-megatron against the referee ------------------------------------------------------

@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("version", [0, 1.0, 2.0, 3.0])
def test_from_megatron_matches_referee(referee, tmp_path, version, tp):
    w = canonical(seed=int(version * 10) + tp)
    src = write_megatron(tmp_path / "megatron", w, version, tp)
    ours = ours_via_hf(src, tmp_path)
    # The referee reads a TP=1 state only: the same weights merged per Megatron's definition.
    ref = referee(None, megatron_state(w, version, 1, 0), MegatronBertConfig())
    assert_same_as_referee(ours, ref)
    cfg = load_model_dir(tmp_path / "ours")[1]
    assert (cfg.vocab_size, cfg.num_heads, cfg.layer_norm_eps, cfg.binary_head) == (PADDED, HEADS, 1e-5, True)


def test_published_345m_layout_matches_referee(referee, tmp_path, capsys):
    """NVIDIA's MegatronBERT 345M release: release/mp_rank_00 only, no args, no checkpoint_version
    (so 0), 'transformer' and 'attention' names; num_heads defaults to hidden_size/64."""
    hidden = 128
    w = canonical(seed=5, hidden=hidden, padded=384)
    src = write_megatron(tmp_path / "megatron", w, 0, 1, iteration=None, args=False, zip_format=False)
    (src / "latest_checkpointed_iteration.txt").unlink()  # the published zip holds release/ only
    ours = ours_via_hf(src, tmp_path)
    assert "assuming num_heads=2" in capsys.readouterr().err
    config = MegatronBertConfig(vocab_size=384, hidden_size=hidden, num_hidden_layers=LAYERS, num_attention_heads=2,
                                intermediate_size=FFN, max_position_embeddings=POS)
    assert_same_as_referee(ours, referee(None, megatron_state(w, 0, 1, 0, args=False), config))


@pytest.mark.parametrize("version", [0, 3.0])
def test_newest_legacy_names_read_the_same(tmp_path, version):
    """Later legacy Megatron saves 'input_norm'/'final_norm'/lm_head 'norm' and 'self_attention';
    both namings give the same model."""
    w = canonical(seed=11)
    convert("from-megatron", write_megatron(tmp_path / "a", w, version, 2), tmp_path / "oa")
    convert("from-megatron", write_megatron(tmp_path / "b", w, version, 2, newest_names=True), tmp_path / "ob")
    a, b = load_model_dir(tmp_path / "oa")[0], load_model_dir(tmp_path / "ob")[0]
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.parametrize("tp", [1, 2])
def test_no_binary_head_and_vocab_trim(tmp_path, tp):
    """Without binary head (and pooler) -> the MLM-only model; --vocab-size keeps the first rows."""
    w = canonical(seed=3, binary_head=False)
    src = write_megatron(tmp_path / "megatron", w, 3.0, tp)
    convert("from-megatron", src, tmp_path / "ours", "--vocab-size", 100)
    full, cfg = load_model_dir(tmp_path / "ours")
    assert not cfg.binary_head and cfg.vocab_size == 100 and "pooler.weight" not in full and "nsp.weight" not in full
    assert torch.equal(full["word_embeddings.weight"], w["word"][:100])
    assert torch.equal(full["mlm_bias"], w["lm_bias"][:100])
    layer = w["layers"][1]
    qkv = torch.cat([layer[n][0].reshape(H, H) for n in "qkv"])  # [Q; K; V], rows by head
    assert torch.equal(full["layers.1.attn.qkv.weight"], qkv)
    assert torch.equal(full["layers.1.mlp.fc2.weight"], layer["fc2"][0])


class AttnBackend(enum.Enum):  # pickled as megatron.core.transformer.enums.AttnBackend, as recent args hold
    auto = 5


def test_training_checkpoint_with_rng_state_and_enums_loads(tmp_path, monkeypatch):
    """A training checkpoint also pickles numpy RNG state and megatron enums in args; those load
    (enums as inert placeholders, Megatron is never imported)."""
    module = type(sys)("megatron.core.transformer.enums")
    module.AttnBackend = AttnBackend
    monkeypatch.setattr(AttnBackend, "__module__", module.__name__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    w = canonical(seed=4)
    path = tmp_path / "megatron" / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    path.parent.mkdir(parents=True)
    state = megatron_state(w, 3.0, 1, 0)
    state["args"].attention_backend = AttnBackend.auto
    state.update(np_rng_state=np.random.get_state(), random_rng_state=random.getstate(),
                 torch_rng_state=torch.get_rng_state(), optimizer={"state": {0: {"exp_avg": torch.zeros(3)}}})
    torch.save(state, path)
    monkeypatch.delitem(sys.modules, module.__name__)
    convert("from-megatron", path, tmp_path / "ours")
    assert torch.equal(load_model_dir(tmp_path / "ours")[0]["position_embeddings.weight"], w["pos"])


# ---- to-megatron ----------------------------------------------------------------------------

def random_model_dir(path: Path, *, binary_head: bool, tp: int) -> tuple[dict, ModelConfig]:
    cfg = ModelConfig(vocab_size=100, hidden_size=H, num_layers=LAYERS, num_heads=HEADS, intermediate_size=FFN,
                      max_position_embeddings=POS, layer_norm_eps=1e-12, hidden_dropout=0.05, binary_head=binary_head)
    g = torch.Generator().manual_seed(tp)
    full = {n: torch.randn(s, generator=g) for n, s in full_shapes(cfg).items()}
    write_model_dir(full, cfg, path, tp)
    return full, cfg


@pytest.mark.parametrize("binary_head", [True, False])
@pytest.mark.parametrize("tp", [1, 2])
def test_round_trip_exact(tmp_path, tp, binary_head):
    full, cfg = random_model_dir(tmp_path / "model", binary_head=binary_head, tp=3 - tp)
    convert("to-megatron", tmp_path / "model", tmp_path / "megatron", "--tp", tp)
    assert (tmp_path / "megatron" / "latest_checkpointed_iteration.txt").read_text().strip() == "release"
    assert sorted(p.name for p in (tmp_path / "megatron" / "release").iterdir()) == \
        [f"mp_rank_{r:02d}" for r in range(tp)]
    convert("from-megatron", tmp_path / "megatron", tmp_path / "back", "--tp", 1)
    back, cfg_back = load_model_dir(tmp_path / "back")
    assert cfg_back == cfg
    assert back.keys() == full.keys() and all(torch.equal(back[k], full[k]) for k in full)
    convert("to-megatron", tmp_path / "back", tmp_path / "megatron", "--tp", tp, "--overwrite")


def test_to_megatron_is_read_by_referee(referee, tmp_path):
    """The referee reads our TP=1 output into the tensors our own HF export has (plus zero vocabulary padding)."""
    full, cfg = random_model_dir(tmp_path / "model", binary_head=True, tp=2)
    convert("to-megatron", tmp_path / "model", tmp_path / "megatron", "--tp", 1)
    state = torch.load(tmp_path / "megatron" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=False)
    assert state["checkpoint_version"] == 3.0 and state["args"].padded_vocab_size == padded_vocab_size(100, 1)
    ref = referee(None, state, MegatronBertConfig())
    convert("to-hf", tmp_path / "model", tmp_path / "hf")
    ours = load_file(str(tmp_path / "hf" / "model.safetensors"))
    for name in ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight", "cls.predictions.bias"):
        assert not ref[name][100:].any()
        ref[name] = ref[name][:100]
    assert_same_as_referee(ours, ref)


# ---- bad input: one line naming the file, nothing executed ----------------------------------

class Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def run_cli(*argv) -> subprocess.CompletedProcess:
    """`python -m mbert_train.convert ARGV` on a forked preloaded interpreter (tests/train_util.py)."""
    return run_python("mbert_train.convert", list(argv), timeout=120)


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_refused_without_executing(tmp_path, capsys, zip_format):
    marker = tmp_path / "pwned"
    src = write_megatron(tmp_path / "megatron", canonical(seed=1), 3.0, 1)
    shard = src / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(shard, weights_only=False)
    state["args"].hook = Evil(marker)
    torch.save(state, shard, _use_new_zipfile_serialization=zip_format)
    if zip_format:  # the CLI once; the pre-1.6 format in-process
        proc = run_cli("from-megatron", src, tmp_path / "out")
        code, err = proc.returncode, proc.stderr
    else:
        code, err = main(["from-megatron", str(src), str(tmp_path / "out")]), capsys.readouterr().err
    assert code == 2 and not marker.exists(), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(shard) in err and "system" in err and "allow-list" in err
    assert not (tmp_path / "out").exists()


def _mismatched(root: Path) -> str:
    write_megatron(root, canonical(seed=1), 3.0, 2)
    os.rename(root / "iter_0000007" / "mp_rank_01", root / "iter_0000007" / "mp_rank_02")
    return "mp_rank_01 is missing"


def _other_model(root: Path) -> str:
    write_megatron(root, canonical(seed=1), 3.0, 2)
    other = megatron_state(canonical(seed=2, hidden=2 * H), 3.0, 2, 1)
    other["args"].hidden_size = H
    torch.save(other, root / "iter_0000007" / "mp_rank_01" / "model_optim_rng.pt")
    return "do not fit together"


def _version(root: Path) -> str:
    write_megatron(root, canonical(seed=1), 4.0, 1)
    return "checkpoint_version=4.0 is unknown"


def _tp_args(root: Path) -> str:
    write_megatron(root, canonical(seed=1), 3.0, 2)
    (root / "iter_0000007" / "mp_rank_01" / "model_optim_rng.pt").unlink()
    (root / "iter_0000007" / "mp_rank_01").rmdir()
    return "args say tensor-parallel size 2 but 1 shard(s)"


def _tracker(root: Path) -> str:
    write_megatron(root, canonical(seed=1), 3.0, 1)
    (root / "latest_checkpointed_iteration.txt").write_text("9")
    return "names iter_0000009"


def _not_megatron(root: Path) -> str:
    (root / "release" / "mp_rank_00").mkdir(parents=True)
    torch.save({"weights": torch.zeros(2)}, root / "release" / "mp_rank_00" / "model_optim_rng.pt")
    return "has no 'model' entry"


def _truncated(root: Path) -> str:
    write_megatron(root, canonical(seed=1), 3.0, 1, iteration=None)
    shard = root / "release" / "mp_rank_00" / "model_optim_rng.pt"
    shard.write_bytes(shard.read_bytes()[:200])
    return "is truncated or not a torch checkpoint"


@pytest.mark.parametrize("make", [_mismatched, _other_model, _version, _tp_args, _tracker, _not_megatron, _truncated])
def test_bad_megatron_input_one_line(tmp_path, capsys, make):
    root = tmp_path / "megatron"
    root.mkdir()
    expected = make(root)
    assert main(["from-megatron", str(root), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and expected in err and str(root) in err, err
    assert not (tmp_path / "out").exists()


def test_missing_source_and_bad_tp(tmp_path, capsys):
    assert main(["from-megatron", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
    random_model_dir(tmp_path / "model", binary_head=True, tp=1)
    assert main(["to-megatron", str(tmp_path / "model"), str(tmp_path / "out"), "--tp", "3"]) == 2
    assert "--tp 3 does not fit" in capsys.readouterr().err


# ---- shards of different models --------------------------------------------------------------

def error_line(capsys, *argv) -> str:
    assert main([str(a) for a in argv]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    return err


def test_megatron_shards_of_different_models_are_refused(tmp_path, capsys):
    """Same shapes, another model's mp_rank_01: its replicated tensors differ from mp_rank_00's."""
    write_megatron(tmp_path / "a", canonical(0), 3.0, 2)
    write_megatron(tmp_path / "b", canonical(1), 3.0, 2)
    shard = Path("iter_0000007") / "mp_rank_01" / "model_optim_rng.pt"
    shutil.copy(tmp_path / "b" / shard, tmp_path / "a" / shard)
    err = error_line(capsys, "from-megatron", tmp_path / "a", tmp_path / "out")
    assert "differs between" in err and "mp_rank_00" in err and "mp_rank_01" in err and "different models" in err
    assert not (tmp_path / "out").exists()


def test_our_shards_of_different_models_are_refused(tmp_path, capsys):
    random_model_dir(tmp_path / "a", binary_head=True, tp=2)
    cfg = ModelConfig(vocab_size=100, hidden_size=H, num_layers=LAYERS, num_heads=HEADS, intermediate_size=FFN,
                      max_position_embeddings=POS, layer_norm_eps=1e-12, hidden_dropout=0.05)
    g = torch.Generator().manual_seed(99)
    write_model_dir({n: torch.randn(s, generator=g) for n, s in full_shapes(cfg).items()}, cfg, tmp_path / "b", 2)
    shard = "model_tp01-of-02.safetensors"
    shutil.copy(tmp_path / "b" / shard, tmp_path / "a" / shard)
    for command in ("to-hf", "to-megatron"):
        err = error_line(capsys, command, tmp_path / "a", tmp_path / command)
        assert "differs between model_tp00-of-02.safetensors and model_tp01-of-02.safetensors" in err, err
        assert not (tmp_path / command).exists()


def test_vocab_size_below_the_recorded_one_is_said(tmp_path, capsys):
    src = write_megatron(tmp_path / "megatron", canonical(seed=4), 3.0, 1)
    shard = src / "iter_0000007" / "mp_rank_00" / "model_optim_rng.pt"
    state = torch.load(shard, weights_only=False)
    state["args"].vocab_size = 120  # what Megatron records: the tokenizer's size before padding
    torch.save(state, shard)
    convert("from-megatron", src, tmp_path / "all")
    assert load_model_dir(tmp_path / "all")[1].vocab_size == 120 and "note" not in capsys.readouterr().err
    convert("from-megatron", src, tmp_path / "cut", "--vocab-size", 100)
    err = capsys.readouterr().err.strip()
    assert err == ("mbert-convert: note: --vocab-size 100 keeps the first 100 of the 120 vocabulary rows the "
                   "checkpoint records (args.vocab_size); the other 20 are dropped"), err
    assert load_model_dir(tmp_path / "cut")[1].vocab_size == 100
