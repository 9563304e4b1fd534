"""benchmarks/sweep.py: the grid is the issue's, and every row's command builds valid settings."""

import contextlib
import importlib.util
import json
import shlex
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from lowra_jax import run_config
from lowra_jax.quantize import QuantConfig

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("sweep", ROOT / "benchmarks" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules["sweep"] = sweep
spec.loader.exec_module(sweep)


def test_grid_covers_methods_budgets_and_seeds():
  rows = sweep.rows()
  keys = {r.key for r in rows}
  assert len(keys) == len(rows)
  for task in sweep.TASKS:
    for b in (4, 3, 2.5, 2.25, 2.0, 1.75, 1.5, 1.25, 1.15):
      for m in ("lowra_loftq", "lowra_qlora"):
        assert sweep.Row(task, m, b, 0) in rows
    assert {r.bits for r in rows if (r.task, r.method) == (task, "qlora")} == {4, 3, 2}
    seeds = {(r.method, r.bits): set() for r in rows if r.task == task}
    for r in rows:
      if r.task == task:
        seeds[(r.method, r.bits)].add(r.seed)
    for (method, bits), s in seeds.items():
      assert s == ({0, 1, 2} if bits in (2, 1.5) else {0}), (method, bits)


@pytest.mark.parametrize(
  ("bits", "layers", "expected"),
  [(2.5, 8, (2, 2)), (2.25, 8, (2, 1)), (3, 8, (3, 0)), (2.5, 5, (2, 1))],
)
def test_loftq_mixed_precision_rounds_to_whole_layers(bits, layers, expected):
  assert sweep.loftq_layer_bits(bits, layers) == expected


def _settings(row) -> dict:
  """The row's train.py flags parsed by absl + ml_collections as train.py parses them (its
  DEFINE_config_file, here on a FlagValues of its own and this argv instead of the process's)."""
  cmd = sweep.train_command(row, "../shared/data", Path("runs/x"))
  assert cmd[:2] == ["python", "train.py"], cmd
  argv = ["train.py", *cmd[2:]]
  flag_values = flags.FlagValues()
  with contextlib.chdir(ROOT):
    # Like the global DEFINE in train.py, which reads sys.argv for the config's override flags.
    holder = config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    s = run_config.settings(holder.value)
    out = {
      "quant": s.quant.__dict__,
      "init": s.lora.init,
      "data": s.data.name,
      "model": holder.value.model.path,
      "train": holder.value.train.to_dict(),
    }
  return json.loads(json.dumps(out))  # as the values would come out of a child process


# ml_collections loads the config file with importlib's deprecated load_module (as in train.py).
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
@pytest.mark.parametrize(
  "key",
  [
    "pycode-loftq-2.5-s0",
    "stories-lowra_qlora-1.15-s0",
    "pycode-lowra_loftq-2.5-s0",
    "pycode-lora_bf16-16-s0",
  ],
)
def test_row_commands_build_valid_settings(key):
  row = next(r for r in sweep.rows() if r.key == key)
  s = _settings(row)
  quant = QuantConfig(
    **{
      k: tuple(map(tuple, v)) if k == "layer_bits" else v
      for k, v in s["quant"].items()
      if k != "precisions"
    }
  )
  if row.method == "loftq":
    assert quant.method == "nf" and quant.bits == 2 and s["init"] == "loftq"
    assert quant.bits_for("model/layers/1/mlp/up_proj/kernel") == 4
    assert quant.bits_for("model/layers/2/mlp/up_proj/kernel") == 2
  elif row.method == "lowra_qlora":
    assert quant.budget == 1.15 and s["init"] == "qlora" and quant.refit
    assert quant.calibration == "fisher"
    assert tuple(s["quant"]["precisions"]) == (1, 2)
    assert s["data"] == "wikitext" and s["model"].endswith("stories260K.bin")
  elif row.method == "lowra_loftq":  # the LowRA configs' settings at 2.5 bits, not at 1.5
    assert quant.budget == 2.5 and s["init"] == "loftq" and not quant.refit
    assert quant.calibration == "fisher"
    assert tuple(s["quant"]["precisions"]) == (2, 4)
  else:
    assert quant.method == "none"
  assert s["train"]["eval_blocks"] == 0 and s["train"]["resume"]
  assert shlex.split(shlex.join(sweep.train_command(row, "d", Path("w")))) == sweep.train_command(
    row, "d", Path("w")
  )


def test_extra_flags_replace_the_rows_own():
  """A flag in --extra that the row already sets replaces it (given twice, ml_collections would
  join the two tuples)."""
  row = next(r for r in sweep.rows() if r.key == "pycode-lowra_loftq-2.5-s0")
  plain = sweep.train_command(row, "d", Path("w"))
  extra = ("--config.quant.precisions=(1,2,3,4)", "--config.lora.rank=8")
  cmd = sweep.train_command(row, "d", Path("w"), extra)
  assert [a for a in cmd if a.startswith("--config.quant.precisions")] == [extra[0]]
  assert cmd == [a for a in plain if not a.startswith("--config.quant.precisions=")] + list(extra)


def test_tinystories_eval_keeps_what_the_base_was_made_with():
  """eval.py must rebuild the same quantized base as train.py did (seed included), with its own
  evaluation text and block count."""
  row = next(r for r in sweep.rows() if r.key == "stories-lowra_loftq-1.5-s2")
  train = sweep.train_command(row, "d", Path("w"))
  ev = sweep.tinystories_command(train, "d")
  kept = [a for a in train[2:] if not a.startswith(("--config.eval_data", "--config.train.e"))]
  assert ev[:2] == ["python", "eval.py"] and "--config.train.seed=2" in ev
  assert [a for a in ev if a in kept] == [a for a in kept if a != "--config.train.resume=True"]
  assert "--config.eval_data.path=d/tinystories/tinystories_val.txt" in ev
  assert "--config.train.eval_blocks=128" in ev and "--config.train.resume=True" not in ev
