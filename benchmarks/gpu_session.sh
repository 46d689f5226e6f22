#!/usr/bin/env bash
# One lent GPU's measurements, in one device call:
#
#   benchmarks/gpu_session.sh DATA_ROOT OUT BUDGET [PARTS...]
#
# Issue 25's parts (2026-12-04):
#   cifar_cache     CIFAR-10's JPEGs decoded into the cache in the background (CPU) while GPU parts run
#   graphs_test     tests/test_graphs.py: engine="graph"'s CUDA graph replays against their eager fallback (expert,
#                   pack, MTT iteration) next to the CPU equality tests
#   throughput      benchmarks/throughput.py: expert epochs, the MTT CIFAR-10 IPC 1 iteration and 5 evaluation
#                   networks x 1000 epochs against the reference code's own loops (REFS: a clone of
#                   mtt-distillation), TFLOP/s and fraction of the measured peak
#   campaign        raydd reproduce --campaign: the paper-scale settings in priority order for CAMPAIGN_TIME, resuming
#                   the checkpoints committed in benchmarks/results/campaign; OUT/campaign.tgz holds what comes back

# PARTS (default: cifar_cache pack eval_together embed_together reproduce). Measured on an H200 on
# 2026-11-30: pack's width-32 row ~45 s (width 128 did not fit its 90 s limit: give it ~200 s),
# eval_together 29 s, embed_together 61 s, precision 37 s; reproduce's four runs side by side needed more
# than 170 s each (farming, 60 s of condensing, 2 x 5000 evaluation epochs): give them ~400 s alone.
#   pack            packed experts vs one at a time vs K concurrent worker processes (farm.py --part pack)
#   eval_together   the evaluation's networks trained together vs one by one (eval_together.py)
#   embed_together  DM/DANCE/PTLM one embedder forward for all classes (embed_together.py)
#   precision       bf16 autocast vs fp32 (precision.py)
#   unroll_fashion, unroll_datm_cifar10   unroll memory/time against N (unroll.py)
#   reproduce       issue 15: unverified published settings side by side through `raydd reproduce`, each
#                   condensing for BUDGET (e.g. 60s); REPRODUCE="name ..." picks them (default: DATM and
#                   DATM-CLR CIFAR-10 IPC 1, DANCE and PTLM Fashion-MNIST IPC 10; fewer runs side by side
#                   reach further: four shared the H200 at ~1 s per DATM iteration)
#
# DATA_ROOT holds FashionMNIST/raw/*.gz and cifar10-jpeg/ (the JPEG copy). No Ray needed. Every part has its
# own time limit and writes OUT/<part>.txt; OUT/results.tgz packs them (a device call returns 8 files at
# most), refreshed after every part. SMOKE=1 runs every part at toy sizes on the CPU (a check before the
# device is used: it exercises the same commands).
set -u
D=$1 OUT=$2 BUDGET=$3
shift 3
PARTS=${*:-cifar_cache graphs_test throughput campaign}
REFS=${REFS:-.refs}
CAMP=/tmp/raydd-campaign
rm -rf "$CAMP" && mkdir -p "$CAMP" && cp -r benchmarks/results/campaign/. "$CAMP"/ 2>/dev/null
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} RAYDD_CACHE=${RAYDD_CACHE:-/tmp/raydd-cache}
mkdir -p "$OUT/parts"
PY=${PY:-python3}
if [ "${SMOKE:-0}" = 1 ]; then
  DEV=cpu PER=20 EPOCHS=1 WIDTHS="16" PACK="2" EV_EPOCHS=2 EV_IPCS="1" NS_FULL="2" NS_CK="2" DATM_IPC=2 DATM_PER=20
  UNROLL_W=16 SMOKE_ARGS="--scale tiny" CIFAR=(--on digits) FASHION=(--on digits) BUDGET=1s LIMIT_PACK=150 LIMIT_EVAL=90 LIMIT_EMBED=200
  THROUGHPUT_ARGS="--smoke" CAMPAIGN_ARGS="--smoke --only dm_fashion_mnist_ipc10 mtt_cifar10_ipc1" CAMPAIGN_TIME=${CAMPAIGN_TIME:-120s}
else
  DEV=cuda PER=0 EPOCHS=1 WIDTHS="32 128" PACK="8" EV_EPOCHS=50 EV_IPCS="1 10 50" NS_FULL="10 80" NS_CK="80"
  DATM_IPC=50 DATM_PER=100 UNROLL_W=128 SMOKE_ARGS="" CIFAR=() FASHION=()
  THROUGHPUT_ARGS=${THROUGHPUT_ARGS:-} CAMPAIGN_ARGS=${CAMPAIGN_ARGS:-} CAMPAIGN_TIME=${CAMPAIGN_TIME:-200s}
fi

part() {  # part NAME LIMIT_S COMMAND...: run it under a limit, keep its output, repack the results
  local name=$1 limit=$2
  shift 2
  echo "== $(date +%T) $name (limit ${limit} s): $*"
  timeout "$limit" "$@" > "$OUT/parts/$name.txt" 2>&1
  local rc=$?
  echo "== $(date +%T) $name exit $rc$([ $rc = 124 ] && echo ' (time limit)')"
  grep -v "it/s\]\|s/it\]" "$OUT/parts/$name.txt" | tail -30
  tar czf "$OUT/results.tgz" -C "$OUT/parts" .
}

