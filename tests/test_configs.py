"""Every config file builds valid settings that point at existing material."""

import importlib.util
from pathlib import Path

import pytest

from lowra_jax import experiment

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.py") if p.stem not in ("__init__", "common"))


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
  s = experiment.settings(config)
  assert s.quant.method in ("nf", "lloyd", "lowra", "none")
  assert config.workdir.endswith(path.stem)
  if (ROOT / ".." / "shared").exists():
    assert (ROOT / config.model.path).exists() and (ROOT / config.data.path).exists()


def test_typos_and_bad_values_are_one_line_errors():
  config = load(ROOT / "configs" / "llama_1p5bit.py")
  with pytest.raises(AttributeError):
    config.lora.rnak = 4  # locked: unknown keys are refused
  bad = load(ROOT / "configs" / "llama_1p5bit.py")
  bad.quant.budget = 0.5  # an existing key: allowed by the lock, refused by QuantConfig
  with pytest.raises(ValueError, match=r"^config\.quant: .*budget"):
    experiment.settings(bad)
  bad = load(ROOT / "configs" / "llama_1p5bit.py")
  bad.optim.warmup_steps = 10**6
  with pytest.raises(ValueError, match=r"^config\.optim: .*warmup_steps"):
    experiment.settings(bad)
