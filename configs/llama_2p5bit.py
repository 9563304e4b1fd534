"""LowRA at 2.5 code bits per weight, 3-bit channels allowed (better from 2.25 bits up), LoftQ init.

python train.py --config=configs/llama_2p5bit.py [--config.optim.total_steps=200 ...]
"""

from configs.common import lowra_config


def get_config():
  c = lowra_config(2.5)
  c.workdir = "runs/llama_2p5bit"
  c.quant.precisions = (1, 2, 3, 4)
  c.lock()
  return c
