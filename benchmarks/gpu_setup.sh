# A GPU machine without network access, from a plain checkout plus carried files.
#
# Its image has jax, flax, optax, orbax, chex, transformers, torch, peft, scipy, tqdm and matplotlib
# but not datasets (nor its dill and multiprocess) or ml_collections. In two steps:
#
#   bash benchmarks/gpu_setup.sh fetch [NAME ...]   # here, with network: wheels -> .carry/whl, and
#                                                   # ../shared/data/NAME (default: models pycode)
#                                                   # copied to .carry/data/NAME
#   source benchmarks/gpu_setup.sh                  # there: wheels -> /tmp/site, PYTHONPATH set
#
# .carry/ is git-ignored: carry it with the checkout (64 MiB in all), then point the configs at the
# copies, e.g. python train.py --config=configs/llama_1p5bit.py \
#   --config.model.path=.carry/data/models/pycode-llama-17m --config.data.path=.carry/data/pycode \
#   --config.eval_data.path=.carry/data/pycode
WHEELS=(datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 ml_collections==1.1.0)

gpu_setup_fetch() {
  set -euo pipefail
  local platforms=() n
  for n in 17 27 28 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d .carry/whl "${WHEELS[@]}"
  local names=("$@") name
  ((${#names[@]})) || names=(models pycode)
  for name in "${names[@]}"; do
    mkdir -p ".carry/data/$(dirname "$name")"
    rm -rf ".carry/data/$name"
    cp -r "../shared/data/$name" ".carry/data/$name"
  done
  du -sh .carry
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then  # executed: the fetch step
  [[ "${1:-}" == fetch ]] || { echo "usage: bash $0 fetch [NAME ...] | source $0" >&2; exit 2; }
  shift
  gpu_setup_fetch "$@"
else  # sourced on the GPU machine
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .carry/whl/*.whl || return 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2
fi
