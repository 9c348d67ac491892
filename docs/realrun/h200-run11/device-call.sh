#!/bin/bash
# Session 15, device call 1 (nvidia-h200-x2): CUDA-graph decode on one H200 (calibrate --graphs, compare
# --graphs), then the layers split over both H200s (calibrate --gpus 2, compare --gpus 2).
set -o pipefail
export TQDM_MININTERVAL=60 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit
CMP="python3 -m realrun.compare --trace mixtral-8x7b-gsm8k --train-fraction 0.5 --layers 16"
POL=all_resident,lru,belady,mixtral_offload,finemoe,moe_infinity,moepic,promoe,oracle_prefetch
{
date +%T; nvidia-smi --query-gpu=index,name,clocks.max.sm,power.limit --format=csv; nvidia-smi topo -m; free -g | head -2; nproc
echo "== calibrate --graphs (GPU 0)"
timeout 80 python3 -m realrun.calibrate --graphs --out /tmp/prof-graphs.yaml && cp /tmp/prof-graphs.yaml $OUT/profile-graphs.yaml
date +%T; echo "== compare --graphs"
timeout 200 $CMP --graphs --budgets 32experts,64experts,96experts --policies $POL --hardware /tmp/prof-graphs.yaml --out /tmp/graphs | tail -16
date +%T; echo "== calibrate --gpus 2"
timeout 80 python3 -m realrun.calibrate --gpus 2 --out /tmp/prof-x2.yaml && cp /tmp/prof-x2.yaml $OUT/profile-x2.yaml
date +%T; echo "== compare --gpus 2"
timeout 195 $CMP --gpus 2 --budgets 16experts,32experts,48experts --policies $POL --hardware /tmp/prof-x2.yaml --out /tmp/x2 | tail -16
date +%T
} 2>&1 | grep -v "it/s\]\|s/run\]\|req/s\]\|\[A$" | tee $OUT/log.txt
for d in graphs x2; do [ -d /tmp/$d ] && tar czf $OUT/$d.tgz -C /tmp --exclude "$d/trace-*" $d; done; ls -la $OUT
