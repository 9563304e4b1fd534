"""The headline setting: LowRA at 1.5 code bits per weight, LoftQ-initialised rank-16 adapters.

python train.py --config=configs/llama_1p5bit.py [--config.optim.total_steps=200 ...]
"""

from configs.common import lowra_config


def get_config():
  c = lowra_config(1.5)
  c.workdir = "runs/llama_1p5bit"
  c.lock()
  return c
