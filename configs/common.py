"""Shared defaults of the training configs: every config file starts from `base_config()`.

Sections map one to one onto the library's dataclasses: ``quant`` -> `QuantConfig`, ``lora`` ->
`LoraConfig`, ``data`` / ``eval_data`` -> `DataConfig`, ``optim`` -> `OptimConfig`, ``mesh`` ->
`sharding.MeshConfig` (default: data parallel over every device, no FSDP); ``model``,
``train`` and ``workdir`` are read by train.py / eval.py. Defaults point at the bundled
pycode-llama-17m and its networkx fine-tuning task (paper setting: batch 1 x 512 tokens).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from lowra_jax.lora import DEFAULT_TARGETS

PYCODE = "../shared/data/models/pycode-llama-17m"
NETWORKX = "../shared/data/pycode"


def data_config(path: str, split: str, batch_size: int) -> ml_collections.ConfigDict:
  """Every `DataConfig` field, so each can be overridden (None fields as typed placeholders)."""
  return ml_collections.ConfigDict(
    dict(
      name="text",
      path=path,
      split=split,
      subset=placeholder(str),
      seq_len=512,
      batch_size=batch_size,
      seed=0,
      separator=placeholder(str),
      add_bos=True,
      add_eos=True,
      max_documents=placeholder(int),
    )
  )


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/default"
  # kernels: quantized_matmul's implementation, "auto" (Pallas Triton on GPU, XLA on CPU), "xla"
  # (dequantize + XLA dot: same numbers, much shorter compile with mixed precision), "triton".
  c.model = dict(path=PYCODE, dtype="bfloat16", remat=False, kernels="auto")
  c.quant = dict(
    method="lowra",
    bits=2,
    layer_bits=(),  # nf: ((regex, bits), ...) per-layer overrides (LoftQ's mixed precision)
    budget=1.5,
    precisions=(1, 2, 4),
    group_size=64,
    double_quant=True,
    lut_clusters=0,
    solver="auto",
    bucket_multiple=16,  # lowra: bucket sizes rounded to multiples of this (GPU row alignment)
  )
  c.lora = dict(
    rank=16, alpha=16.0, dropout=0.05, targets=DEFAULT_TARGETS, init="loftq", loftq_iters=5
  )
  c.data = data_config(NETWORKX, "train", batch_size=1)
  c.eval_data = data_config(NETWORKX, "eval", batch_size=4)
  c.optim = dict(
    learning_rate=2e-4,
    warmup_steps=20,
    total_steps=1000,
    schedule="cosine",
    weight_decay=0.0,
    grad_clip=1.0,
    accumulation=1,
  )
  # Devices: data x fsdp = all of them (-1: the rest); batch sizes must divide by data x fsdp.
  c.mesh = dict(data=-1, fsdp=1, min_shard_bytes=1 << 16, distributed=False)
  c.train = dict(
    seed=0,
    log_every=10,
    eval_every=0,  # 0: only before and after training
    eval_blocks=64,  # blocks of eval_data per evaluation (0: all)
    checkpoint_every=100,
    keep=3,
    resume=False,
    export_peft=True,
    export_merged=False,
  )
  return c
