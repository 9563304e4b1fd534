"""LoftQ at 2 bits: NF2 base, adapters from 5 LoftQ rounds.

python train.py --config=configs/loftq_nf2.py [--config.optim.total_steps=200 ...]
"""

from configs.common import base_config


def get_config():
  c = base_config()
  c.workdir = "runs/loftq_nf2"
  c.quant.method = "nf"
  c.quant.bits = 2
  c.lora.init = "loftq"
  c.lock()
  return c
