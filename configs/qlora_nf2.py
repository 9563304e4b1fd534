"""QLoRA at 2 bits: NF2 base, adapters A random / B = 0 (the baseline LowRA improves on).

python train.py --config=configs/qlora_nf2.py [--config.optim.total_steps=200 ...]
"""

from configs.common import base_config


def get_config():
  c = base_config()
  c.workdir = "runs/qlora_nf2"
  c.quant.method = "nf"
  c.quant.bits = 2
  c.lora.init = "qlora"
  c.lock()
  return c
