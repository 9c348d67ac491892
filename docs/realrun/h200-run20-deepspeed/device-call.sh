#!/bin/bash
# Session 16, device call 6 (nvidia-h200, a fresh machine): deepspeed (whole-layer fetches) on the current code, 4 layers, its own calibrate.
set -o pipefail
export TQDM_MININTERVAL=60 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
{
date +%T; echo "== calibrate --graphs"
timeout 100 python3 -m realrun.calibrate --graphs --policy-trace mixtral-8x7b-gsm8k --policy-layers 4 --train-fraction 0.5 --out /tmp/prof.yaml && cp /tmp/prof.yaml $OUT/profile.yaml
timeout 150 python3 -m realrun.compare --trace mixtral-8x7b-gsm8k --train-fraction 0.5 --graphs --hardware /tmp/prof.yaml --layers 4 --budgets 8experts,16experts,24experts --policies deepspeed --out /tmp/ds | tail -8
date +%T
} 2>&1 | tr '\r' '\n' | grep -v "it/s\]\|s/run\]\|req/s\]\|run/s\]\|size/s\]\|shape/s\]\|model/s\]\|policy/s\]\|^\s*$\|\[A$" | tee $OUT/log.txt
for d in ds; do [ -d /tmp/$d ] && tar czf $OUT/$d.tgz -C /tmp --exclude "$d/trace-*" $d; done; ls -la $OUT
