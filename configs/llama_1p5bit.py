"""LowRA at 1.5 code bits per parameter on a LLaMA checkpoint.

    python train.py --config=configs/llama_1p5bit.py                 # (train.py: upcoming issue)
    python train.py --config=configs/llama_1p5bit.py:smoke --config.quant.budget=1.75

`quant` holds the fields of `lowra_jax.quantize.QuantConfig`.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_path = "../shared/data/models/pycode-llama-17m"
  config.quant = ml_collections.ConfigDict(
    dict(
      method="lowra",
      budget=1.5,
      precisions=(1, 2, 4),
      group_size=64,
      double_quant=True,
      lut_clusters=0,
      solver="auto",
    )
  )
  if arg == "smoke":
    config.model_path = "../shared/data/models/stories260K/stories260K.bin"
  config.lock()
  return config
