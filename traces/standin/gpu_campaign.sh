#!/usr/bin/env bash
# The one-GPU campaign behind the shipped stand-in traces (docs/standin.md): the Mixtral-shape
# attempts at real-like routing and the Qwen/Phi stand-ins train side by side for MINUTES, then the
# Mixtral attempt closest to real routing and the other two shapes are collected on held-out ShareGPT
# and on LMSYS-Chat prompts and compacted for shipping.
#   traces/standin/gpu_campaign.sh CORPUS WORK MINUTES OUT     (from the project root, on a GPU machine)
# A rehearsal on a CPU shrinks it: TRAIN_EXTRA="--hidden 16 --heads 2 --context 32 --batch-tokens 256" N_REQUESTS=4
# OUT receives attempts.md, training.tar.gz (logs, curves, summaries; no weights)
# and traces.tar.gz (the compacted traces; add MiniLM embeddings with traces.compact --embed minilm).
set -u
corpus=$1 work=$2 minutes=$3 out=$4
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "$work/runs" "$work/traces" "$work/compact" "$out"
common="--steps 100000 --max-minutes $minutes --eval-every 150 --no-progress ${TRAIN_EXTRA:-}"
# train NAME SHAPE [FLAGS]: one attempt in the background, its log beside its output
train() { local name=$1 shape=$2; shift 2; python3 -m traces.standin.train "$shape" "$corpus" "$work/runs/$name" $common "$@" >"$work/runs/$name.log" 2>&1 & }
train mixtral-base mixtral-8x7b
train mixtral-lr3e-3 mixtral-8x7b --lr 3e-3
train mixtral-ctx64 mixtral-8x7b --context 64
train mixtral-dropout0.1 mixtral-8x7b --dropout 0.1
train mixtral-detached mixtral-8x7b --router-input detached
train mixtral-seqaux mixtral-8x7b --aux-scope sequence --aux-loss 0.05
train qwen-seqaux qwen1.5-moe --aux-scope sequence --aux-loss 0.05
train phi-seqaux phi-3.5-moe --aux-scope sequence --aux-loss 0.05
wait
tail -n 3 "$work"/runs/*.log
python3 -m traces.standin.attempts "$work/runs" >"$out/attempts.md"
cat "$out/attempts.md"
tar czf "$out/training.tar.gz" -C "$work/runs" --exclude='standin-*' .
best=$(python3 -m traces.standin.attempts "$work/runs" --best mixtral-8x7b)
declare -A profile=([mixtral-8x7b]=mixtral-8x7b [qwen1.5-moe]=qwen1.5-moe [phi-3.5-moe]=phi-3.5-moe)
for run in "$best" "$work/runs/qwen-seqaux" "$work/runs/phi-seqaux"; do
  for dataset in sharegpt_v3_heldout lmsys_chat_1m_sample; do
    checkpoint=$(ls -d "$run"/standin-*)
    shape=$(basename "$checkpoint" | sed -E 's/^standin-(.*)-h[0-9]+$/\1/')
    name=standin-$shape-$dataset
    ( timeout 170 python3 -m traces.collect "$checkpoint" --dataset "$corpus/$dataset.json" --n-requests ${N_REQUESTS:-300} \
        --max-prompt-tokens 512 --max-output-tokens 128 --batch-size 50 --temperature 1.0 --embeddings token_mean \
        --lookahead 0 --no-progress --out "$work/traces/$name" &&
      python3 -m traces.compact "$work/traces/$name" "$work/compact/$name" --requests 160 --decode-iters 32 \
        --model "${profile[$shape]}" ) >"$work/traces/$name.log" 2>&1 &
  done
done
wait
tail -n 2 "$work"/traces/*.log
tar czf "$out/traces.tar.gz" -C "$work/compact" .
ls -la "$out"
