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
from tiny_model import CONFIG, LORA, tiny_model
from tolerances import (
  assert_close_at_scale,
  assert_trees_close_at_scale,
  f32_sum,
  llama_grad_terms,
)

from lowra_jax import run_config, sharding, train_lib
from lowra_jax.checkpoint import TrainCheckpoints
from lowra_jax.quantize import QuantConfig, quantize_params
from pallas_kernels import quantized_matmul

LOWRA = QuantConfig(method="lowra", budget=1.5)  # mixed 1/2/4-bit buckets of different widths
ONE_LAYER = dataclasses.replace(CONFIG, num_layers=1)  # compile time
# Float32 reduction order: losses, gradients and Adam's moments of a [8, 16] batch.
CHAIN = f32_sum(llama_grad_terms(ONE_LAYER, 8, 16, LORA.rank))


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
    run_config.make_mesh(run_config.settings(config))
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
  assert_trees_close_at_scale(got, want, f32_sum(256))  # float32 dots over K = 256 and N = 128


@pytest.fixture(scope="module")
def lowra_tiny():
  """One decoder layer over a LowRA base; batch [8, 16]."""
  model, _, _, frozen, adapters, _ = tiny_model(quant=LOWRA, config=ONE_LAYER)
  tokens = np.random.default_rng(3).integers(0, 64, size=(8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  tx = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-2, warmup_steps=0))
  return model, tx, frozen, adapters, batch


def step_fn(setup, mesh=None, cfg=None):
  """One training step as a function of the state; unsharded on device 0 without a mesh."""
  model, tx, frozen, adapters, batch = setup
  if mesh is None:
    step = train_lib.make_train_step(model, tx)
    return lambda state: step(jax.tree.map(jnp.copy, state), frozen, batch, jax.random.key(0))
  state_sharding = sharding.tree_shardings(train_lib.TrainState.create(adapters, tx), mesh, cfg)
  frozen, batch = place(frozen, mesh, cfg), sharding.put_batch(batch, mesh)
  step = train_lib.make_train_step(model, tx, mesh=mesh, state_sharding=state_sharding)
  # The step donates its state: it gets a copy, placed on the mesh.
  return lambda state: step(
    jax.device_put(jax.tree.map(jnp.copy, state), state_sharding), frozen, batch, jax.random.key(0)
  )


@pytest.fixture(scope="module")
def reference(lowra_tiny):
  """The unsharded run: states after 0..3 steps and each step's metrics."""
  step = step_fn(lowra_tiny)
  states, metrics = [train_lib.TrainState.create(lowra_tiny[3], lowra_tiny[1])], []
  for _ in range(3):
    state, m = step(states[-1])
    states.append(state)
    metrics.append(m)
  return states, metrics


def assert_same_step(got, metrics, reference, k):
  """A step from the reference's state k against the reference's step k + 1, up to float32
  reduction order. Adam's update lr * m_hat / (sqrt(v_hat) + eps) moves by ~lr * dg / sqrt(v_hat)
  for a gradient error dg, without bound where v ~ 0 (a gradient at rounding level may flip its
  sign), so updates are compared weighted by sqrt(nu): that leaves lr * dg times
  (1 - b1) / (1 - b1^t) + |m_hat g| / v_hat * (1 - b2) / (1 - b2^t), ~2 in these 3 steps."""
  states, ref_metrics = reference
  before, want = states[k], states[k + 1]
  for key in ("loss", "grad_norm"):
    assert_close_at_scale(metrics[key], ref_metrics[k][key], CHAIN, err_msg=key)
  adam, ref_adam = got.opt_state[1][0], want.opt_state[1][0]
  assert_trees_close_at_scale(adam.mu, ref_adam.mu, CHAIN)
  assert_trees_close_at_scale(adam.nu, ref_adam.nu, 2 * CHAIN)  # squared gradients

  def weighted_update(s):
    return jax.tree.map(
      lambda a, b, v: (a - b) * jnp.sqrt(v), s.adapters, before.adapters, ref_adam.nu
    )

  assert_trees_close_at_scale(weighted_update(got), weighted_update(want), 2 * CHAIN)
  assert int(got.step) == int(want.step)


def test_sharded_step_matches_single_device(lowra_tiny, reference):
  cfg, mesh = mesh_of(2, 4)
  step = step_fn(lowra_tiny, mesh, cfg)
  states = reference[0]
  for k in range(3):
    state, metrics = step(states[k])
    assert_same_step(state, metrics, reference, k)
  specs = [s.spec for s in jax.tree.leaves(jax.tree.map(lambda x: x.sharding, state.adapters))]
  assert P(sharding.FSDP) in specs  # the adapters (and their Adam moments) are FSDP-sharded
  frozen, adapters = lowra_tiny[2], states[-1].adapters
  eval_step = train_lib.make_eval_step(lowra_tiny[0], mesh=mesh)
  blocks = np.concatenate([lowra_tiny[4]["inputs"], lowra_tiny[4]["targets"][:, -1:]], axis=1)
  got = train_lib.mean_loss(
    eval_step, place(frozen, mesh, cfg), place(adapters, mesh, cfg), blocks[:7], 3, mesh
  )
  want = train_lib.mean_loss(
    train_lib.make_eval_step(lowra_tiny[0]), frozen, adapters, blocks[:7], 3
  )
  assert got[1] == want[1]
  assert_close_at_scale(got[0], want[0], CHAIN)  # a mean of positive losses: its own scale


def test_checkpoint_saved_on_4_devices_restores_on_1_and_8(lowra_tiny, reference, tmp_path):
  """A checkpoint written from 4 devices restores bit for bit on 1 and on 8."""
  devices = jax.devices()
  cfg, mesh4 = mesh_of(2, 2, devices[:4])
  state, metrics = step_fn(lowra_tiny, mesh4, cfg)(reference[0][2])
  assert_same_step(state, metrics, reference, 2)
  ckpt = TrainCheckpoints(tmp_path, every=1, keep=1)
  assert ckpt.save(state, data_position=3)
  ckpt.close()
  saved = jax.device_get(state)
  template = train_lib.TrainState.create(lowra_tiny[3], lowra_tiny[1])
  for data, fsdp, devs in ((1, 1, devices[:1]), (2, 4, devices)):
    cfg, mesh = mesh_of(data, fsdp, devs)
    shardings = sharding.tree_shardings(template, mesh, cfg)
    restored, position = TrainCheckpoints(tmp_path, every=1, keep=1).restore(
      jax.device_put(template, shardings)
    )
    assert position == 3 and int(restored.step) == 3
    assert jax.tree.map(lambda x: x.sharding, restored) == shardings
    chex.assert_trees_all_equal(jax.device_get(restored), saved)
