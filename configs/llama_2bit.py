"""LowRA at 2.0 code bits per weight (precisions {1, 2}: every channel at 2 bits), LoftQ init.

python train.py --config=configs/llama_2bit.py [--config.optim.total_steps=200 ...]
"""

from configs.common import lowra_config


def get_config():
  c = lowra_config(2.0)
  c.workdir = "runs/llama_2bit"
  c.lock()
  return c
