"""Config files build valid settings."""

import importlib.util
from pathlib import Path

import pytest

from lowra_jax import quantize

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_config_builds_a_valid_quant_config(path, arg):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  cfg = quantize.QuantConfig(**config.quant.to_dict())
  assert cfg.method in ("nf", "lloyd", "lowra")
  root = Path(__file__).resolve().parents[1]
  assert (root / config.model_path).exists() or not (root / ".." / "shared").exists()
