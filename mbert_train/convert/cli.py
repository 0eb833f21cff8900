"""mbert-convert: Hugging Face MegatronBERT / ModernBERT and Megatron-LM <-> mbert-train model directories.

    mbert-convert from-hf HF_DIR OUT_DIR --tp N    # config.json + weights -> model_config.json + N shards
    mbert-convert to-hf CKPT_DIR OUT_DIR           # any model/step/run dir, any TP -> config.json + model.safetensors
                                                   # + the run's tokenizer and a model card README.md
    mbert-convert from-megatron DIR OUT_DIR --tp N # Megatron-LM BERT checkpoint
    mbert-convert to-megatron CKPT_DIR OUT_DIR --tp N
    mbert-convert upgrade-checkpoint CKPT_DIR      # a checkpoint (or every one of a run) of format 2 -> 3, in place

The conversions are `mbert_train.convert.hf`, `mbert_train.convert.megatron` and
`mbert_train.checkpoint.upgrade`; this module only parses the command line and turns errors
into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mbert_train.checkpoint import FORMAT
from mbert_train.checkpoint.upgrade import upgrade
from mbert_train.convert.common import MEGATRON_TRACKER
from mbert_train.convert.hf import from_hf, load_hint, to_hf
from mbert_train.convert.megatron import DTYPES, SHARD_FILE, from_megatron, to_megatron
from mbert_train.errors import UserError, describe_os_error, first_line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mbert-convert", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  mbert-convert from-hf ./megatron-bert-hf ./init_tp2 --tp 2\n"
               "  mbert-train trainer.init_from=./init_tp2 parallel.tensor_parallel=2 ...\n"
               "  mbert-convert to-hf runs/my_run ./my_run_hf     # follows checkpoints/latest")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{from-hf,to-hf,from-megatron,to-megatron,upgrade-checkpoint}")
    _add_hf_parsers(sub)
    _add_megatron_parsers(sub)
    p = sub.add_parser("upgrade-checkpoint", help="rewrite checkpoints of an earlier mbert-train (format 2) in the "
                                                  "current format, in place",
                       description="Rewrite a checkpoint step directory RUN/checkpoints/step_XXXXXXXX of format 2 "
                                   "(safetensors weights, optim/, trainer_state.pt, rng_rank*.pt, run.json), or every "
                                   "one of a run directory RUN, as format 3 (one torch.distributed.checkpoint plus "
                                   "meta.json), exactly: the run resumes from it as it would have from the original.")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a checkpoint step dir or a run dir")
    return parser


def _add_hf_parsers(sub) -> None:
    """The from-hf / to-hf subcommands of `mbert-convert`."""
    p = sub.add_parser("from-hf", help="Hugging Face directory -> mbert-train model directory with TP shards",
                       description="Read HF_DIR/config.json and model.safetensors (or model.safetensors.index.json, "
                                   "pytorch_model.bin) of a MegatronBertForPreTraining / ForMaskedLM or a "
                                   "ModernBertForMaskedLM and write OUT_DIR/model_config.json + "
                                   "model_tpRR-of-NN.safetensors for every TP rank, and the tokenizer files found "
                                   "in HF_DIR.")
    p.add_argument("hf_dir", metavar="HF_DIR", help="directory written by save_pretrained")
    p.add_argument("out_dir", metavar="OUT_DIR", help="model directory to create (trainer.init_from)")
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor-parallel degree to shard for; must divide num_heads and intermediate_size "
                        "(default: 1)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p = sub.add_parser("to-hf", help="mbert-train model/checkpoint/run directory -> Hugging Face directory",
                       description="Gather the TP shards of CKPT_DIR (any TP degree) and write OUT_DIR/config.json "
                                   "+ model.safetensors (MegatronBertForPreTraining, MegatronBertForMaskedLM "
                                   "for an MLM-only model, or ModernBertForMaskedLM), the tokenizer of the dataset "
                                   "the run trained on or the one a from-hf output came with "
                                   "(tokenizer.json, vocab.txt, tokenizer_config.json, special_tokens_map.json) "
                                   "and a model card README.md: pipeline('fill-mask', model=OUT_DIR) works as is.")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR",
                   help="a from-hf output, a checkpoint step dir RUN/checkpoints/step_XXXXXXXX, or a run dir RUN "
                        "(its checkpoints/latest is used)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="Hugging Face directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--dataset", metavar="DIR", default=None,
                   help="the mbert-prep dataset whose tokenizer to write (default: the one the checkpoint's "
                        "meta.json records; pass this when it moved)")


def _add_megatron_parsers(sub) -> None:
    """The from-megatron / to-megatron subcommands of `mbert-convert`."""
    p = sub.add_parser("from-megatron", help="Megatron-LM BERT checkpoint (legacy torch format) -> mbert-train "
                                             "model directory with TP shards",
                       description="Read a Megatron-LM BERT checkpoint at any TP degree (DIR with "
                                   f"{MEGATRON_TRACKER}, an iter_XXXXXXX/release directory, or one "
                                   f"{SHARD_FILE}, e.g. NVIDIA's MegatronBERT 345M) and write "
                                   "OUT_DIR/model_config.json + model_tpRR-of-NN.safetensors.")
    p.add_argument("megatron_dir", metavar="MEGATRON_DIR", help="Megatron checkpoint directory or file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="model directory to create (trainer.init_from)")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="tensor-parallel degree to shard for (default: 1)")
    p.add_argument("--vocab-size", type=int, default=None, metavar="V",
                   help="keep the first V vocabulary rows (your tokenizer's size); default: args.vocab_size if "
                        "recorded, else the whole padded vocabulary, as Megatron's model computes it")
    p.add_argument("--num-heads", type=int, default=None, metavar="N",
                   help="attention heads, for checkpoints without args (default: hidden_size/64, as in "
                        "NVIDIA's 345M)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p = sub.add_parser("to-megatron", help="mbert-train model/checkpoint/run directory -> Megatron-LM checkpoint",
                       description="Write OUT_DIR/latest_checkpointed_iteration.txt ('release') and "
                                   f"OUT_DIR/release/mp_rank_XX/{SHARD_FILE} (checkpoint_version 3.0) for "
                                   "Megatron-LM's legacy BERT; load it there with --load OUT_DIR (add --finetune "
                                   "if your args differ).")
    p.add_argument("ckpt_dir", metavar="CKPT_DIR", help="a model dir, checkpoint step dir or run dir")
    p.add_argument("out_dir", metavar="OUT_DIR", help="Megatron checkpoint directory to create")
    p.add_argument("--tp", type=int, default=1, metavar="N", help="Megatron tensor-parallel size (default: 1)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default: float32)")
    p.add_argument("--tokenizer-type", default="BertWordPieceLowerCase",
                   help="args.tokenizer_type recorded for Megatron (default: BertWordPieceLowerCase)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "from-hf":
            out = from_hf(args.hf_dir, args.out_dir, args.tp, overwrite=args.overwrite)
            print(f"wrote {out} (tensor_parallel={args.tp}); train from it with trainer.init_from={out}")
        elif args.command == "to-hf":
            out = to_hf(args.ckpt_dir, args.out_dir, overwrite=args.overwrite, dataset=args.dataset)
            print(load_hint(out))
        elif args.command == "from-megatron":
            out, cfg = from_megatron(args.megatron_dir, args.out_dir, args.tp, num_heads=args.num_heads,
                                     vocab_size=args.vocab_size, overwrite=args.overwrite)
            print(f"wrote {out} (tensor_parallel={args.tp}, vocab_size={cfg.vocab_size}, layer_norm_eps="
                  f"{cfg.layer_norm_eps}); train from it with trainer.init_from={out}")
        elif args.command == "upgrade-checkpoint":
            for checkpoint, rewritten in upgrade(args.ckpt_dir):
                print(f"{checkpoint}: {'upgraded to' if rewritten else 'already in'} checkpoint format {FORMAT}")
        else:
            out = to_megatron(args.ckpt_dir, args.out_dir, args.tp, dtype=args.dtype,
                              tokenizer_type=args.tokenizer_type, overwrite=args.overwrite)
            print(f"wrote {out} (Megatron-LM, tensor_model_parallel_size={args.tp}); load it with --load {out}")
    except UserError as exc:
        print(f"mbert-convert: error: {first_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, read-only or unwritable OUT_DIR, unreadable input
        path = exc.filename or args.out_dir
        action = "writing" if _is_output_path(Path(path), Path(args.out_dir)) else "reading"
        print(f"mbert-convert: error: {describe_os_error(exc, path, action)}", file=sys.stderr)
        return 2
    return 0


def _is_output_path(path: Path, out_dir: Path) -> bool:
    """`path` is OUT_DIR, its parent, or inside OUT_DIR or the `.OUT_DIR.*` built beside it."""
    path, out = path.absolute(), out_dir.absolute()
    return path == out.parent or any(p == out or (p.parent == out.parent and p.name.startswith(f".{out.name}."))
                                     for p in (path, *path.parents))
