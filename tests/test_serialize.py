"""Saved quantized params load back identical (every array, every static field)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowra_jax import quantize
from lowra_jax.quantize.serialize import load_quantized, save_quantized


@pytest.mark.parametrize(
  "config",
  [
    quantize.QuantConfig(method="nf", bits=4),
    quantize.QuantConfig(method="lowra", budget=1.5, lut_clusters=4),
    quantize.QuantConfig(method="lloyd", bits=2, double_quant=False),
  ],
  ids=["nf4", "lowra_shared", "lloyd_plain"],
)
def test_round_trip(tmp_path, config):
  rng = np.random.default_rng(0)
  params = {
    "model": {
      "a": {"kernel": (rng.standard_normal((128, 80)) * 0.02).astype(jnp.bfloat16)},
      "b": {"kernel": (rng.standard_normal((72, 48)) * 0.02).astype(np.float32)},
      "norm": {"scale": np.ones(80, np.float32)},
    }
  }
  qparams, _ = quantize.quantize_params(params, config, progress=False)
  save_quantized(tmp_path / "base", qparams, extra={"note": [1, 2]})
  loaded, extra = load_quantized(tmp_path / "base")
  assert extra == {"note": [1, 2]}
  assert jax.tree.structure(loaded) == jax.tree.structure(qparams)  # static fields included
  chex.assert_trees_all_equal(jax.device_get(loaded), jax.device_get(qparams))
  with pytest.raises(FileExistsError):
    save_quantized(tmp_path / "base", qparams)


def test_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="tree.json missing"):
    load_quantized(tmp_path)
