"""QLoRA: NF4 base with double-quantized scales, adapters A random / B = 0.

python train.py --config=configs/qlora_nf4.py [--config.optim.total_steps=200 ...]
"""

from configs.common import base_config


def get_config():
  c = base_config()
  c.workdir = "runs/qlora_nf4"
  c.quant.method = "nf"
  c.quant.bits = 4
  c.lora.init = "qlora"
  c.lock()
  return c
