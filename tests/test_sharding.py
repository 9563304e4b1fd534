"""Data parallelism + FSDP on 8 CPU devices (tests/conftest.py): mesh and batch errors, packed
tensors gathered packed and ~1/n of them per device, the kernels per shard, the sharded training
step against the single-device step, and checkpoints restored on other device counts.

References are always the unsharded computation on one device.
"""

import dataclasses
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from test_configs import ROOT
from test_configs import load as load_config
from tiny_model import CONFIG, tiny_model

from lowra_jax import experiment, sharding, train_lib
from lowra_jax.checkpoint import TrainCheckpoints
from lowra_jax.quantize import QuantConfig, quantize_params
from pallas_kernels import quantized_matmul

LOWRA = QuantConfig(method="lowra", budget=1.5)  # mixed 1/2/4-bit buckets of different widths


@pytest.fixture(scope="module", autouse=True)
def eight_devices():
  assert jax.device_count() == 8, "tests/conftest.py should have given this process 8 devices"


def mesh_of(data, fsdp, devices=None):
  cfg = sharding.MeshConfig(data=data, fsdp=fsdp, min_shard_bytes=0)
  return cfg, sharding.make_mesh(cfg, devices)


def place(tree, mesh, cfg):
  return jax.device_put(tree, sharding.tree_shardings(tree, mesh, cfg))


def test_mesh_axes_and_errors():
  assert sharding.MeshConfig().axis_sizes(8) == (8, 1)
  assert sharding.MeshConfig(data=1, fsdp=-1).axis_sizes(8) == (1, 8)
  assert sharding.MeshConfig(data=2, fsdp=-1).axis_sizes(8) == (2, 4)
  assert dict(sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1)).shape) == {
    "data": 1,
    "fsdp": 8,
  }
  with pytest.raises(ValueError, match="does not divide the 8 devices"):
    sharding.MeshConfig(data=3).axis_sizes(8)
  with pytest.raises(ValueError, match="= 4 devices, but there are 8"):
    sharding.MeshConfig(data=2, fsdp=2).axis_sizes(8)
  with pytest.raises(ValueError, match="-1 for one of them"):
    sharding.MeshConfig(data=-1, fsdp=-1)
  config = load_config(ROOT / "configs" / "demo.py")
  config.mesh.data = 3
  with pytest.raises(
    ValueError, match=r"^config\.mesh: mesh data=3 x fsdp=1 does not divide the 8"
  ):
    experiment.make_mesh(experiment.settings(config))
  _, mesh = mesh_of(2, 4)
  with pytest.raises(ValueError, match="batch_size=6 does not split over data x fsdp = 8"):
    sharding.put_batch({"inputs": np.zeros((6, 4), np.int32)}, mesh)
  padded = sharding.put_batch({"targets": np.ones((6, 4), np.int32)}, mesh, pad=True)
  assert padded["targets"].shape == (8, 4) and float(padded["mask"].sum()) == 24


@pytest.fixture(scope="module")
def kernels():
  """Two LowRA-quantized kernels with a realistic K (codes dominate the tables)."""
  rng = np.random.default_rng(0)
  params = {
    name: {"kernel": rng.standard_normal(shape).astype(np.float32)}
    for name, shape in (("up", (2048, 128)), ("down", (1024, 256)))
  }
  qparams, _ = quantize_params(params, LOWRA, progress=False)
  assert all(len(q["kernel"].buckets) > 1 for q in qparams.values())
  return qparams


def gathered(hlo: str) -> list[tuple[str, int]]:
  """(dtype, bytes) of every all-gather result in compiled HLO text."""
  sizes = {"u8": 1, "s8": 1, "s16": 2, "f16": 2, "bf16": 2, "f32": 4, "s32": 4}
  out = []
  for dtype, dims in re.findall(r"= (\w+)\[([\d,]*)\]\{[^}]*\} all-gather\(", hlo):
    out.append((dtype, sizes[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))))
  return out


def test_fsdp_packed_base_per_device_memory_and_packed_gathers(kernels):
  """XLA's compiled memory analysis: per-device bytes of the packed base ~ 1/8 under fsdp=8;
  the program gathers packed planes (u8) and int8 scales, never a dequantized weight."""
  total = sum(x.nbytes for x in jax.tree.leaves(kernels))
  x = np.ones((16, 2048), np.float32)

  def forward(x, q):
    return quantized_matmul(x, q["up"]["kernel"]), quantized_matmul(
      x[:, :1024], q["down"]["kernel"]
    )

  args = {}
  for data, fsdp in ((8, 1), (1, 8)):
    cfg, mesh = mesh_of(data, fsdp)
    q = place(kernels, mesh, cfg)
    with jax.set_mesh(mesh):
      compiled = jax.jit(forward).lower(sharding.put_batch({"x": x}, mesh)["x"], q).compile()
    args[fsdp] = compiled.memory_analysis().argument_size_in_bytes - x.nbytes // 8
    hlo = compiled.as_text()
  assert args[1] == total
  # ~1/8: what stays whole is per-channel tables of buckets whose width does not divide by 8
  # (2% of these bytes; less at larger K) and the double-quant offsets.
  assert total / 8 <= args[8] < 1.2 * total / 8, (args, total)
  gathers = gathered(hlo)
  assert max(gathers, key=lambda g: g[1])[0] == "u8"  # the biggest gathers are packed planes
  assert sum(b for _, b in gathers) <= total  # nothing dequantized is gathered


