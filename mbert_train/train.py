"""`mbert-train`: Hydra entry point. Composes `conf/`, converts it once into dataclasses, builds
the layout, data, model and DeepSpeed engine, then trains (resuming from RUN_DIR if possible).

    mbert-train                                     # tiny model, embedded corpus, 1 CPU process
    torchrun --nproc_per_node 2 -m mbert_train.train parallel.tensor_parallel=2
"""

from __future__ import annotations

import logging
import os
import random
import sys
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from mbert_train.config import CONF_DIR, TrainConfig, register_schema, to_train_config

log = logging.getLogger("mbert_train")


def strip_launcher_args(argv: list[str]) -> list[str]:
    """The deepspeed launcher appends `--local_rank=N`, which Hydra would reject as an override."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            out.append(arg)
    return out


def _quiet_libraries(rank: int) -> None:
    os.environ.setdefault("WANDB_SILENT", "true")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    warnings.filterwarnings("ignore", message=".*torch.utils.checkpoint.*")


def _shared_run_dir(candidate: str) -> Path:
    """Rank 0's run dir for every rank (ranks may start a second apart and name dirs by time)."""
    box = [candidate]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return Path(box[0]).resolve()


def _dataset_dir(cfg: TrainConfig, rank: int) -> str:
    from mbert_train.data import prepare_default_corpus

    if cfg.data.path is not None:
        if not Path(cfg.data.path, "metadata.json").is_file():
            raise FileNotFoundError(f"data.path={cfg.data.path} is not a dataset written by mbert-prep "
                                    f"(no metadata.json); run `mbert-prep` on your text first")
        return cfg.data.path
    if rank == 0:  # build the embedded corpus once; the others then find it cached
        path = prepare_default_corpus(cfg.data)
    dist.barrier()
    return path if rank == 0 else prepare_default_corpus(cfg.data)


def _check_same_tokenizer(digest: str | None, dataset_dir: str) -> None:
    """Nodes without a shared file system build the embedded corpus each on their own, and
    WordPiece training may break ties differently: refuse rather than train on mixed vocabs."""
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) > 1:
        raise ValueError(f"ranks see different tokenizers in {dataset_dir}; put the dataset (or MBERT_CACHE "
                         f"for the embedded corpus) on a file system all nodes share, or use data.path")


def run(cfg: TrainConfig, run_dir_candidate: str) -> Path:
    from mbert_train.data import build_loaders, check_vocab, open_dataset
    from mbert_train.engine import build_engine
    from mbert_train.metrics import MetricsLogger, redact
    from mbert_train.model import MegatronBert
    from mbert_train.parallel.layout import init_parallel
    from mbert_train.parallel.random import seed_for_training, training_seed
    from mbert_train.trainer import Trainer

    state = init_parallel(cfg.parallel.tensor_parallel, timeout_s=cfg.parallel.timeout_s)
    state.dims.check_model(cfg.model)
    _quiet_libraries(state.rank)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if cfg.trainer.precision == "fp16" and device.type != "cuda":
        raise ValueError("trainer.precision=fp16 needs a GPU; on CPU use fp32 or bf16")
    if cfg.optim.name == "lamb" and device.type != "cuda":
        raise ValueError("optim=lamb needs a GPU (DeepSpeed's FusedLamb); on CPU use optim=adamw")
    run_dir = _shared_run_dir(run_dir_candidate)
    if state.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(redact(OmegaConf.to_container(OmegaConf.structured(cfg)))),
                       run_dir / "config.yaml")

    dataset_dir = _dataset_dir(cfg, state.rank)
    metadata = open_dataset(dataset_dir).metadata
    check_vocab(metadata, cfg.model.vocab_size, dataset_dir)
    _check_same_tokenizer(metadata.get("tokenizer_sha256"), dataset_dir)

    torch.manual_seed(cfg.trainer.seed)  # same on every rank: TP shards cut from one master weight
    with device:  # initialise on the GPU itself: no full-size host copies of large models
        model = MegatronBert(cfg.model, state.tp_group, activation_checkpointing=cfg.trainer.activation_checkpointing,
                             mlm_masked_only=cfg.trainer.mlm_masked_only)
    seed_for_training(cfg.trainer.seed, state.dp_rank)
    random.seed(training_seed(cfg.trainer.seed, state.dp_rank))
    np.random.seed(training_seed(cfg.trainer.seed, state.dp_rank) % 2**32)
    engine, _, scheduler = build_engine(model, cfg, state)
    train_loader, eval_loader = build_loaders(cfg.data, dataset_dir, seed=cfg.trainer.seed,
                                              micro_batch_size=cfg.trainer.micro_batch_size,
                                              dp_rank=state.dp_rank, dp_size=state.dims.data_parallel)
    trainer = Trainer(cfg, state, engine, scheduler, train_loader, eval_loader, run_dir, device)
    resumed = trainer.resume()
    if not resumed and cfg.trainer.init_from:
        trainer.load_weights(cfg.trainer.init_from)
    if state.rank == 0:
        print(f"[mbert-train] run dir {run_dir} | {'resumed at step ' + str(trainer.step) if resumed else 'new run'}"
              f" | world {state.dims.world_size} = TP {state.dims.tensor_parallel} x DP {state.dims.data_parallel}"
              f" | ZeRO-{cfg.parallel.zero_stage} | {cfg.trainer.precision} on {device.type}", flush=True)
    trainer.log = MetricsLogger(run_dir, rank=state.rank, wandb_mode=cfg.logging.wandb_mode,
                                project=cfg.logging.project, run_name=cfg.logging.run_name or run_dir.name,
                                config=OmegaConf.to_container(OmegaConf.structured(cfg)),
                                wandb_run_id=trainer.wandb_run_id, resume_step=trainer.step if resumed else 0)
    trainer.wandb_run_id = trainer.log.wandb_run_id
    trainer.install_signal_handlers()
    try:
        trainer.train()
        finish(trainer, run_dir)
    finally:
        trainer.log.finish()
    return run_dir


def finish(trainer, run_dir: Path) -> None:
    """HF export (gathered over TP by the first replica) and the loss curves, on rank 0."""
    from mbert_train.model.weights import full_state_dict

    cfg, state = trainer.cfg, trainer.state
    if cfg.trainer.export_hf and state.dp_rank == 0:
        full = full_state_dict(trainer.engine.module)
        if state.rank == 0:
            from mbert_train.convert import export_hf

            export_hf({k: v.float() for k, v in full.items()}, cfg.model, run_dir / "hf", overwrite=True)
    if state.rank == 0:
        from mbert_train.plot import plot_curves, read_metrics

        plot_curves(read_metrics(run_dir / "metrics.jsonl"), run_dir / "curves.png", title=run_dir.name)
        print(f"[mbert-train] done at step {trainer.step}: metrics {run_dir / 'metrics.jsonl'}, "
              f"curves {run_dir / 'curves.png'}" + (f", Hugging Face export {run_dir / 'hf'}"
                                                     if cfg.trainer.export_hf else ""), flush=True)
    dist.barrier()


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _hydra_main(dcfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        cfg = to_train_config(dcfg)
        run(cfg, cfg.run.dir or HydraConfig.get().runtime.output_dir)
    except (ValueError, FileNotFoundError) as exc:
        # Bad settings or files: one line naming the setting and the fix, not a traceback.
        print(f"mbert-train: error: {str(exc).splitlines()[0]}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    sys.argv = strip_launcher_args(sys.argv)
    register_schema()
    try:
        _hydra_main()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
