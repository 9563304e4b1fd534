# Source this on the GPU machine (no network): installs the wheels carried in .carry/whl (datasets,
# dill, multiprocess, ml_collections) into /tmp/site and puts them and the project on PYTHONPATH.
# The bundled material is expected under .carry/data (a copy of ../shared/data's files in use).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
  .carry/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