echo "== $(date +%T) start"
nvidia-smi -L 2>/dev/null
$PY -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())"

for WHAT in $PARTS; do case $WHAT in
  cifar_cache)  # CIFAR-10's JPEGs decoded into the cache on the CPU, in the background, while GPU parts run
    (timeout 200 $PY -c "from raydd.data.datasets import load_dataset as l; [l('cifar10', s, '$D') for s in ('train', 'test')]" \
      > "$OUT/parts/cifar_cache.txt" 2>&1) &
    CACHE_PID=$! ;;
  graphs_test) part graphs_test ${LIMIT_GRAPHS:-90} $PY -m pytest -q -x -p no:cacheprovider tests/test_graphs.py ;;
  throughput) [ -n "${CACHE_PID:-}" ] && wait $CACHE_PID
    part throughput ${LIMIT_THROUGHPUT:-240} $PY benchmarks/throughput.py --reference-root "$REFS" --data-root "$D" \
      --device $DEV --out "$OUT/parts/throughput.json" $THROUGHPUT_ARGS ;;
  campaign) [ -n "${CACHE_PID:-}" ] && wait $CACHE_PID
    part campaign ${LIMIT_CAMPAIGN:-260} $PY -m raydd.cli reproduce --campaign "$CAMP" --time $CAMPAIGN_TIME \
      --data-root "$D" --device $DEV --engine graph --pack ${CAMPAIGN_PACK:-10} --store /tmp/raydd-campaign-store \
      --eval-reserve ${EVAL_RESERVE:-60s} $CAMPAIGN_ARGS
    tar czf "$OUT/campaign.tgz" -C "$CAMP" . ;;
  pack) part pack ${LIMIT_PACK:-200} $PY benchmarks/farm.py --part pack --device $DEV --processes --dataset fashion_mnist \
    --data-root "$D" --train-per-class $PER --epochs $EPOCHS --widths $WIDTHS --pack-sizes $PACK ;;
  eval_together) part eval_together ${LIMIT_EVAL:-40} $PY benchmarks/eval_together.py --device $DEV --datasets digits \
    fashion_mnist --data-root "$D" --ipcs $EV_IPCS --epochs $EV_EPOCHS ;;
  unroll_fashion) part unroll_fashion 60 $PY benchmarks/unroll.py --device $DEV --data-root "$D" \
    --store /tmp/raydd-unroll-f --full $NS_FULL --checkpoint $NS_CK --width $UNROLL_W --threads 4 ;;
  unroll_datm_cifar10) wait; part unroll_datm_cifar10 90 $PY benchmarks/unroll.py --device $DEV --method datm \
    --dataset cifar10 --ipc $DATM_IPC --per-class $DATM_PER --data-root "$D" --store /tmp/raydd-unroll-c --full $NS_FULL \
    --checkpoint $NS_CK --width $UNROLL_W --threads 4 ;;
  precision) part precision 70 $PY benchmarks/precision.py --device $DEV --data-root "$D" ${PRECISION_ARGS:-} ;;
  embed_together) part embed_together ${LIMIT_EMBED:-60} $PY benchmarks/embed_together.py --device $DEV \
    --data-root "$D" ${EMBED_ARGS:-} ;;
  reproduce)
    # issue 15's order: DATM-CLR next to DATM (same experts, each its own store: no shared writes), DANCE,
    # PTLM; each farms a capped, packed set of trajectories, condenses for BUDGET, evaluates under the
    # paper's protocol with Random beside it. Ledger rows go to OUT (appended to the repository's by hand).
    wait  # the CIFAR-10 cache, if decoding
    run() {  # run SETTING ARGS...
      local s=$1
      shift
      OMP_NUM_THREADS=2 timeout ${LIMIT_REPRODUCE:-400} $PY -m raydd.cli reproduce "$s" --data-root "$D" \
        --store "/tmp/raydd-store-$s" --workdir /tmp/raydd-reproduce --budget "$BUDGET" --device $DEV \
        --ledger "$OUT/parts/ledger.jsonl" $SMOKE_ARGS "$@" > "$OUT/parts/$s.md" 2> "$OUT/parts/$s.log" &
    }
    echo "== $(date +%T) reproduce (budget $BUDGET each, side by side)"
    for s in ${REPRODUCE:-datm_cifar10_ipc1 datm_clr_cifar10_ipc1 dance_fashion_mnist_ipc10 ptlm_fashion_mnist_ipc10}; do
      case $s in
        datm*_cifar10_ipc1) run $s --trajectories 4 --trajectory-epochs 6 --pack 4 "${CIFAR[@]}" ;;
        dance_*|ptlm_*) run $s --trajectories 5 --trajectory-epochs 5 --pack 5 "${FASHION[@]}" ;;
        *) run $s "${FASHION[@]}" ;;
      esac
    done
    wait
    for f in "$OUT"/parts/*.md; do echo "== $f"; cat "$f"; grep -h "Traceback\|rror" "${f%.md}.log" | tail -3; done
    tar czf "$OUT/results.tgz" -C "$OUT/parts" . ;;
  *) echo "unknown part $WHAT" >&2; exit 2 ;;
esac; done
echo "== $(date +%T) done"
