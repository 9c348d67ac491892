#!/bin/bash
# Session 15, device call 2 (nvidia-h200-x2): one calibration (--graphs --gpus 2); on one H200 the policies call 1
# did not reach (promoe, oracle_prefetch; deepspeed on 4 layers); then both H200s, layers split, all with graphs.
set -o pipefail
export TQDM_MININTERVAL=60 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
CMP="python3 -m realrun.compare --trace mixtral-8x7b-gsm8k --train-fraction 0.5 --graphs --hardware /tmp/prof.yaml"
POL=all_resident,lru,belady,mixtral_offload,finemoe,moe_infinity,moepic,promoe,oracle_prefetch
{
date +%T; echo "== calibrate --graphs --gpus 2"
timeout 90 python3 -m realrun.calibrate --graphs --gpus 2 --out /tmp/prof.yaml && cp /tmp/prof.yaml $OUT/profile.yaml
date +%T; echo "== one GPU: promoe, oracle_prefetch"
timeout 110 $CMP --layers 16 --budgets 32experts,64experts,96experts --policies promoe,oracle_prefetch --out /tmp/one | tail -9
date +%T; echo "== one GPU: deepspeed, 4 layers"
timeout 100 $CMP --layers 4 --budgets 8experts,16experts,24experts --policies deepspeed --out /tmp/ds | tail -6
date +%T; echo "== two GPUs"
timeout 270 $CMP --layers 16 --gpus 2 --budgets 16experts,32experts,48experts --policies $POL --out /tmp/x2 | tail -30
date +%T
} 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/run\]\|req/s\]\|run/s\]\|size/s\]\|shape/s\]\|model/s\]\|^\s*$" | tee $OUT/log.txt
for d in one ds x2; do [ -d /tmp/$d ] && tar czf $OUT/$d.tgz -C /tmp --exclude "$d/trace-*" $d; done; ls -la $OUT
