"""The README demo: LowRA 1.5 bits + LoftQ on the bundled pycode-llama-17m, a few minutes on CPU.

python train.py --config=configs/demo.py [--config.optim.total_steps=200 ...]
"""

from configs.common import lowra_config


def get_config():
  c = lowra_config(1.5)
  c.workdir = "runs/demo"
  c.lora.loftq_iters = 2
  c.calib.sequences = 64
  c.data.seq_len = 256
  c.eval_data.seq_len = 256
  c.eval_data.batch_size = 8
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 5
  c.optim.total_steps = 60
  c.train.log_every = 5
  c.train.eval_blocks = 32
  c.train.checkpoint_every = 20
  c.lock()
  return c
