"""The dense reference: LoRA over the unquantized bf16 base (what every quantized run is compared to).

python train.py --config=configs/lora_bf16.py [--config.optim.total_steps=200 ...]
"""

from configs.common import base_config


def get_config():
  c = base_config()
  c.workdir = "runs/lora_bf16"
  c.quant.method = "none"
  c.lora.init = "qlora"
  c.lock()
  return c
