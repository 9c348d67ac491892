#!/bin/bash
# One device call: calibrate and compare in the same call, on a fresh GPU machine, results under $OUT.
#   MODEL=mixtral (default): Mixtral-8x7B, first 16 layers, the real gsm8k trace, 32/64/96 experts.
#   MODEL=gpt-oss: gpt-oss-20b, all 24 layers, experts at bf16 size (49.8 MB; all 768 in their own pinned
#     host buffers, 38.2 GB), the real gpt-oss-20b-benchmarks trace (its first half trains; the next 3
#     requests, 192 tokens, are replayed), 96/192/384 experts (4.8/9.6/19.1 GB: 4, 8, 16 of 32 a layer).
#   Override any of TRACE, LAYERS, BUDGETS, POLICIES, REPEATS, HOST_SOURCES, TRAIN, MAX_REQUESTS, MODELS,
#   CAL_TIMEOUT, CMP_TIMEOUT.
#   CPU_POLICIES (e.g. lru,fiddler,n_cpu_moe,lru_cpu), with CPU_BUDGETS: after the compare, the host CPU's
#     expert tables measured as the run computes, beside a blocked and a spinning host thread
#     (realrun.cpu_experts --as-run, the run's model (both for another MODEL);
#     printed in $DIR/cpu/log.txt) into a copy of the profile, the blocked one scaled to a short n_cpu_moe
#     run's CPU experts (realrun.cpu_experts --rescale-from), and those policies compared on it ($DIR/cpu/:
#     compare.md, runs.csv, layers.csv, tokens.csv, profile.yaml; with CPU_TIMELINE=1 timeline.csv too; packed
#     as $DIR/cpu.tgz), until CALL_LIMIT seconds (default 560) since the start.
# Run from the repository root on the device (wheels of simpy, hydra-core, omegaconf, antlr4 in .whl/,
# carried: see /work/.library/device/README.md):  MODEL=mixtral bash realrun/device_call.sh
# Writes $OUT/<profile>-<model>/: compare.md, compare.csv, profile.yaml (with its validation), log.txt,
# and runs.tgz (runs, layers, tokens: for --real-from; not for the repository).
set -o pipefail
: "${OUT:?set OUT to the folder that comes back}"
MODEL=${MODEL:-mixtral}
case $MODEL in
  mixtral) TRACE=${TRACE:-mixtral-8x7b-gsm8k}; LAYERS=${LAYERS:-16}; BUDGETS=${BUDGETS:-32experts,64experts,96experts}
           HOST_SOURCES=${HOST_SOURCES:-8}; TRAIN=${TRAIN:-0.5}; MODELS=${MODELS:-all}; CPU_MODEL=mixtral-8x7b ;;
  gpt-oss) TRACE=${TRACE:-gpt-oss-20b-benchmarks}; LAYERS=${LAYERS:-24}; BUDGETS=${BUDGETS:-96experts,192experts,384experts}
           HOST_SOURCES=${HOST_SOURCES:-0}; TRAIN=${TRAIN:-0.5}; MAX_REQUESTS=${MAX_REQUESTS:-3}; MODELS=${MODELS:-gpt-oss-20b}
           CAL_TIMEOUT=${CAL_TIMEOUT:-250}; CMP_TIMEOUT=${CMP_TIMEOUT:-330}; CPU_MODEL=gpt-oss-20b ;;
  *) [ -n "$TRACE" ] && [ -n "$LAYERS" ] || { echo "MODEL=$MODEL: give TRACE and LAYERS" >&2; exit 2; }
     BUDGETS=${BUDGETS:-auto}; HOST_SOURCES=${HOST_SOURCES:-8}; TRAIN=${TRAIN:-0.5}; MODELS=${MODELS:-all} ;;
