"""benchmarks/generate.py: the decode targets judged from its rows (no decoding here)."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling modules (synthetic, kernels, ...)
spec = importlib.util.spec_from_file_location("generate_bench", ROOT / "benchmarks" / "generate.py")
gb = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gb)


def row(method, batch, tokens_per_s, layers=32, tiled=False, shape="7b", sync=1):
  return {
    "method": method, "batch": batch, "tokens_per_s": tokens_per_s, "steps_per_sync": sync,
    "layers": layers, "tiled": tiled, "shape": shape,
  }  # fmt: skip


def test_targets_are_judged_against_bf16_at_the_same_batch():
  rows = [
    row("bf16", 1, 100.0), row("bf16", 8, 1000.0), row("bf16", 32, 4000.0),
    row("lowra2 (fused)", 1, 360.0),  # 3.6x >= 3.5x
    row("lowra1.5 (fused)", 1, 390.0),  # 3.9x < 4x
    row("nf4 (fused)", 1, 250.0),  # 2.5x >= 2.5x
    row("lowra2", 8, 2900.0),  # 2.9x < 3x
    row("lowra1.5", 32, 6000.0),  # 1.5x >= 1.5x
    row("nf4", 8, 9000.0),  # no target for NF4 above batch 1
    row("lowra2", 4, 9000.0),  # no target at batch 4
  ]  # fmt: skip
  got = {(m, b): (goal, ratio, met) for m, b, goal, ratio, met in gb.targets(rows)}
  assert got == {
    ("lowra2 (fused)", 1): (3.5, pytest.approx(3.6), True),
    ("lowra1.5 (fused)", 1): (4.0, pytest.approx(3.9), False),
    ("nf4 (fused)", 1): (2.5, pytest.approx(2.5), True),
    ("lowra2", 8): (3.0, pytest.approx(2.9), False),
    ("lowra1.5", 32): (1.5, pytest.approx(1.5), True),
  }
  assert "| lowra1.5 (fused) | 1 | >= 4x | 3.90x | **no** |" in gb.targets_table(rows)


@pytest.mark.parametrize(
  "other",
  [dict(layers=8), dict(tiled=True), dict(shape="tiny"), dict(sync=8), dict(layers=None)],
)
def test_only_whole_untiled_7b_runs_at_one_step_a_sync_are_judged(other):
  sync = other.get("sync", 1)
  rows = [row("bf16", 1, 100.0, sync=sync), row("lowra2 (fused)", 1, 400.0, **other)]
  if other.get("layers", 32) is None:
    del rows[1]["layers"]  # rows written before the layer count was recorded
  assert gb.targets(rows) == [] and gb.targets_table(rows) == ""
