"""Per-channel precision under an average-bits budget (a multiple-choice knapsack).

Given e[c, p], the squared error of channel c at precision bits[p], and n[c], its number of
parameters, choose one p per channel minimising sum_c e[c, p_c] subject to
sum_c n[c] * bits[p_c] <= budget * sum_c n[c].

* `milp`: the exact 0/1 program through scipy's HiGHS (`scipy.optimize.milp`).
* `greedy`: every channel starts at its cheapest precision; upgrades along each channel's lower
  convex hull of (bits, error) are taken in order of error saved per bit until the budget is spent,
  then the leftover budget is filled with the best upgrades that still fit. This is the LP
  relaxation's solution rounded down, so it is optimal up to one channel's upgrade; it solves
  LLaMA-7B's ~1.3M channels in about a second.

`align_counts` then rounds one tensor's channel count per precision to a multiple
(`count_multiple`: the GPU kernels want bucket rows in whole channel blocks), moving a few channels
one step within the budget. Or, with `QuantConfig.bucket_sizes="shape"`, `shared_counts` gives
every tensor of one shape the same counts and `assign_counts` picks each tensor's channels for
them (least error, exactly).
"""

from __future__ import annotations

import contextlib
import heapq
import os
import sys

import numpy as np
import scipy.optimize
import scipy.sparse

from lowra_jax.quantize.config import QuantizationError


def check_budget(costs: np.ndarray, bits: np.ndarray, budget: float) -> float:
  """Returns the code-bit capacity budget * sum(costs); raises if even the lowest precision exceeds it."""
  capacity = budget * float(costs.sum())
  if float(costs.sum()) * bits.min() > capacity * (1 + 1e-12):
    raise QuantizationError(
      f"budget={budget} is infeasible: every channel needs at least {bits.min()} bits; raise the "
      "budget or allow lower precisions."
    )
  return capacity