esac
POLICIES=${POLICIES:-all_resident,lru,belady,mixtral_offload,finemoe,moe_infinity,moepic,promoe,oracle_prefetch,reuse}
LIMIT=${MAX_REQUESTS:+--max-requests $MAX_REQUESTS}
REPEATS=${REPEATS:-1}
export TQDM_MININTERVAL=60 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
NAME=$(python3 -c "from realrun.backend import Backend; from realrun.calibrate import profile_name; print(profile_name(Backend('cuda').name))")
DIR=$OUT/$NAME-$MODEL; mkdir -p "$DIR"
PROFILE=/tmp/$NAME-$MODEL.yaml
{
  date -u +%T; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv
  echo "== calibrate"
  timeout "${CAL_TIMEOUT:-270}" python3 -m realrun.calibrate --graphs --name "$NAME" --policy-trace "$TRACE" \
    --policy-layers "$LAYERS" --train-fraction "$TRAIN" --host-sources "$HOST_SOURCES" --models "$MODELS" $LIMIT --out "$PROFILE" \
    && cp "$PROFILE" "$DIR/profile.yaml" || exit 1
  date -u +%T; echo "== compare"
  timeout "${CMP_TIMEOUT:-300}" python3 -m realrun.compare --trace "$TRACE" --layers "$LAYERS" --train-fraction "$TRAIN" \
    --graphs --hardware "$PROFILE" --host-sources "$HOST_SOURCES" --budgets "$BUDGETS" --policies "$POLICIES" \
    --repeats "$REPEATS" $LIMIT --out /tmp/cmp-$MODEL | tail -40
  date -u +%T
} 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/run\]\|req/s\]\|run/s\]\|size/s\]\|shape/s\]\|model/s\]\|policy/s\]\|^\s*$" \
  | tee "$DIR/log.txt"
for f in compare.md compare.csv; do [ -f /tmp/cmp-$MODEL/$f ] && cp /tmp/cmp-$MODEL/$f "$DIR/"; done
[ -d /tmp/cmp-$MODEL ] && tar czf "$DIR/runs.tgz" -C /tmp --exclude "cmp-$MODEL/trace-*" cmp-$MODEL
if [ -n "$CPU_POLICIES" ]; then
  mkdir -p "$DIR/cpu"
  {
    left() { echo $(( ${CALL_LIMIT:-560} - SECONDS )); }
    echo "== CPU expert tables, as the run computes (--as-run; $(left) s left)"
    [ "$(left)" -gt 20 ] && timeout "$(left)" python3 -m realrun.cpu_experts --profile "$PROFILE" --models "${CPU_MODEL:-mixtral-8x7b,gpt-oss-20b}" \
      --tokens 1,2,4,8,16,32,64 --as-run --policy-trace "$TRACE" --policy-layers "$LAYERS" --train-fraction "$TRAIN" \
      $LIMIT --out /tmp/cpu-$MODEL.yaml | tail -40
    # The blocked table scaled to a short n_cpu_moe run's CPU experts (one request of the compare's training
    # half: not a compared one): the table alone missed the run by -16% to +36%.
    date -u +%T; echo "== CPU table against a short run ($(left) s left)"
    B1=${CPU_BUDGETS:-$BUDGETS}; B1=${B1%%,*}
    [ "$(left)" -gt 60 ] && timeout "$(left)" python3 -m realrun.compare --trace "$TRACE" --layers "$LAYERS" \
      --train-fraction 0.25 --graphs --hardware /tmp/cpu-$MODEL.yaml --host-sources "$HOST_SOURCES" --budgets "$B1" \
      --policies n_cpu_moe --max-requests 1 --timeline --out /tmp/cpu-scale-$MODEL | grep "^| n_cpu" \
      && python3 -m realrun.cpu_experts --profile /tmp/cpu-$MODEL.yaml --models "${CPU_MODEL:-mixtral-8x7b}" \
           --rescale-from /tmp/cpu-scale-$MODEL --out /tmp/cpu-$MODEL.yaml
    date -u +%T; echo "== compare $CPU_POLICIES ($(left) s left)"
    [ "$(left)" -gt 30 ] && timeout "$(left)" python3 -m realrun.compare --trace "$TRACE" --layers "$LAYERS" \
      --train-fraction "$TRAIN" --graphs --hardware /tmp/cpu-$MODEL.yaml --host-sources "$HOST_SOURCES" \
      --budgets "${CPU_BUDGETS:-$BUDGETS}" --policies "$CPU_POLICIES" $LIMIT ${CPU_TIMELINE:+--timeline} --out /tmp/cpu-$MODEL | tail -20
    date -u +%T
  } 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/run\]\|req/s\]\|run/s\]\|^\s*$" | tee "$DIR/cpu/log.txt"
  for f in compare.md runs.csv layers.csv tokens.csv timeline.csv; do
    [ -f /tmp/cpu-$MODEL/$f ] && cp /tmp/cpu-$MODEL/$f "$DIR/cpu/"
  done
  [ -f /tmp/cpu-$MODEL.yaml ] && cp /tmp/cpu-$MODEL.yaml "$DIR/cpu/profile.yaml"
  tar czf "$DIR/cpu.tgz" -C "$DIR" cpu && rm -rf "$DIR/cpu"  # one file: at most 8 come back
fi
ls -la "$DIR"
