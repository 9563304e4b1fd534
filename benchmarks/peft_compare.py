"""Cross-check our NF-k quantizer and LoftQ initialisation against peft's on the same weights.

Needs torch, peft and bitsandbytes (peft 0.21's loftq_init requires bitsandbytes; the GPU image
lacks it, so carry its wheel). bitsandbytes' NF4 uses absmax per block of 64 of the row-major
[out, in] weight -- the same blocks as ours when in_features is a multiple of 64. Ours runs with
double_quant=False to match.

    python benchmarks/peft_compare.py --model=<pycode-llama-17m dir> [--layers=0,7] [--rank=16]

Prints, over the q/k/v/o/gate/up/down kernels of the chosen layers:
  * NF4 quantize/dequantize vs bitsandbytes: relative error of each, share of identical
    reconstructed weights, max |ours - bnb| / max |W|;
  * LoftQ at 4 and 2 bits: ||W - Q - B A||_F / ||W||_F after T = 1, 2, 5 rounds (peft:
    loftq_init; ours: lowra_jax.loftq with scale 1, i.e. alpha = rank). Failures of the peer
    (e.g. a bit width it does not support) are printed as such.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from lowra_jax import cli, loftq
from lowra_jax.models import weights
from lowra_jax.quantize import QuantConfig, quantize_and_dequantize

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def kernels(model: str, layers: list[str]) -> dict[tuple[str, ...], np.ndarray]:
  """{module path: float32 kernel [in, out]} for the projections of `layers`.

  `model`: an HF model dir, or an .npz written by --save (to carry less to a GPU machine).
  """
  if model.endswith(".npz"):
    with np.load(model) as f:
      return {tuple(k.split("/")): f[k] for k in f.files}
  _, state = weights.read_hf_checkpoint(model)
  tree = weights.to_kernel_tree(state)
  out = {}
  for i in layers:
    layer = tree["model"]["layers"][i]
    for block in ("self_attn", "mlp"):
      for name in PROJ:
        if name in layer[block]:
          out[("model", "layers", i, block, name)] = np.asarray(
            layer[block][name]["kernel"], np.float32
          )
  return out


def check_model(model: str, layers: str) -> list[str]:
  """The decoder layers `layers` of --model, checked against its config (an .npz has its own)."""
  if model.endswith(".npz"):
    cli.existing("--model", model, "pass an HF model directory or an .npz written by --save")
    return []
  with cli.user_errors("--model: "):
    config, _ = weights.inspect_hf_checkpoint(model)
  return cli.parse_list(layers, "--layers", [str(i) for i in range(config["num_hidden_layers"])])


def rel(num: float, den: float) -> float:
  return float(np.sqrt(num / den))


def compare_nf4(ws) -> dict[str, float]:
  """Our NF4 (no double quantization) vs bitsandbytes' quantize_4bit(nf4, blocksize 64)."""
  import bitsandbytes.functional as bnbf
  import torch

  params = {"/".join(p): {"kernel": w} for p, w in ws.items()}
  config = QuantConfig(method="nf", bits=4, double_quant=False)
  _, dense, _ = quantize_and_dequantize(params, config, progress=False)
  err_ours = err_peer = norm = same = total = 0.0
  max_diff = 0.0
  for p, w in ws.items():
    ours = np.asarray(dense["/".join(p)]["kernel"], np.float64)
    wt = torch.from_numpy(w.T.copy()).cuda()
    packed, state = bnbf.quantize_4bit(
      wt, blocksize=64, quant_type="nf4", compress_statistics=False
    )
    theirs = bnbf.dequantize_4bit(packed, state).double().cpu().numpy().T
    err_ours += np.sum((w - ours) ** 2)
    err_peer += np.sum((w - theirs) ** 2)
    norm += np.sum(w.astype(np.float64) ** 2)
    same += np.sum(np.isclose(ours, theirs, rtol=1e-6, atol=0))
    total += w.size
    max_diff = max(max_diff, np.abs(ours - theirs).max() / np.abs(w).max())
  return {
    "err_ours": rel(err_ours, norm),
    "err_peer": rel(err_peer, norm),
    "identical": same / total,
    "max_diff": max_diff,
  }


def compare_loftq(ws, bits: int, rank: int, iters: int) -> dict[str, float]:
  """||W - Q - BA|| / ||W|| after `iters` LoftQ rounds, ours and peft's."""
  import torch
  from peft.utils import loftq_utils

  norm = sum(np.sum(w.astype(np.float64) ** 2) for w in ws.values())
  err_peft = 0.0
  for w in ws.values():
    wt = torch.from_numpy(w.T.copy()).cuda()
    deq, lora_a, lora_b = loftq_utils.loftq_init(
      wt, num_bits=bits, reduced_rank=rank, num_iter=iters
    )
    approx = (deq.float() + lora_b.float() @ lora_a.float()).double().cpu().numpy()
    err_peft += np.sum((w.T.astype(np.float64) - approx) ** 2)
  params = {}
  for p, w in ws.items():
    node = params
    for part in p:
      node = node.setdefault(part, {})
    node["kernel"] = w
  config = QuantConfig(method="nf", bits=bits, double_quant=False)
  _, _, report = loftq.loftq(
    params, config, targets=sorted(ws), rank=rank, scale=1.0, iters=iters, progress=False
  )
  return {"ours": report.errors[-1], "peft": rel(err_peft, norm), "qlora": report.quant_error}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True)
  parser.add_argument("--layers", default="0,7")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--save", help="write the selected kernels to this .npz and stop")
  args = parser.parse_args()
  layers = check_model(args.model, args.layers)
  cli.positive("--rank", args.rank)
  if args.save:
    path = cli.output_file("--save", args.save)
    np.savez(path, **{"/".join(p): w for p, w in kernels(args.model, layers).items()})
    return
  cli.require_modules("peft_compare.py", "torch", "peft", "bitsandbytes")
  ws = kernels(args.model, layers)
  print(
    f"{len(ws)} kernels, {sum(w.size for w in ws.values()) / 1e6:.2f}M weights; jax {jax.__version__}"
  )
  rows = []
  try:
    nf = compare_nf4(ws)
    rows.append(
      f"NF4 quantize/dequantize vs bitsandbytes | ours {nf['err_ours']:.4f} | "
      f"bnb {nf['err_peer']:.4f} | identical {100 * nf['identical']:.2f}% | "
      f"max diff {nf['max_diff']:.2e} of max|W|"
    )
  except Exception as e:  # noqa: BLE001 - report what the peer refuses and go on
    rows.append(f"NF4 vs bitsandbytes failed: {type(e).__name__}: {e}"[:300])
  for bits in (4, 2):
    for iters in (1, 2, 5):
      try:
        lq = compare_loftq(ws, bits, args.rank, iters)
      except Exception as e:  # noqa: BLE001 - report what peft refuses and go on
        rows.append(f"NF{bits} LoftQ T={iters}: peft failed: {type(e).__name__}: {e}"[:300])
        continue
      rows.append(
        f"NF{bits} LoftQ r={args.rank} T={iters} | ours {lq['ours']:.4f} | peft {lq['peft']:.4f} | "
        f"(quantization only {lq['qlora']:.4f})"
      )
  print("\n".join(rows))


if __name__ == "__main__":
  cli.guard(main)
