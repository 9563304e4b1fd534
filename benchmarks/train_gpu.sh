#!/usr/bin/env bash
# The default llama_1p5bit run on a GPU machine without network: carried wheels + a copy of the
# bundled model and task under .carry/ (see benchmarks/gpu_env.sh). Usage: bash benchmarks/train_gpu.sh OUT
set -euo pipefail
out=${1:?output directory}
source benchmarks/gpu_env.sh
args=(--config=configs/llama_1p5bit.py --config.model.path=.carry/data/models/pycode-llama-17m
      --config.data.path=.carry/data/pycode --config.eval_data.path=.carry/data/pycode
      --config.workdir=/tmp/run --config.train.eval_blocks=0)
/usr/bin/time -v python train.py "${args[@]}" > "$out/train.txt" 2> "$out/train.err" || true
python eval.py "${args[@]}" > "$out/eval.txt" 2> "$out/eval.err" || true
cp /tmp/run/metrics.jsonl /tmp/run/loss.png "$out/" 2>/dev/null || true
tail -3 "$out/train.txt"; grep -E "Elapsed|Maximum resident" "$out/train.err" || tail -5 "$out/train.err"
tail -8 "$out/eval.txt"; tail -3 "$out/eval.err"
