"""What the test forkserver (tests/dist.py) imports once, so that each forked rank or CLI run
starts without 5-6 s of imports; and one plot drawn, so that matplotlib's font and mathtext
tables (1-2 s) are built here once rather than at the end of every training run."""

import importlib
import os
import tempfile
from pathlib import Path

MODULES = ["torch.distributed", "torch._dynamo",  # the first optimizer imports dynamo
           "torch._inductor.compile_fx",  # DeepSpeed's ZeRO optimizer check imports a torch.compile'd module
           "transformers.models.megatron_bert.modeling_megatron_bert", "hydra._internal.utils",
           "hydra._internal.config_loader_impl", "hydra.core.override_parser.overrides_parser", "matplotlib.pyplot",
           "mbert_train.train", "mbert_train.trainer", "mbert_train.engine", "mbert_train.data", "mbert_train.model",
           "mbert_train.convert", "mbert_train.plot", "data_prep.prep", "tests.dist",
           "tests.train_util"]


def _draw_once() -> None:
    from mbert_train.plot import plot_curves

    records = [{"step": s, "loss": 10.0 / s, "mlm_loss": 9.0 / s, "nsp_loss": 0.7, "lr": 1e-3 * s,
                "grad_norm": 2.0 / s, "tokens_per_s": 1000.0 * s} for s in (1, 2, 3)]
    records.append({"step": 3, "eval_mlm_loss": 3.0})
    fd, name = tempfile.mkstemp(suffix=".png")
    os.close(fd)
    try:
        plot_curves(records, Path(name), title="warm-up")
    finally:
        os.unlink(name)


for _name in MODULES:
    importlib.import_module(_name)
_draw_once()
