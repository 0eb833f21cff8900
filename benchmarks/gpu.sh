#!/usr/bin/env bash
# The GPU table: BERT-base and BERT-large at seq 128 and 512 (dropout 0.1; the reference with SDPA
# where transformers offers it for MegatronBERT, else eager) and ModernBERT-base at seq 1024
# (its preset's dropout 0, MLM only, 30 % masked; the reference ModernBertForMaskedLM with SDPA),
# bf16 autocast, ours against the reference, with MFU on real (unpadded) tokens, peak memory,
# and the same-math floor; one JSON with it all.
#
#   benchmarks/gpu.sh OUT.json [bench_model.py flags, e.g. --data DIR]
#   benchmarks/gpu.sh --dry-run OUT.json [flags]    # CPU, tiny shape, 1 step: the script's own check
#
# Each shape runs `bench_model.py` with a GPU-sized micro-batch (override with BATCH_<shape>=N,
# e.g. BATCH_large512=8). Exit status: 0 if every run's dropout-0 loss check passed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then
  dry_run=1
  shift
fi
out="${1:?usage: benchmarks/gpu.sh [--dry-run] OUT.json [bench_model.py flags]}"
shift

if (( dry_run )); then
  # --peak-tflops 1 is a nominal peak: it only exercises the MFU columns on CPU.
  runs=("tiny:4")
  common=(--device cpu --steps 1 --warmup 0 --peak-tflops 1 --in-process)
  echo "gpu.sh: DRY RUN on CPU (tiny shape, 1 step, nominal 1 TFLOP/s peak): checks the script, measures nothing"
else
  if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu.sh: torch sees no CUDA device; run on a GPU machine, or use --dry-run for the CPU check" >&2
    exit 2
  fi
  runs=("base128:${BATCH_base128:-128}" "base512:${BATCH_base512:-32}"
        "large128:${BATCH_large128:-64}" "large512:${BATCH_large512:-16}" "modern1024:${BATCH_modern1024:-16}")
  # In one process per shape: CUDA memory is counted by the allocator, so the models need no
  # process of their own, and each shape saves the imports of two more.
  common=(--bf16 --steps 10 --warmup 3 --in-process)
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
status=0
for run in "${runs[@]}"; do
  shape="${run%%:*}"
  batch="${run##*:}"
  echo
  echo "=== $shape, micro-batch $batch ==="
  "$python" "$here/bench_model.py" --shapes "$shape" --batch "$batch" "${common[@]}" \
      --json "$tmp/$shape.json" "$@" || status=1
done

"$python" - "$out" "$tmp" "${runs[@]}" <<'EOF'
import json, os, sys

out, tmp, runs = sys.argv[1], sys.argv[2], sys.argv[3:]
merged = {}
for run in runs:
    shape = run.split(":")[0]
    path = os.path.join(tmp, f"{shape}.json")
    if os.path.exists(path):
        with open(path) as f:
            merged[shape] = json.load(f)
with open(out, "w") as f:
    json.dump(merged, f, indent=2)

def pct(x):
    return "n/a" if x is None else f"{100 * x:.1f}%"

print()
print("| shape | micro-batch | real tokens | ours ms | ref ms | ref/ours | ours MFU | ref MFU | ours peak GiB "
      "| ref peak GiB | ours/floor |")
print("|---" * 11 + "|")
for shape, data in merged.items():
    r = data["results"][shape]
    ours, ref, floor = r["ours"], r["ref"], r["floor"]
    s = data["summaries"][shape]
    print(f"| {shape} | {ours['batch']} | {s['real_tokens'] / s['padded_tokens']:.0%} | {1000 * ours['step_s']:.1f} "
          f"| {1000 * ref['step_s']:.1f} | {ref['step_s'] / ours['step_s']:.2f}x | {pct(ours['mfu'])} | {pct(ref['mfu'])} "
          f"| {ours['peak_mb'] / 1024:.2f} | {ref['peak_mb'] / 1024:.2f} | {ours['step_s'] / floor['step_s']:.2f}x |")
device = next(iter(merged.values()))["results"] if merged else {}
name = next(iter(device.values()))["ours"]["device_name"] if device else "?"
print(f"\ndevice: {name}; JSON: {out}")
missing = [run for run in runs if run.split(":")[0] not in merged]
if missing:
    sys.exit(f"gpu.sh: no result for {', '.join(missing)}")
EOF
exit "$status"
