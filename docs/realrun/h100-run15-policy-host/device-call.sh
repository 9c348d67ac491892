#!/bin/bash
# Session 15, device call 6 (nvidia-h100-x1): the one-GPU table with graphs, the simulator charging each policy's host time (measured by calibrate replaying the same trace).
set -o pipefail
export TQDM_MININTERVAL=60 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
CMP="python3 -m realrun.compare --trace mixtral-8x7b-gsm8k --train-fraction 0.5 --graphs --hardware /tmp/prof.yaml"
POL=all_resident,lru,belady,mixtral_offload,finemoe,moe_infinity,moepic,promoe,oracle_prefetch
{
date +%T; echo "== calibrate --graphs"
timeout 120 python3 -m realrun.calibrate --graphs --policy-trace mixtral-8x7b-gsm8k --policy-layers 16 --train-fraction 0.5 --out /tmp/prof.yaml && cp /tmp/prof.yaml $OUT/profile.yaml
timeout 290 $CMP --layers 16 --budgets 32experts,64experts,96experts --policies $POL --out /tmp/x1 | tail -30
date +%T
} 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/run\]\|req/s\]\|run/s\]\|size/s\]\|shape/s\]\|model/s\]\|^\s*$" | tee $OUT/log.txt
for d in x1; do [ -d /tmp/$d ] && tar czf $OUT/$d.tgz -C /tmp --exclude "$d/trace-*" $d; done; ls -la $OUT
