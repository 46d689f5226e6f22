#!/usr/bin/env bash
# Published settings side by side on one GPU, without Ray, through `raydd reproduce` (no Ray needed:
# the farm runs locally). Each run stops condensing BUDGET after its start at a checkpoint in WORK,
# evaluates under its paper's protocol with Random beside it, prints its table to OUT/<name>.md and
# appends its row to the ledger (benchmarks/results/reproduce_ledger.jsonl); a second call with the
# same WORK resumes every run exactly (--resume), on this machine or a fresh one (missing experts are
# farmed again: their ids are hashes of their settings).
#
#   benchmarks/reproduce_gpu.sh DATA_ROOT OUT BUDGET [SETTINGS...]
#
# SETTINGS default: dm_fashion_mnist_ipc10 mtt_cifar10_ipc1 datm_clr_cifar10_ipc1. CIFAR-10 settings
# read the JPEG copy as cifar10 where DATA_ROOT has no torchvision files (DATA_ROOT/cifar10-jpeg). EXTRA is appended to every run (e.g.
# EXTRA="--scale tiny" for a CPU smoke run).
set -u
D=$1 OUT=$2 B=$3
shift 3
SETTINGS=${*:-dm_fashion_mnist_ipc10 mtt_cifar10_ipc1 datm_clr_cifar10_ipc1}
WORK=${WORK:-/tmp/raydd-reproduce} STORE=${STORE:-/tmp/raydd-paper-store} EXTRA=${EXTRA:-}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 RAYDD_CACHE=${RAYDD_CACHE:-/tmp/raydd-cache}
mkdir -p "$OUT"
nvidia-smi -L 2>/dev/null; python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
for s in $SETTINGS; do
  data=(--data-root "$D")
  resume=()
  if ls "$WORK/$s-"*/method.safetensors >/dev/null 2>&1; then resume=(--resume); fi
  python3 -m raydd.cli reproduce "$s" "${data[@]}" --store "$STORE" --workdir "$WORK" --budget "$B" \
    --device cuda "${resume[@]}" $EXTRA > "$OUT/$s.md" 2> "$OUT/$s.log" &
done
wait
cat "$OUT"/*.md
