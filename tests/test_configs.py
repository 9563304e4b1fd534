"""Every config file builds valid settings that point at existing material, and sets every field of
every section's dataclass."""

import dataclasses
import importlib.util
import typing
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from lowra_jax import run_config
from lowra_jax.models import shapes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common"))
SECTIONS = typing.get_type_hints(run_config.Settings)  # {section: its dataclass}


def load(path: Path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_the_issue_configs_exist():
  names = {p.stem for p in CONFIGS}
  assert {
    "llama_1p5bit",
    "llama_2bit",
    "llama_2p5bit",
    "qlora_nf4",
    "qlora_nf2",
    "loftq_nf2",
    "lora_bf16",
  } <= names
  assert "demo" in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_builds_valid_settings(path):
  config = load(path)
  s = run_config.settings(config)
  assert s.quant.method in ("nf", "lloyd", "lowra", "none")
  assert config.workdir.endswith(path.stem)
  if (ROOT / ".." / "shared").exists():
    assert (ROOT / config.model.path).exists() and (ROOT / config.data.path).exists()


def test_lowra_configs_leave_4bit_channels_out_up_to_2_bits():
  """Up to 2 bits the LowRA configs decode without 4-bit channels; above, without 1-bit ones:
  {2, 4}, or {2, 3, 4} where a config asks for 3-bit channels."""
  want = {
    "demo": (1, 2),
    "llama_1p5bit": (1, 2),
    "llama_2bit": (1, 2),
    "llama_2p5bit": (2, 3, 4),
  }
  for name, precisions in want.items():
    assert tuple(load(ROOT / "configs" / f"{name}.py").quant.precisions) == precisions, name
  from configs.common import lowra_config

  assert tuple(lowra_config(3.0).quant.precisions) == (2, 4)


def test_lowra_configs_refit_levels_below_2_bits_only():
  """The refitted levels help fine-tuning below 2 bits and hurt from 2 up (docs/results.md)."""
  want = {"demo": True, "llama_1p5bit": True, "llama_2bit": False, "llama_2p5bit": False}
  for name, refit in want.items():
    config = load(ROOT / "configs" / f"{name}.py")
    assert config.quant.refit is refit and config.quant.rounding == "gptq", name
    assert config.quant.bucket_sizes == "shape", name


def test_lowra_configs_round_by_gptq_below_4_bits_only():
  """GPTQ's feedback helps fine-tuning up to 2.5 bits and hurts at 4 (docs/results.md)."""
  from configs.common import lowra_config

  assert [lowra_config(b).quant.rounding for b in (1.15, 2.5, 3.0, 4.0)] == [
    "gptq", "gptq", "gptq", "nearest"
  ]
  run_config.settings(lowra_config(4.0))  # valid: nearest rounding, calibration, weighted LoftQ


def test_lowra_configs_weigh_by_output_gradients_where_precisions_differ():
  """Fisher weighting helps fine-tuning below 2 bits ({1, 2}) and between 2 and 4 ({2, 4});
  at exactly 2 bits and from 4 every channel has one precision, and "kernel" saves the backward
  (docs/results.md)."""
  want = {"demo": "fisher", "llama_1p5bit": "fisher", "llama_2bit": "kernel"}
  want["llama_2p5bit"] = "fisher"
  for name, calibration in want.items():
    config = load(ROOT / "configs" / f"{name}.py")
    assert config.quant.calibration == calibration, name
    assert config.lora.loftq_weighting == "inputs", name
  from configs.common import lowra_config

  for budget, calibration in [(1.15, "fisher"), (2.0, "kernel"), (3.0, "fisher"), (4.0, "kernel")]:
    assert lowra_config(budget).quant.calibration == calibration, budget


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_sections_hold_exactly_their_dataclass_fields(path):
  config = load(path)
  assert set(config) == {"workdir", *SECTIONS}
  for section, cls in SECTIONS.items():
    assert set(config[section]) == {f.name for f in dataclasses.fields(cls)}, section


def test_command_line_overrides_reach_the_dataclasses():
  """Fields the configs once left out, a None default (a typed placeholder) and tuples."""
  argv = [
    "train.py",
    f"--config={ROOT / 'configs' / 'llama_1p5bit.py'}",
    "--config.quant.dq_block=128",
    "--config.quant.skip_patterns=('embed', 'norm')",
    "--config.optim.b2=0.99",
    "--config.data.max_documents=7",
    "--config.lora.targets=('q_proj',)",
    "--config.model.remat=True",
    "--config.train.keep=1",
  ]
  parsed = flags.FlagValues()
  config = config_flags.DEFINE_config_file("config", flag_values=parsed, sys_argv=argv)
  parsed(argv)
  s = run_config.settings(config.value)
  assert (s.quant.dq_block, s.quant.skip_patterns) == (128, ("embed", "norm"))
  assert (s.optim.b2, s.data.max_documents, s.lora.targets) == (0.99, 7, ("q_proj",))
  assert s.model.remat and s.train.keep == 1


def test_typos_and_bad_values_are_one_line_errors():
  config = load(ROOT / "configs" / "llama_1p5bit.py")
  with pytest.raises(AttributeError):
    config.lora.rnak = 4  # locked: unknown keys are refused
  bad = load(ROOT / "configs" / "llama_1p5bit.py")
  bad.quant.budget = 0.5  # an existing key: allowed by the lock, refused by QuantConfig
  with pytest.raises(ValueError, match=r"^config\.quant: .*budget"):
    run_config.settings(bad)
  bad = load(ROOT / "configs" / "llama_1p5bit.py")
  bad.optim.warmup_steps = 10**6
  with pytest.raises(ValueError, match=r"^config\.optim: .*warmup_steps"):
    run_config.settings(bad)
  bad = load(ROOT / "configs" / "llama_1p5bit.py")
  bad.model.dtype = "float16"
  with pytest.raises(ValueError, match=r"^config\.model: dtype='float16' — use one of"):
    run_config.settings(bad)
  bad = load(ROOT / "configs" / "llama_1p5bit.py")
  bad.train.log_every = 0
  with pytest.raises(ValueError, match=r"^config\.train: log_every=0 — "):
    run_config.settings(bad)


def test_remat_by_model_size_unless_set():
  small, large = shapes.SHAPES["1b"], shapes.SHAPES["7b"]
  small = dataclasses.replace(small, num_layers=1)  # ~0.2B parameters
  auto = run_config.ModelConfig(path="m")
  assert small.num_params < run_config.REMAT_FROM_PARAMS <= large.num_params
  assert not auto.remat_for(small) and auto.remat_for(large)
  for remat in (True, False):
    forced = run_config.ModelConfig(path="m", remat=remat)
    assert forced.remat_for(small) is remat and forced.remat_for(large) is remat
  assert run_config.settings(load(ROOT / "configs" / "llama_1p5bit.py")).model.remat is None
