"""Device mesh and partition specs for data parallelism + FSDP, on JAX's own `jax.sharding`.

    cfg = MeshConfig(data=2, fsdp=4)             # -1: all remaining devices; default: pure data
    initialize(cfg)                              # multi-host: jax.distributed from the environment
    mesh = make_mesh(cfg)                        # axes ("data", "fsdp")
    frozen = jax.device_put(frozen, tree_shardings(frozen, mesh, cfg))
    state = jax.device_put(state, tree_shardings(state, mesh, cfg))
    batch = put_batch(numpy_batch, mesh)         # rows split over ("data", "fsdp")

The batch dimension is split over both axes (each device computes B / devices rows). FSDP shards
every leaf worth sharding -- the packed base, the dense leftovers, the adapters, the optimizer
state -- along one axis over "fsdp" (replicated over "data"); XLA all-gathers a leaf where the
computation needs it whole. A `QuantizedTensor` is sharded per field (see `quantized_shardings`);
it stays packed when gathered. `quantized_matmul` splits its rows over the mesh with `shard_map`
when it is traced under `jax.set_mesh` (`with_mesh`), so the Pallas kernels run per device on the
local rows against the gathered packed weight. With one device every spec is replicated and
nothing changes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lowra_jax.quantize.qtensor import QuantizedTensor, is_quantized

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes and what FSDP shards.

  data, fsdp: devices along each axis; one of them may be -1 (all remaining devices); their
  product must equal the device count. min_shard_bytes: leaves smaller than this stay replicated
  (an all-gather per tiny leaf costs more than it saves). distributed: call
  `jax.distributed.initialize` first (multi-host; see `initialize`).
  """

  data: int = -1
  fsdp: int = 1
  min_shard_bytes: int = 1 << 16
  distributed: bool = False

  def __post_init__(self):
    sizes = (self.data, self.fsdp)
    if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
      raise ValueError(
        f"mesh axes data={self.data}, fsdp={self.fsdp} — give each >= 1, or -1 for one of them "
        "(all remaining devices)."
      )
    if self.min_shard_bytes < 0:
      raise ValueError(f"min_shard_bytes={self.min_shard_bytes} — use a size >= 0.")

  def axis_sizes(self, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) with -1 resolved; ValueError when they do not multiply to `num_devices`."""
    known = math.prod(s for s in (self.data, self.fsdp) if s != -1)
    if num_devices % known:
      raise ValueError(
        f"mesh data={self.data} x fsdp={self.fsdp} does not divide the {num_devices} devices — "
        "pick axis sizes whose product divides it, or -1 for one axis."
      )
    data = num_devices // known if self.data == -1 else self.data
    fsdp = num_devices // known if self.fsdp == -1 else self.fsdp
    if data * fsdp != num_devices:
      raise ValueError(
        f"mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, but there are {num_devices} — "
        "set one axis to -1 to use all of them."
      )
    return data, fsdp


def initialize(cfg: MeshConfig) -> None:
  """Multi-host start: `jax.distributed.initialize` when `cfg.distributed`, before any device use.

  The coordinator comes from JAX_COORDINATOR_ADDRESS (host:port of process 0); JAX_NUM_PROCESSES
  and JAX_PROCESS_ID give the process count and this process's index. Unset, JAX detects them
  from SLURM, Open MPI or Kubernetes.
  """
  if not cfg.distributed:
    return
  env = {k: os.environ.get(f"JAX_{k.upper()}") for k in ("num_processes", "process_id")}
  jax.distributed.initialize(**{k: int(v) for k, v in env.items() if v is not None})


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
  """A ("data", "fsdp") mesh over `devices` (default: every device of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = cfg.axis_sizes(len(devices))
  return jax.make_mesh(sizes, BATCH_AXES, (AxisType.Auto,) * 2, devices=devices)


def batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch dimension is cut into (data x fsdp)."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def _spec(x, fsdp: int, min_bytes: int, axes) -> P:
  """FSDP spec of array `x`: the first of `axes` divisible by `fsdp`, else replicated."""
  if fsdp == 1 or x.size * np.dtype(x.dtype).itemsize < min_bytes:
    return P()
  for axis in axes:
    if x.shape[axis] % fsdp == 0:
      return P(*([None] * axis), FSDP)
  return P()


def dense_spec(x, fsdp: int, min_bytes: int) -> P:
  """A dense leaf is sharded along its largest axis divisible by `fsdp` (scalars: replicated)."""
  return _spec(x, fsdp, min_bytes, sorted(range(x.ndim), key=lambda a: -x.shape[a]))


def quantized_specs(qt: QuantizedTensor, fsdp: int, min_bytes: int) -> QuantizedTensor:
  """The same `QuantizedTensor` with a `PartitionSpec` in place of every array.

  Per bucket: planes uint8 [Kp, Nb] along the packed K rows (Kp = K_pad * w / 8, a multiple of
  group_size * w / 8 whatever the bucket's data-dependent width Nb), else along channels; scale
  arrays [G, Nb] along the groups, else along channels; tables [T, 2^b] and table indices [Nb]
  along channels; the permutation [N] along its only axis; the double-quant offset (a scalar)
  replicated. A field whose axes do not divide, or smaller than `min_bytes`, is replicated.
  Everything is gathered whole (still packed) before use, so any split is exact.
  """

  def spec(*axes):
    return lambda x: None if x is None else _spec(x, fsdp, min_bytes, axes)

  rows_first, channels = spec(0, 1), spec(0)
  buckets = tuple(
    b.replace(
      planes=tuple(rows_first(p) for p in b.planes),
      tables=channels(b.tables),
      table_index=channels(b.table_index),
      scales=b.scales.replace(
        values=rows_first(b.scales.values),
        codes=rows_first(b.scales.codes),
        block_absmax=rows_first(b.scales.block_absmax),
        offset=spec()(b.scales.offset),
      ),
    )
    for b in qt.buckets
  )
  return qt.replace(buckets=buckets, perm=channels(qt.perm))


def tree_specs(tree, fsdp: int, min_bytes: int):
  """`PartitionSpec`s of any pytree of arrays and `QuantizedTensor`s (same structure)."""

  def spec(x):
    if is_quantized(x):
      return quantized_specs(x, fsdp, min_bytes)
    return dense_spec(x, fsdp, min_bytes)

  return jax.tree.map(spec, tree, is_leaf=is_quantized)


def tree_shardings(tree, mesh: Mesh, cfg: MeshConfig):
  """`NamedSharding`s of `tree` on `mesh` (FSDP per `tree_specs`, replicated over "data")."""
  specs = tree_specs(tree, mesh.shape[FSDP], cfg.min_shard_bytes)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows (dim 0) split over ("data", "fsdp"); other dims whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
  """ValueError (one line) unless `batch_size` splits evenly over the mesh's batch shards."""
  n = batch_shards(mesh)
  if batch_size % n:
    raise ValueError(
      f"{name}={batch_size} does not split over data x fsdp = {n} devices — use a multiple of {n}."
    )


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, *, pad: bool = False) -> dict:
  """A global host batch {name: [B, ...]} (the same on every process) -> arrays split by rows.

  Each process transfers only the rows of its own devices. `pad`: rows are padded to a multiple
  of the batch shards with a "mask" [B, T] (1 real, 0 padding; created when absent), for
  evaluation batches of any size; otherwise B must divide evenly.
  """
  n = batch_shards(mesh)
  rows = len(next(iter(batch.values())))
  if pad and rows % n:
    extra = -rows % n
    mask = batch.get("mask", np.ones(batch["targets"].shape, np.float32))
    batch = {**batch, "mask": mask}
    batch = {
      k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in batch.items()
    }
  check_batch_size(len(next(iter(batch.values()))), mesh)
  sharding = batch_sharding(mesh)
  return {
    k: jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
    for k, v in batch.items()
  }


def with_mesh(fn, mesh: Mesh | None):
  """`fn` called under `jax.set_mesh(mesh)` (so `quantized_matmul` splits rows); `fn` if None."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def run(*args, **kwargs):
    with jax.set_mesh(mesh):
      return fn(*args, **kwargs)

  return run


def to_host(tree):
  """Every array of `tree` as a whole host numpy array, on every process (a collective)."""
  return multihost_utils.process_allgather(tree, tiled=True)
