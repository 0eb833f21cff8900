"""Checkpoints: one way to save and load a training state.

- `dir`: the crash-safe `checkpoints/` directory (temp dir, rename, `latest`), its `meta.json`.
- `dcp`: the state as one `torch.distributed.checkpoint` of full tensors, read at any layout.
- `state`: the stateful parts of a run (`Checkpointer`: save, load, load weights) and the
  choice of the checkpoint a start continues from.
- `upgrade`: a checkpoint of format 2 rewritten as format 3 (`mbert-convert upgrade-checkpoint`).
"""

from mbert_train.checkpoint.dir import (CHECKPOINT_ADVICE, CHECKPOINTS_SUBDIR, FORMAT, META_FILE, CheckpointDir,
                                        CheckpointError, find_latest, read_json, read_meta, read_run_record, step_of,
                                        step_tag, write_errors)

__all__ = ["CHECKPOINTS_SUBDIR", "CHECKPOINT_ADVICE", "FORMAT", "META_FILE", "CheckpointDir", "CheckpointError",
           "find_latest", "read_json", "read_meta", "read_run_record", "step_of", "step_tag", "write_errors"]
