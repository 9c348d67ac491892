#!/bin/bash
# Session 16, device call 2 (same warm nvidia-h100-x1): every policy twice more, against call 1's profile (pooled with call 1's runs later).
set -o pipefail
export TQDM_MININTERVAL=60 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
CMP="python3 -m realrun.compare --trace mixtral-8x7b-gsm8k --train-fraction 0.5 --graphs --hardware /tmp/prof.yaml --layers 16 --budgets 32experts,64experts,96experts"
POL=all_resident,lru,belady,mixtral_offload,finemoe,moe_infinity,moepic,promoe,oracle_prefetch
{
date +%T; [ -d /tmp/r0 ] && echo "warm: call 1's machine" || echo "FRESH machine"
[ -f /tmp/prof.yaml ] || timeout 150 python3 -m realrun.calibrate --graphs --policy-trace mixtral-8x7b-gsm8k --policy-layers 16 --train-fraction 0.5 --out /tmp/prof.yaml
cp /tmp/prof.yaml $OUT/profile.yaml
timeout 530 $CMP --policies $POL --repeats 2 --out /tmp/r12 | tail -30
date +%T
} 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/run\]\|req/s\]\|run/s\]\|size/s\]\|shape/s\]\|model/s\]\|policy/s\]\|^\s*$" | tee $OUT/log.txt
for d in r12; do [ -d /tmp/$d ] && tar czf $OUT/$d.tgz -C /tmp --exclude "$d/trace-*" $d; done; ls -la $OUT
