#!/usr/bin/env bash
# The device runs behind benchmarks/results/paper_protocol_gpu.md: DM (Fashion-MNIST IPC 10),
# MTT and DATM-CLR (CIFAR-10 IPC 1) side by side on one GPU, without Ray. Each stops condensing
# BUDGET seconds after the start, writes a checkpoint, evaluates, and appends its table to
# OUT/results.md; a second call with IN (the first call's OUT) resumes every run exactly.
#
#   benchmarks/paper_protocol_gpu.sh DATA_ROOT OUT BUDGET [IN]
#
# RUNS (default "dm mtt clr"; also datm) picks the runs; EXPERTS (default 16) sets the CIFAR-10 experts farmed; EXTRA is appended to every run
# (e.g. EXTRA="--train-per-class 20 --max-iterations 2 --eval-epochs 1" for a CPU smoke run).
set -u
D=$1 OUT=$2 B=$3 IN=${4:-} EXPERTS=${EXPERTS:-16} EXTRA=${EXTRA:-} RUNS=${RUNS:-dm mtt clr}
P=benchmarks/paper_protocol.py S=/tmp/raydd-paper-store
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 RAYDD_CACHE=${RAYDD_CACHE:-/tmp/raydd-cache}
END=$(( $(date +%s) + B ))
mkdir -p "$OUT"
# Checkpoints live in $CK (kept while the machine stays up); OUT gets copies in parts of at most
# 15 MB (DATM-CLR's projection head alone is 16 MB), and IN's parts are joined back.
CK=/tmp/raydd-paper-ckpt
mkdir -p $CK
for n in dm mtt datm clr; do
  if [ -n "$IN" ] && ls "$IN/$n.ckpt.part-"* >/dev/null 2>&1; then cat "$IN/$n.ckpt.part-"* > "$CK/$n.ckpt"; fi
done
left() { echo $(( END + 40 - $(date +%s) )); }  # every run is stopped 40 s after the budget
nvidia-smi -L 2>/dev/null; python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"
want() { case " $RUNS " in *" $1 "*) return 0;; *) return 1;; esac; }
want dm && timeout $(left) python3 $P dm_fashion_mnist_ipc10 --data-root "$D" --stop-by $(( END - 150 )) --checkpoint "$CK/dm.ckpt" \
  --out "$OUT/results.md" $EXTRA > "$OUT/dm.log" 2>&1 &
if want mtt || want datm || want clr; then
  python3 -c "from raydd.data.datasets import load_dataset as l; [l('imagefolder', s, '$D/cifar10-jpeg') for s in ('train', 'test')]"
fi
# The first trajectory run farms the experts (4 processes); the others start once they are stored.
for run in mtt:mtt_cifar10_ipc1 datm:datm_cifar10_ipc1 clr:datm_clr_cifar10_ipc1; do
  n=${run%%:*}
  if want $n; then
    timeout $(left) python3 $P ${run#*:} --data-root "$D" --store $S --experts $EXPERTS --farm-processes 4 \
      --stop-by $(( END - 90 )) --checkpoint "$CK/$n.ckpt" --out "$OUT/results.md" $EXTRA > "$OUT/$n.log" 2>&1 &
    pid=$!
    until grep -q '^farm:' "$OUT/$n.log" || ! kill -0 $pid 2>/dev/null; do sleep 2; done
  fi
done
wait
for n in dm mtt datm clr; do
  if [ -f "$CK/$n.ckpt" ]; then split -b 15000000 "$CK/$n.ckpt" "$OUT/$n.ckpt.part-"; fi
done
