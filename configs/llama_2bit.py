"""LowRA at 2.0 code bits per weight (channels at 1, 2 and 4 bits), LoftQ init.

python train.py --config=configs/llama_2bit.py [--config.optim.total_steps=200 ...]
"""

from configs.common import base_config


def get_config():
  c = base_config()
  c.workdir = "runs/llama_2bit"
  c.quant.budget = 2.0
  c.lock()
  return c