def test_kernels_run_per_shard_and_match_one_device():
  """Pallas kernels (interpret mode) under shard_map on 8 devices: forward and dX equal the
  unsharded call."""
  w = np.random.default_rng(0).standard_normal((256, 128)).astype(np.float32)
  qt = quantize_params({"w": w}, LOWRA, progress=False)[0]["w"]
  assert len(qt.buckets) > 1
  x = jnp.asarray(np.random.default_rng(1).standard_normal((32, 256)), jnp.float32)
  g = jnp.asarray(np.random.default_rng(2).standard_normal((32, 128)), jnp.float32)

  def fwd_bwd(x, qt):
    y, vjp = jax.vjp(lambda x: quantized_matmul(x, qt, backend="interpret"), x)
    return y, vjp(g)[0]

  want = jax.jit(fwd_bwd)(x, qt)
  cfg, mesh = mesh_of(2, 4)
  xs = sharding.put_batch({"x": np.asarray(x)}, mesh)["x"]
  run = sharding.with_mesh(jax.jit(fwd_bwd), mesh)
  got = run(xs, place(qt, mesh, cfg))
  assert got[0].sharding.spec == P(sharding.BATCH_AXES)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def lowra_tiny():
  """One decoder layer (compile time) over a LowRA base; batch [8, 16]."""
  model, _, _, frozen, adapters, _ = tiny_model(
    quant=LOWRA, config=dataclasses.replace(CONFIG, num_layers=1)
  )
  tokens = np.random.default_rng(3).integers(0, 64, size=(8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  tx = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-2, warmup_steps=1))
  return model, tx, frozen, adapters, batch


def train(setup, steps, mesh=None, cfg=None):
  """`steps` training steps; unsharded on device 0 without a mesh. (state, [(loss, grad
  norm)] per step)."""
  model, tx, frozen, adapters, batch = setup
  state = train_lib.TrainState.create(adapters, tx)
  if mesh is None:
    step, state_sharding = train_lib.make_train_step(model, tx), None
  else:
    state_sharding = sharding.tree_shardings(state, mesh, cfg)
    state, frozen = jax.device_put(state, state_sharding), place(frozen, mesh, cfg)
    batch = sharding.put_batch(batch, mesh)
    step = train_lib.make_train_step(model, tx, mesh=mesh, state_sharding=state_sharding)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, frozen, batch, jax.random.key(0))
    losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
  return state, losses


@pytest.fixture(scope="module")
def reference(lowra_tiny):
  return train(lowra_tiny, 3)


def assert_same_training(state, reference, initial):
  """Adapter updates and Adam moments equal per leaf up to float32 reduction order, in relative
  norm (Adam's m / sqrt(v) amplifies the ~1e-6 gradient differences of near-zero entries)."""

  def rel(a, b):
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

  def updates(s):
    return jax.tree.map(jnp.subtract, s.adapters, initial)

  moments = (state.opt_state[1][0], reference.opt_state[1][0])
  for got, want in (
    (updates(state), updates(reference)),
    (moments[0].mu, moments[1].mu),
    (moments[0].nu, moments[1].nu),
  ):
    errors = jax.tree.leaves(jax.tree.map(rel, got, want))
    assert max(errors) < 1e-3, max(errors)
  assert int(state.step) == int(reference.step)


def test_sharded_step_matches_single_device(lowra_tiny, reference):
  cfg, mesh = mesh_of(2, 4)
  state, losses = train(lowra_tiny, 3, mesh, cfg)
  ref_state, ref_losses = reference
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_same_training(state, ref_state, lowra_tiny[3])
  specs = [s.spec for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state.adapters))]
  assert P(sharding.FSDP) in specs  # the adapters (and their Adam moments) are FSDP-sharded
  frozen = lowra_tiny[2]
  eval_step = train_lib.make_eval_step(lowra_tiny[0], mesh=mesh)
  blocks = np.concatenate([lowra_tiny[4]["inputs"], lowra_tiny[4]["targets"][:, -1:]], axis=1)
  got = train_lib.mean_loss(
    eval_step, place(frozen, mesh, cfg), state.adapters, blocks[:7], 3, mesh
  )
  want = train_lib.mean_loss(
    train_lib.make_eval_step(lowra_tiny[0]), frozen, ref_state.adapters, blocks[:7], 3
  )
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_checkpoint_saved_on_4_devices_restores_on_1_and_8(lowra_tiny, reference, tmp_path):
  devices = jax.devices()
  cfg, mesh4 = mesh_of(2, 2, devices[:4])
  state, _ = train(lowra_tiny, 3, mesh4, cfg)
  ckpt = TrainCheckpoints(tmp_path, every=1, keep=1)
  assert ckpt.save(state, data_position=3)
  ckpt.close()
  template = train_lib.TrainState.create(lowra_tiny[3], lowra_tiny[1])
  for data, fsdp, devs in ((1, 1, devices[:1]), (2, 4, devices)):
    cfg, mesh = mesh_of(data, fsdp, devs)
    shardings = sharding.tree_shardings(template, mesh, cfg)
    restored, position = TrainCheckpoints(tmp_path, every=1, keep=1).restore(
      jax.device_put(template, shardings)
    )
    assert position == 3 and int(restored.step) == 3
    assert jax.tree.map(lambda x: x.sharding, restored) == shardings
    assert_same_training(restored, reference[0], lowra_tiny[3])
