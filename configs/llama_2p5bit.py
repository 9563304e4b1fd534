"""LowRA at 2.5 code bits per weight, channels at 2, 3 or 4 bits (3-bit channels allowed: a better
base and fine-tuned model at 2.5 bits, slower decode), fisher calibration, LoftQ init.

python train.py --config=configs/llama_2p5bit.py [--config.optim.total_steps=200 ...]
"""

from configs.common import lowra_config


def get_config():
  c = lowra_config(2.5)
  c.workdir = "runs/llama_2p5bit"
  c.quant.precisions = (2, 3, 4)
  c.lock()
  return c