def _as_problem(errors, costs, bits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """float64 errors [N, P], costs [N], bits [P] (strictly ascending)."""
  errors = np.asarray(errors, np.float64)
  costs = np.asarray(costs, np.float64)
  bits = np.asarray(bits, np.float64)
  if np.any(np.diff(bits) <= 0):
    raise QuantizationError(f"bits={bits.tolist()} must be strictly ascending.")
  if errors.ndim != 2 or errors.shape != (len(costs), len(bits)):
    raise QuantizationError(
      f"errors {errors.shape} must be [channels, precisions] = [{len(costs)}, {len(bits)}]."
    )
  return errors, costs, bits


@contextlib.contextmanager
def _quiet_stdout():
  """Silences native writes to stdout (HiGHS prints MIP diagnostics even with disp=False)."""
  sys.stdout.flush()
  try:
    saved = os.dup(1)
  except OSError:  # no real stdout (e.g. some notebook kernels): nothing to silence
    yield
    return
  with open(os.devnull, "w") as devnull:
    os.dup2(devnull.fileno(), 1)
    try:
      yield
    finally:
      os.dup2(saved, 1)
      os.close(saved)


def _used_bits(costs: np.ndarray, bits: np.ndarray, choice: np.ndarray) -> float:
  return float((costs * bits[choice]).sum())


def _hull_steps(errors: np.ndarray, bits: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per-channel lower convex hull of (bits, error), walked from the cheapest precision.

  Returns a list of (from_idx, to_idx) int arrays [N] per step; to_idx == from_idx once a channel's
  hull ends (no further upgrade saves error).
  """
  n, p = errors.shape
  cur = np.zeros(n, np.int64)
  rows = np.arange(n)
  steps = []
  for _ in range(p - 1):
    db = bits[None, :] - bits[cur][:, None]
    de = errors - errors[rows, cur][:, None]
    slope = np.where(db > 0, de / np.where(db > 0, db, 1), np.inf)
    nxt = np.argmin(slope, axis=1)
    ok = slope[rows, nxt] < 0
    nxt = np.where(ok, nxt, cur)
    steps.append((cur, nxt))
    cur = nxt
  return steps


def solve_greedy(
  errors: np.ndarray, costs: np.ndarray, bits: np.ndarray, budget: float
) -> np.ndarray:
  """Convex-hull greedy; see module docstring. Returns int [N] indices into `bits`."""
  errors, costs, bits = _as_problem(errors, costs, bits)
  n = errors.shape[0]
  remaining = check_budget(costs, bits, budget) - float(costs.sum()) * bits[0]
  choice = np.zeros(n, np.int64)
  if len(bits) == 1 or n == 0:
    return choice
  steps = _hull_steps(errors, bits)
  rows = np.arange(n)
  effs, prev = [], np.full(n, np.inf)
  for frm, to in steps:
    db = np.where(to != frm, bits[to] - bits[frm], 1.0) * costs
    # Error saved per code bit; forced non-increasing along a chain (rounding on collinear points).
    prev = np.minimum(prev, (errors[rows, frm] - errors[rows, to]) / db)
    effs.append(prev)
  chan = np.concatenate([rows for _ in steps])
  order_in_chain = np.concatenate([np.full(n, i) for i in range(len(steps))])
  frm = np.concatenate([s[0] for s in steps])
  to = np.concatenate([s[1] for s in steps])
  eff = np.concatenate(effs)
  valid = to != frm
  chan, order_in_chain, frm, to, eff = (a[valid] for a in (chan, order_in_chain, frm, to, eff))
  cost = costs[chan] * (bits[to] - bits[frm])
  order = np.lexsort((order_in_chain, chan, -eff))
  chan, frm, to, cost, eff = chan[order], frm[order], to[order], cost[order], eff[order]

  # Longest prefix that fits: hull efficiencies fall along each chain, so a prefix respects
  # every chain's order.
  within = np.cumsum(cost) <= remaining * (1 + 1e-12)
  k = int(np.argmin(within)) if not within.all() else len(cost)
  np.maximum.at(choice, chan[:k], to[:k])  # a chain's later steps have larger `to`
  remaining -= float(cost[:k].sum())
  taken = np.zeros(len(cost), bool)
  taken[:k] = True
  # Fill: the best remaining upgrade that fits and continues its channel's current state.
  while True:
    cand = ~taken & (choice[chan] == frm) & (cost <= remaining * (1 + 1e-12))
    if not cand.any():
      return choice
    i = int(np.flatnonzero(cand)[0])  # list is sorted by efficiency
    choice[chan[i]] = to[i]
    remaining -= float(cost[i])
    taken[i] = True


def solve_milp(
  errors: np.ndarray, costs: np.ndarray, bits: np.ndarray, budget: float, time_limit: float = 10.0
) -> np.ndarray:
  """Exact 0/1 program via HiGHS. Returns int [N] indices into `bits`."""
  errors, costs, bits = _as_problem(errors, costs, bits)
  n, p = errors.shape
  capacity = check_budget(costs, bits, budget)
  if n == 0:
    return np.zeros(0, np.int64)
  # HiGHS stops at an absolute objective gap of 1e-6: scale the largest error to 1e6 so that
  # channels with errors many decades below the largest still count.
  scale = max(float(np.abs(errors).max()), 1e-300) / 1e6
  one_each = scipy.sparse.kron(scipy.sparse.identity(n, format="csr"), np.ones((1, p)))
  bit_row = (costs[:, None] * bits[None, :]).reshape(1, -1) / costs.sum()
  constraints = [
    scipy.optimize.LinearConstraint(one_each, 1, 1),
    scipy.optimize.LinearConstraint(bit_row, -np.inf, capacity / costs.sum()),
  ]
  with _quiet_stdout():
    res = scipy.optimize.milp(
      (errors / scale).reshape(-1),
      constraints=constraints,
      integrality=np.ones(n * p),
      bounds=scipy.optimize.Bounds(0, 1),
      options={"mip_rel_gap": 1e-9, "time_limit": time_limit, "disp": False},
    )
  greedy = solve_greedy(errors, costs, bits, budget)
  if res.x is None:
    return greedy
  choice = res.x.reshape(n, p).argmax(axis=1)
  rows = np.arange(n)
  # HiGHS holds constraints to ~1e-7 and may stop at its time limit: keep the greedy solution
  # when the ILP's is over budget or worse.
  if (
    _used_bits(costs, bits, choice) > capacity
    or errors[rows, greedy].sum() < errors[rows, choice].sum()
  ):
    return greedy
  return choice


def solve_budget(
  errors: np.ndarray,
  costs: np.ndarray,
  bits,
  budget: float,
  solver: str = "auto",
  milp_max_channels: int = 2_000,
) -> np.ndarray:
  """Chooses one precision per channel under the budget.

  Args:
    errors: float [N, P], squared error of channel c at precision bits[p].
    costs: [N] parameters per channel.
    bits: P precisions, ascending.
    budget: average code bits per parameter.
    solver: 'milp', 'greedy' or 'auto' (milp up to `milp_max_channels` channels).

  Returns:
    int64 [N] indices into `bits`; sum(costs * bits[idx]) <= budget * sum(costs) always.
  """
  if solver not in ("auto", "greedy", "milp"):
    raise QuantizationError(f"unknown solver {solver!r}: use 'auto', 'greedy' or 'milp'.")
  use_milp = solver == "milp" or (solver == "auto" and len(costs) <= milp_max_channels)
  fn = solve_milp if use_milp else solve_greedy
  return fn(errors, costs, bits, budget)


def count_multiple(channels: int, multiple: int) -> int:
  """The multiple a tensor of `channels` output channels rounds its counts per precision to:
  `multiple`, halved while above 16 until the tensor holds 64 of it (so at most ~1.5 % of its
  channels move per precision); 1 (left as solved) when it holds fewer than 64 even then."""
  while multiple > 16 and channels < 64 * multiple:
    multiple //= 2
  return multiple if channels >= 64 * multiple else 1


def align_counts(
  errors: np.ndarray, choice: np.ndarray, bits, cost: float, multiple: int, slack: float
) -> tuple[np.ndarray, float]:
  """One tensor's channel count at each precision rounded to a multiple of `multiple`.

  From the highest precision down to the second lowest, r = (channels at p) mod `multiple`
  channels move one step: when r >= multiple / 2, the channels one step below are enough and the
  upgrade's bits fit `slack`, the multiple - r channels below gaining the most error go up to p;
  otherwise the r channels at p losing the least go down one step. The lowest precision keeps the
  rest (a multiple too when the tensor's channel count is). Used so that every precision bucket
  fills whole channel blocks of the GPU kernels (`QuantConfig.bucket_multiple`).

  Args:
    errors: float [N, P], squared error of each channel of the tensor at each precision.
    choice: int [N], indices into `bits` (not modified).
    bits: P precisions, ascending; cost: parameters per channel (the tensor's K).
    multiple: the count multiple (>= 1); slack: code bits the upgrades may add.
  Returns:
    (new choice int64 [N], code bits added: negative when channels went down).
  """
  choice = np.array(choice, np.int64)
  bits = np.asarray(bits, np.float64)
  added = 0.0
  for p in range(len(bits) - 1, 0, -1):
    r = int((choice == p).sum()) % multiple
    if not r:
      continue
    below = np.flatnonzero(choice == p - 1)
    gain = errors[below, p - 1] - errors[below, p]  # error saved by going up to p
    up_bits = (multiple - r) * cost * (bits[p] - bits[p - 1])
    if 2 * r >= multiple and len(below) >= multiple - r and added + up_bits <= slack:
      choice[below[np.argsort(-gain, kind="stable")[: multiple - r]]] = p
      added += up_bits
    else:
      at = np.flatnonzero(choice == p)
      loss = errors[at, p - 1] - errors[at, p]
      choice[at[np.argsort(loss, kind="stable")[:r]]] = p - 1
      added -= r * cost * (bits[p] - bits[p - 1])
  return choice, added


def assign_counts(errors: np.ndarray, counts: np.ndarray) -> np.ndarray:
  """The precisions of least total error with exactly counts[p] channels at precision index p.

  Two precisions: the counts[1] channels whose error drops most at the upper one take it. More: a
  transportation problem (each channel one precision, each precision its count) solved exactly by
  successive shortest paths: channels are placed one at a time, each along the cheapest chain
  "the new channel into precision q0, one channel from q0 to q1, ..., into a precision with room"
  (Bellman-Ford over the P precisions; an edge p -> q costs the least e[c, q] - e[c, p] among the
  channels at p, kept in one heap per pair). Each placement keeps the assignment optimal for the
  channels placed so far; O(N P^3 log N).

  Args:
    errors: float [N, P], each channel's squared error at each precision.
    counts: int [P], summing to N.
  Returns:
    int64 [N] indices into the precisions.
  """
  errors = np.asarray(errors, np.float64)
  counts = np.asarray(counts, np.int64)
  n, p = errors.shape
  if counts.shape != (p,) or counts.sum() != n or (counts < 0).any():
    raise QuantizationError(f"counts {counts.tolist()} do not split {n} channels {p} ways.")
  choice = np.full(n, -1, np.int64)
  if p == 2:
    gain = errors[:, 0] - errors[:, 1]
    choice[:] = 0
    choice[np.argsort(-gain, kind="stable")[: counts[1]]] = 1
    return choice
  room = counts.copy()
  heaps = [[[] for _ in range(p)] for _ in range(p)]  # heaps[a][b]: (e[c, b] - e[c, a], c), c at a
  rows = errors.tolist()

  def cheapest(a: int, b: int):
    heap = heaps[a][b]
    while heap and choice[heap[0][1]] != a:  # stale: the channel has moved
      heapq.heappop(heap)
    return heap[0] if heap else None

  for c in range(n):
    dist, pred = list(rows[c]), [-1] * p  # pred -1: the new channel enters here directly
    for _ in range(p - 1):
      for a in range(p):
        for b in range(p):
          if a != b and (top := cheapest(a, b)) is not None and dist[a] + top[0] < dist[b]:
            dist[b], pred[b] = dist[a] + top[0], a
    target = min((q for q in range(p) if room[q]), key=lambda q: dist[q])
    room[target] -= 1
    q = target
    for _ in range(p):  # move one channel from pred[q] into q, then continue from pred[q]
      if pred[q] == -1:
        break
      a = pred[q]
      moved = cheapest(a, q)[1]
      choice[moved] = q
      for r in range(p):
        if r != q:
          heapq.heappush(heaps[q][r], (rows[moved][r] - rows[moved][q], moved))
      q = a
    else:  # a chain through every precision cannot revisit one (no negative cycles)
      raise QuantizationError(f"assign_counts: non-finite errors in channel {c}?")
    choice[c] = q
    for r in range(p):
      if r != q:
        heapq.heappush(heaps[q][r], (rows[c][r] - rows[c][q], c))
  return choice


def shared_counts(
  classes: list[tuple[list[np.ndarray], int, int]], bits, capacity: float
) -> list[np.ndarray]:
  """One channel count per precision for each class of equal-shape tensors.

  A class's counts are the mean of its tensors' solved counts, taken cumulatively from the top
  precision (channels at p or above) and rounded to the nearest multiple. Where the rounding
  puts the model over its code-bit capacity, the cumulative counts rounded up the most go down
  one multiple at a time until it fits.

  Args:
    classes: (choices, cost, multiple) per class: each tensor's solved choice int [N] (indices
      into `bits`, N the same for the class), its parameters per channel (K) and the count
      multiple (`count_multiple`).
    bits: P precisions, ascending; capacity: the model's code-bit budget (`check_budget`).
  Returns:
    int64 [P] per class: channels at each precision, summing to N.
  """
  bits = np.asarray(bits, np.float64)
  levels = np.arange(1, len(bits))
  cums, means, costs, sizes = [], [], [], []
  for choices, cost, multiple in classes:
    n = len(choices[0])
    mean = np.mean([[(c >= j).sum() for j in levels] for c in choices], axis=0).reshape(-1)
    cum = np.clip(np.round(mean / multiple) * multiple, 0, n).astype(np.int64)
    cums.append(np.minimum.accumulate(cum))  # at p or above <= at p - 1 or above
    means.append(mean)
    costs.append(len(choices) * cost)
    sizes.append(multiple)

  def used() -> float:  # sum of cost * (bits[0] * N + sum_j cum_j * (bits[j] - bits[j - 1]))
    steps = np.diff(bits)
    return sum(
      cost * (bits[0] * len(ch[0]) + float(cum @ steps))
      for cost, cum, (ch, _, _) in zip(costs, cums, classes)
    )

  while used() > capacity * (1 + 1e-12):
    best = None
    for i, (cum, mean) in enumerate(zip(cums, means)):
      for j in range(len(cum)):
        below = cum[j + 1] if j + 1 < len(cum) else 0
        if cum[j] - sizes[i] >= below:
          excess = (cum[j] - mean[j]) / sizes[i]
          best = max(best or (excess, i, j), (excess, i, j))
    if best is None:  # every class at the lowest precision: the budget check already failed
      break
    cums[best[1]][best[2]] -= sizes[best[1]]
  out = []
  for cum, (choices, _, _) in zip(cums, classes):
    at_or_above = np.concatenate([[len(choices[0])], cum, [0]])
    out.append(-np.diff(at_or_above))
  return out
