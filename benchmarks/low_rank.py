"""LoftQ's rank-r factorisation of one residual per kernel shape: exact SVD vs subspace iteration.

    python benchmarks/low_rank.py                        # 7B and 70B kernel shapes, rank 16
    python benchmarks/low_rank.py --shapes=4096x11008 --exact_max=0

For each shape, a residual of Student-t(5) weights minus their rounding to 4 levels (float32, on
the device) is factorised by `loftq.exact_low_rank` (skipped where the smaller side exceeds
--exact_max) and `loftq.randomized_low_rank`; prints seconds (after a compiling call) and each
one's squared error relative to the exact one's. What LoftQ uses per shape is `loftq.low_rank`'s
rule (`EXACT_SVD_MAX`).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from lowra_jax import cli, loftq


def kernel_shape(text: str) -> tuple[int, int]:
  """'KxN' -> (K, N)."""
  k, n = text.split("x")
  return int(k), int(n)


kernel_shape.__name__ = "KxN shape"


def residual(k: int, n: int) -> jax.Array:
  w = jax.random.t(jax.random.key(0), 5.0, (k, n), jnp.float32)
  step = jnp.std(w) / 2
  return w - jnp.clip(jnp.round(w / step - 0.5) + 0.5, -1.5, 1.5) * step


def timed(fn, *args) -> tuple[float, tuple]:
  jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,8192x28672")
  parser.add_argument("--rank", type=int, default=16)
  parser.add_argument("--exact_max", type=int, default=8192, help="skip larger exact SVDs")
  args = parser.parse_args()
  shapes = cli.parse_list(args.shapes, "--shapes", convert=kernel_shape)
  sq_err = jax.jit(lambda r, a, b: jnp.sum(jnp.square(r - a @ b)))
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, rank {args.rank}", flush=True)
  rows = []
  for k, n in shapes:
    r = residual(k, n)
    fast_s, (a, b) = timed(loftq.randomized_low_rank, r, args.rank)
    fast = float(sq_err(r, a, b))
    exact_s, exact = None, None
    if min(k, n) <= args.exact_max:
      exact_s, (a, b) = timed(loftq.exact_low_rank, r, args.rank)
      exact = float(sq_err(r, a, b))
    rows.append((k, n, exact_s, fast_s, None if exact is None else fast / exact))
    print(rows[-1], flush=True)
  print("\n| shape | exact SVD s | randomized s | speed-up | randomized sq. error / exact's |")
  print("|---|---|---|---|---|")
  for k, n, exact_s, fast_s, ratio in rows:
    e = "-" if exact_s is None else f"{exact_s:.3f}"
    up = "-" if exact_s is None else f"{exact_s / fast_s:.0f}x"
    print(f"| {k}x{n} | {e} | {fast_s:.4f} | {up} | {'-' if ratio is None else f'{ratio:.5f}'} |")


if __name__ == "__main__":
  cli.guard(main)
