"""Generate text with a fine-tuned low-bit model: the packed base + adapters of a train.py run.

    python generate.py --config=configs/demo.py --prompt="def shortest_path(G, source):"
    python generate.py --config=configs/demo.py --prompt="import " --prompt="class Graph" \
      --temperature=0.8 --top_p=0.95 --seed=1 --max_new_tokens=64
    python generate.py --config=configs/demo.py --merge    # fold the adapters into the base

`config.workdir` must hold a train.py run of this config: loads the packed base from its `base/`
and the adapters of the newest checkpoint in `config.workdir/checkpoints` (the initial
adapters if there is none; `--noadapters`: the quantized base alone). Adapters are applied on the
fly (exact). `--merge` instead re-quantizes W + (alpha / rank) A B with the run's QuantConfig (for
LowRA the same bit budget), generates with that adapter-free model, and prints the perplexity of
both on `config.eval_data` (capped by `config.train.eval_blocks`). One prompt streams its tokens
to stdout; several are generated as one left-padded batch and printed in order. Up to 4 prompts
on a GPU decode from the base in the word layout (`generate.decode_layout`: faster at batch 1).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from lowra_jax import base, cli, lora, preflight, run_config, train_lib
from lowra_jax import generate as gen
from lowra_jax.checkpoint import latest_adapters
from lowra_jax.quantize import bits_per_param

_CONFIG = config_flags.DEFINE_config_file("config", None, "ml_collections config file.")
_PROMPT = flags.DEFINE_multi_string("prompt", [""], "Prompt text; repeat for a batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "New tokens per prompt (at most).")
_MAX_LEN = flags.DEFINE_integer("max_len", 0, "KV-cache slots per row (0: prompt + new tokens).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; else sampling temperature.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
_ADAPTERS = flags.DEFINE_bool("adapters", True, "Apply the run's adapters (else the base alone).")
_MERGE = flags.DEFINE_bool(
  "merge", False, "Re-quantize W + AB with the run's QuantConfig; report perplexity vs unmerged."
)
flags.mark_flags_as_required(["config"])


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def perplexities(model, config, s, prep, runs) -> list[tuple[str, float]]:
  """[(name, perplexity on config.eval_data)] of each (name, variables, adapters) of `runs`."""
  blocks = preflight.load_blocks("eval_data", s.eval_data, prep.tokenizer)
  if config.train.eval_blocks:
    blocks = blocks[: config.train.eval_blocks]
  step = train_lib.make_eval_step(model)
  batch = s.eval_data.batch_size
  return [
    (name, float(np.exp(train_lib.mean_loss(step, variables, adapters, blocks, batch)[0])))
    for name, variables, adapters in runs
  ]


def merged_model(model, config, s, prep, adapters) -> dict:
  """Variables of the re-quantized W + AB; prints its perplexity next to the unmerged model's."""
  qparams = lora.merge_trees(prep.frozen["params"], prep.frozen["quant"])
  t0 = time.perf_counter()
  h = base.saved_moments(config)
  merged, _ = lora.requantize_merged(qparams, adapters, s.lora, s.quant, importance=h)
  log(f"re-quantized W + AB in {time.perf_counter() - t0:.1f} s")
  frozen, quant = lora.split_quantized(merged)
  variables = {"params": frozen, "quant": quant}
  rows = perplexities(
    model,
    config,
    s,
    prep,
    [
      ("(a) base + adapters (unmerged, exact)", prep.frozen, adapters),
      ("(b) merged", variables, None),
    ],
  )
  bits = [bits_per_param(prep.frozen["quant"]), bits_per_param(quant)]
  print(f"perplexity on {s.eval_data.path} ({s.eval_data.split}):")
  print("| model | code bits | total bits | perplexity |")
  print("|---|---|---|---|")
  for (name, ppl), b in zip(rows, bits):
    print(f"| {name} | {b.code:.3f} | {b.total:.3f} | {ppl:.3f} |")
  print(f"merging costs {100 * (rows[1][1] / rows[0][1] - 1):+.2f}% perplexity\n", flush=True)
  return variables


def streamer(tokenizer, prompt: list[int]):
  """on_token callback printing one row's text as it grows."""
  ids, shown = list(prompt), [tokenizer.decode(prompt)]

  def on_token(tokens: np.ndarray, live: np.ndarray) -> None:
    if live[0] and tokens[0] != tokenizer.eos_id:
      ids.append(int(tokens[0]))
      text = tokenizer.decode(ids)
      print(text[len(shown[0]) :], end="", flush=True)
      shown[0] = text

  return on_token


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  s = run_config.settings(config)
  with cli.user_errors():
    sampling = gen.Sampling(_TEMPERATURE.value, _TOP_P.value)
  if _MERGE.value and not _ADAPTERS.value:
    raise cli.UserError("--merge folds the adapters into the base — drop --noadapters")
  inputs = preflight.check_model(config, s)
  prompts = [inputs.tokenizer.encode(text) for text in _PROMPT.value]
  with cli.user_errors():
    gen.layout(prompts, _MAX_NEW.value, _MAX_LEN.value or None, inputs.hf_config["vocab_size"])
  if _MERGE.value:
    preflight.check_data(("eval_data", s.eval_data))
  base_dir = preflight.check_saved_run(config, "generate.py")
  prep = base.prepare(config, s, inputs.tokenizer, base_dir)
  model = prep.model.clone(remat=False)
  tok = prep.tokenizer
  adapters = None
  if _ADAPTERS.value:
    trained = latest_adapters(
      Path(config.workdir) / "checkpoints", prep.adapters, train_lib.make_optimizer(s.optim)
    )
    adapters, step = trained if trained is not None else (prep.adapters, 0)
    log(f"adapters of step {step}" + (" (initial)" if trained is None else ""))
  if _MERGE.value:
    variables = merged_model(model, config, s, prep, adapters)
  else:
    variables = prep.frozen if adapters is None else {**prep.frozen, "lora": adapters}
  variables = gen.decode_layout(variables, len(prompts))
  on_token = streamer(tok, prompts[0]) if len(prompts) == 1 else None
  if on_token is not None:
    print(tok.decode(prompts[0]), end="", flush=True)
  t0 = time.perf_counter()
  out = gen.generate(
    model,
    variables,
    prompts,
    max_new_tokens=_MAX_NEW.value,
    sampling=sampling,
    key=jax.random.key(_SEED.value),
    eos_id=tok.eos_id,
    max_len=_MAX_LEN.value or None,
    on_token=on_token,
  )
  seconds = time.perf_counter() - t0
  if on_token is not None:
    print()
  else:
    for prompt, new in zip(prompts, out):
      print(tok.decode(prompt + new) + "\n" + "-" * 40)
  n = sum(len(row) for row in out)
  log(f"{n} new tokens in {seconds:.1f} s, compilation included")


if __name__ == "__main__":
  cli.run(main)
