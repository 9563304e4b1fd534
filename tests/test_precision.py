"""Tests for lowra_jax.quantize.precision: the per-channel precision budget solvers.

Oracles are independent of the code under test:
  * exhaustive enumeration of all P^N assignments on tiny problems (the true optimum);
  * the Lagrangian dual of the single budget constraint, maximised over lambda with scipy
    (a certified lower bound on the optimum, equal to the LP relaxation at its maximum), for
    problems too large to enumerate;
  * hand-computed answers on a few hand-made problems.
The greedy solver is documented to be optimal "up to one channel's upgrade": its objective must
lie in [OPT, OPT + max_c (e[c, 0] - min_p e[c, p])], the largest gain one channel can contribute.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.optimize

from lowra_jax.quantize.config import QuantizationError
from lowra_jax.quantize.precision import (
  align_counts,
  assign_counts,
  shared_counts,
  solve_budget,
  solve_greedy,
  solve_milp,
)

BITS3 = np.array([1.0, 2.0, 4.0])
BITS4 = np.array([1.0, 2.0, 3.0, 4.0])

# --------------------------------------------------------------------------------------------
# Oracles and problem generators (plain float64 numpy, no library code).


def brute_force_optimum(errors, costs, bits, budget):
  """min_choice sum_c e[c, choice_c] s.t. sum_c costs_c * bits[choice_c] <= budget * sum(costs)."""
  n, p = errors.shape
  grid = np.array(list(itertools.product(range(p), repeat=n)), dtype=np.int64)  # [P^N, N]
  used = (costs[None, :] * bits[grid]).sum(axis=1)
  obj = errors[np.arange(n)[None, :], grid].sum(axis=1)
  feasible = used <= budget * costs.sum() * (1 + 1e-12)
  assert feasible.any(), "generator produced an infeasible problem"
  return float(obj[feasible].min())


def lagrangian_lower_bound(errors, costs, bits, budget):
  """max_{lam >= 0} sum_c min_p (e[c, p] + lam * costs_c * bits_p) - lam * budget * sum(costs).

  Weak duality makes every lam a valid lower bound on the integer optimum; the maximum equals
  the LP relaxation's value (one coupling constraint).
  """
  cap = budget * costs.sum()

  def dual(lam):
    return float((errors + lam * costs[:, None] * bits[None, :]).min(axis=1).sum() - lam * cap)

  gains = (errors[:, :1] - errors[:, 1:]) / (costs[:, None] * (bits[None, 1:] - bits[0]))
  lam_max = max(float(gains.max()), 0.0) * 1.01 + 1e-300
  res = scipy.optimize.minimize_scalar(
    lambda x: -dual(x), bounds=(0.0, lam_max), method="bounded", options={"xatol": lam_max * 1e-12}
  )
  return max(dual(0.0), dual(lam_max), -res.fun)


def one_channel_bound(errors):
  return float((errors[:, 0] - errors.min(axis=1)).max())


def objective(errors, choice):
  return float(errors[np.arange(errors.shape[0]), choice].sum())


def used_bits(costs, bits, choice):
  return float((costs * bits[choice]).sum())


def make_problem(family, rng, n, bits):
  """errors [n, P] float64, costs [n] (int-valued, like in_features of mixed layers)."""
  p = len(bits)
  costs = rng.integers(64, 4097, n).astype(np.float64)
  if family == "uniform":  # arbitrary, not even monotone in bits
    errors = rng.random((n, p))
  elif family == "realistic":  # squared error ~ K * sigma^2 * 4^-bits
    a = costs * rng.lognormal(0.0, 0.5, n)
    errors = a[:, None] * 4.0 ** (-bits)[None, :] * rng.uniform(0.8, 1.25, (n, p))
    errors = -np.sort(-errors, axis=1)
  elif family == "nonconvex":  # some channels: 2 bits barely beat 1, 4 bits much better
    a = costs * rng.lognormal(0.0, 0.5, n)
    errors = a[:, None] * 4.0 ** (-bits)[None, :]
    flat = rng.random(n) < 0.5
    errors[flat, 1:-1] = errors[flat, :1] * rng.uniform(0.95, 0.999, (flat.sum(), p - 2))
    errors[flat, -1] = errors[flat, 0] * rng.uniform(0.001, 0.05, flat.sum())
  elif family == "wide":  # per-channel error scales spanning 8 decades
    errors = -np.sort(-rng.random((n, p)), axis=1) * 10.0 ** rng.uniform(-8, 0, (n, 1))
  else:
    raise AssertionError(family)
  return errors, costs


def budgets_for(rng):
  return (1.0, float(rng.uniform(1.0, 2.0)), float(rng.uniform(1.0, 4.0)), 4.0)


CASES = [pytest.param(BITS3, 7, id="bits124"), pytest.param(BITS4, 5, id="bits1234")]
N_SEEDS = 30


def _sweep(bits, max_n, family, seed0):
  for seed in range(seed0, seed0 + N_SEEDS):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, max_n + 1))
    errors, costs = make_problem(family, rng, n, bits)
    for budget in budgets_for(rng):
      yield seed, budget, errors, costs


# --------------------------------------------------------------------------------------------
# Exhaustive comparison on tiny problems.


@pytest.mark.parametrize("family", ["uniform", "realistic", "nonconvex"])
@pytest.mark.parametrize("bits,max_n", CASES)
def test_milp_matches_brute_force(bits, max_n, family):
  failures = []
  for seed, budget, errors, costs in _sweep(bits, max_n, family, seed0=1000):
    opt = brute_force_optimum(errors, costs, bits, budget)
    choice = solve_milp(errors, costs, bits, budget)
    assert choice.shape == (errors.shape[0],)
    assert np.issubdtype(choice.dtype, np.integer)
    assert choice.min() >= 0 and choice.max() < len(bits)
    assert used_bits(costs, bits, choice) <= budget * costs.sum() * (1 + 1e-9), (seed, budget)
    got = objective(errors, choice)
    if not np.isclose(got, opt, rtol=1e-9, atol=0.0):
      failures.append((seed, budget, got, opt))
  assert not failures, f"milp not optimal (seed, budget, got, optimum): {failures}"


@pytest.mark.parametrize("family", ["uniform", "realistic", "nonconvex", "wide"])
@pytest.mark.parametrize("bits,max_n", CASES)
def test_greedy_within_one_channel_of_brute_force(bits, max_n, family):
  for seed, budget, errors, costs in _sweep(bits, max_n, family, seed0=2000):
    opt = brute_force_optimum(errors, costs, bits, budget)
    choice = solve_greedy(errors, costs, bits, budget)
    assert choice.shape == (errors.shape[0],)
    assert choice.min() >= 0 and choice.max() < len(bits)
    assert used_bits(costs, bits, choice) <= budget * costs.sum() * (1 + 1e-9), (seed, budget)
    got = objective(errors, choice)
    slack = 1e-12 * abs(opt)
    assert got >= opt - slack, (seed, budget, got, opt)
    assert got <= opt + one_channel_bound(errors) + slack, (seed, budget, got, opt)


@pytest.mark.parametrize("bits,max_n", CASES)
def test_milp_respects_budget_and_is_near_optimal_on_wide_error_ranges(bits, max_n):
  # The exact check for this family is test_milp_exact_when_errors_span_many_decades.
  for seed, budget, errors, costs in _sweep(bits, max_n, "wide", seed0=3000):
    opt = brute_force_optimum(errors, costs, bits, budget)
    choice = solve_milp(errors, costs, bits, budget)
    assert used_bits(costs, bits, choice) <= budget * costs.sum() * (1 + 1e-9), (seed, budget)
    got = objective(errors, choice)
    assert opt - 1e-12 * opt <= got <= opt + 1e-5 * np.abs(errors).max(), (seed, budget)


def test_milp_exact_when_errors_span_many_decades():
  failures = []
  for bits, max_n in ((BITS3, 7), (BITS4, 5)):
    for seed, budget, errors, costs in _sweep(bits, max_n, "wide", seed0=3000):
      opt = brute_force_optimum(errors, costs, bits, budget)
      got = objective(errors, solve_milp(errors, costs, bits, budget))
      if not np.isclose(got, opt, rtol=1e-9, atol=0.0):
        failures.append((seed, budget, (got - opt) / opt))
  assert not failures, failures


def test_milp_abs_gap_minimal_instance():
  # Seven channels whose errors span 1e-9 .. 0.78 (found by the sweep above, rounded).
  errors = np.array(
    [
      [1.64679544e-06, 1.48311245e-06, 5.38602724e-07],
      [1.45862242e-02, 2.51811196e-03, 9.07635761e-04],
      [7.11548652e-02, 6.85102252e-03, 3.01915138e-03],
      [4.59668416e-02, 3.94192411e-02, 1.32087081e-02],
      [1.73815296e-08, 1.30259608e-08, 2.87296781e-09],
      [2.95842840e-08, 1.78980632e-08, 1.72096322e-08],
      [7.84214252e-01, 6.70985931e-01, 2.20638106e-01],
    ]
  )
  costs = np.array([3833.0, 3436.0, 3231.0, 3847.0, 3288.0, 1943.0, 2367.0])
  better = np.array([1, 2, 2, 2, 0, 0, 2])
  assert used_bits(costs, BITS3, better) <= 3.0 * costs.sum()  # 64,421 <= 3 * 21,945 = 65,835
  choice = solve_milp(errors, costs, BITS3, 3.0)
  assert objective(errors, choice) <= objective(errors, better) * (1 + 1e-9)


# --------------------------------------------------------------------------------------------
# Hand-made problems.


NONCONVEX_ERRORS = np.array([[1.0, 0.99, 0.01], [1.0, 0.3, 0.1]])


def test_non_convex_channel_milp_jumps_from_1_to_4_bits():
  # Two channels of equal cost, budget 2.5 -> 5 bits in total. Channel A: 2 bits barely helps,
  # 4 bits does (its hull skips 2). Options: A4+B1 = 0.01 + 1.0 = 1.01, A1+B4 = 1.0 + 0.1 = 1.1,
  # A2+B2 = 0.99 + 0.3 = 1.29, the rest worse. Optimum: A at 4 bits, B at 1 bit.
  choice = solve_budget(NONCONVEX_ERRORS, np.full(2, 256.0), (1, 2, 4), 2.5, solver="milp")
  np.testing.assert_array_equal(choice, [2, 0])


def test_non_convex_channel_greedy():
  costs = np.full(2, 256.0)
  # Budget 3 -> 6 bits: A4+B2 = 0.31 is optimal (A2+B4 = 1.09, A4+B1 = 1.01); the greedy's
  # hull walk must take A straight from 1 to 4 bits.
  np.testing.assert_array_equal(
    solve_budget(NONCONVEX_ERRORS, costs, (1, 2, 4), 3.0, solver="greedy"), [2, 1]
  )
  # Budget 2.5: the LP relaxation is fractional on A; rounding it down may lose up to one
  # channel's gain (0.99) relative to the optimum 1.01, but must stay feasible.
  choice = solve_budget(NONCONVEX_ERRORS, costs, (1, 2, 4), 2.5, solver="greedy")
  assert used_bits(costs, BITS3, choice) <= 2.5 * 512
  assert 1.01 <= objective(NONCONVEX_ERRORS, choice) <= 1.01 + 0.99


@pytest.mark.parametrize("solver", ["milp", "greedy"])
def test_costs_weight_the_budget(solver):
  # Costs 3000 and 1000, budget 1.5 -> capacity 6000 bits, 4000 spent at 1 bit. The big channel
  # saves the most per bit but any upgrade of it costs >= 3000 > 2000 left; the small one can
  # go to 2 bits (+1000) but not to 4 (+3000). Optimum: [1 bit, 2 bits].
  errors = np.array([[10.0, 5.0, 1.0], [1.0, 0.5, 0.1]])
  costs = np.array([3000.0, 1000.0])
  choice = solve_budget(errors, costs, (1, 2, 4), 1.5, solver=solver)
  np.testing.assert_array_equal(choice, [0, 1])


@pytest.mark.parametrize("solver", ["milp", "greedy"])
@pytest.mark.parametrize("bits", [(1, 2, 4), (1, 2, 3, 4)])
def test_edge_budgets(bits, solver):
  rng = np.random.default_rng(7)
  errors, costs = make_problem("uniform", rng, 50, np.asarray(bits, float))
  low = solve_budget(errors, costs, bits, 1.0, solver=solver)
  np.testing.assert_array_equal(low, 0)  # budget 1: everything at 1 bit
  high = solve_budget(errors, costs, bits, 4.0, solver=solver)
  # budget 4 (= max bits): every channel can take its lowest-error precision.
  np.testing.assert_allclose(objective(errors, high), errors.min(axis=1).sum(), rtol=1e-12)


@pytest.mark.parametrize("solver", ["milp", "greedy", "auto"])
def test_single_precision_and_empty(solver):
  errors = np.random.default_rng(0).random((5, 1))
  out = solve_budget(errors, np.full(5, 64.0), (2,), 2.0, solver=solver)
  np.testing.assert_array_equal(out, 0)
  empty = solve_budget(np.zeros((0, 3)), np.zeros(0), (1, 2, 4), 1.5, solver=solver)
  assert empty.shape == (0,)


def test_solve_budget_auto_is_exact_on_small_problems():
  rng = np.random.default_rng(11)
  errors, costs = make_problem("nonconvex", rng, 6, BITS3)
  opt = brute_force_optimum(errors, costs, BITS3, 1.7)
  choice = solve_budget(errors, costs, [1, 2, 4], 1.7)  # list bits, default solver
  assert choice.dtype == np.int64
  np.testing.assert_allclose(objective(errors, choice), opt, rtol=1e-9)


# --------------------------------------------------------------------------------------------
# Known failure: collinear (bits, error) points.


def _collinear_problems(bits):
  for seed in range(60):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 1.0)
    d = rng.uniform(1e-3, x / bits[-1])
    errors = (x - d * (bits - bits[0]))[None, :]  # exactly linear in bits (up to rounding)
    for budget in np.arange(1.0, 4.01, 0.5):
      yield seed, float(budget), errors


@pytest.mark.parametrize("solver", ["greedy", "milp"])  # milp returns greedy's lower objective
def test_collinear_errors_respect_budget(solver):
  over = []
  for seed, budget, errors in _collinear_problems(BITS4):
    choice = solve_budget(errors, np.ones(1), BITS4, budget, solver=solver)
    if BITS4[choice].sum() > budget * (1 + 1e-9):
      over.append((seed, budget, BITS4[choice].tolist()))
  assert not over, over


def test_collinear_minimal_example():
  choice = solve_greedy(np.array([[0.3, 0.2, 0.1, 0.0]]), np.ones(1), BITS4, 2.0)
  assert BITS4[choice].sum() <= 2.0  # got 4.0


def test_collinear_errors_with_bits_124_respect_budget():
  for seed, budget, errors in _collinear_problems(BITS3):
    for solver in ("greedy", "milp"):
      choice = solve_budget(errors, np.ones(1), BITS3, budget, solver=solver)
      assert BITS3[choice].sum() <= budget * (1 + 1e-9), (seed, budget, solver)


# --------------------------------------------------------------------------------------------
# Known failure: MILP feasibility tolerance.


def test_milp_budget_is_hard_near_integer_capacity():
  errors = np.tile([1.0, 0.5, 0.1], (7, 1))
  costs = np.ones(7)
  budget = 2.0 - 1e-7
  choice = solve_milp(errors, costs, BITS3, budget)
  assert used_bits(costs, BITS3, choice) <= budget * costs.sum() * (1 + 1e-9)


def test_greedy_budget_is_hard_near_integer_capacity():
  errors = np.tile([1.0, 0.5, 0.1], (7, 1))
  costs = np.ones(7)
  for budget in (2.0 - 1e-7, 2.0 - 1e-10, 2.0):
    choice = solve_greedy(errors, costs, BITS3, budget)
    assert used_bits(costs, BITS3, choice) <= budget * costs.sum() * (1 + 1e-12)
  # exactly 2.0 allows 14 bits: e.g. 7 channels at 2, or 3 at 4 + 1 at 2 + 3 at 1 ... the
  # optimum here (brute force) must be reached within one channel's gain.
  opt = brute_force_optimum(errors, costs, BITS3, 2.0)
  got = objective(errors, solve_greedy(errors, costs, BITS3, 2.0))
  assert opt <= got <= opt + one_channel_bound(errors)


# --------------------------------------------------------------------------------------------
# Mid-size and large problems: certified lower bound instead of enumeration.


@pytest.mark.parametrize("budget", [1.3, 2.0])
def test_greedy_vs_milp_mid_size(budget):
  rng = np.random.default_rng(42)
  n = 2000
  costs = rng.choice([64.0, 128.0, 4096.0, 11008.0], n)  # layers of different in_features
  a = costs * rng.lognormal(0.0, 1.0, n)
  errors = a[:, None] * 4.0 ** (-BITS3)[None, :] * rng.uniform(0.7, 1.3, (n, 3))
  lower = lagrangian_lower_bound(errors, costs, BITS3, budget)
  m = solve_milp(errors, costs, BITS3, budget)
  g = solve_greedy(errors, costs, BITS3, budget)
  cap = budget * costs.sum()
  assert used_bits(costs, BITS3, m) <= cap * (1 + 1e-9)
  assert used_bits(costs, BITS3, g) <= cap * (1 + 1e-9)
  om, og = objective(errors, m), objective(errors, g)
  bound = one_channel_bound(errors)
  assert lower * (1 - 1e-9) <= om
  assert lower * (1 - 1e-9) <= og
  assert og <= om + bound
  assert og <= lower + bound * (1 + 1e-9)  # LP rounded down: within one channel of the LP
  assert og <= om * (1 + 1e-3)


@pytest.mark.parametrize("bits", [BITS3, BITS4])
def test_greedy_large_input(bits):
  rng = np.random.default_rng(5)
  n = 200_000
  costs = rng.integers(64, 4097, n).astype(np.float64)
  a = costs * rng.lognormal(0.0, 1.0, n)
  errors = a[:, None] * 4.0 ** (-bits)[None, :] * rng.uniform(0.7, 1.3, (n, len(bits)))
  budget = 1.5
  choice = solve_budget(errors, costs, bits, budget, solver="greedy")
  assert choice.shape == (n,)
  assert used_bits(costs, bits, choice) <= budget * costs.sum() * (1 + 1e-12)
  # Budget nearly spent (leftover < one largest upgrade) and within one channel of the LP.
  assert used_bits(costs, bits, choice) >= budget * costs.sum() - costs.max() * (bits[-1] - bits[0])
  lower = lagrangian_lower_bound(errors, costs, bits, budget)
  got = objective(errors, choice)
  assert lower * (1 - 1e-9) <= got <= lower + one_channel_bound(errors) + 1e-9 * got


# --------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize("solver", ["milp", "greedy", "auto"])
@pytest.mark.parametrize("bits,budget", [((1, 2, 4), 0.5), ((2, 4), 1.5), ((2, 3, 4), 1.999)])
def test_infeasible_budget_raises(bits, budget, solver):
  errors = np.random.default_rng(0).random((4, len(bits)))
  with pytest.raises(QuantizationError, match="budget") as info:
    solve_budget(errors, np.full(4, 128.0), bits, budget, solver=solver)
  assert str(budget) in str(info.value)


@pytest.mark.parametrize("bits", [(2, 1, 4), (1, 2, 2), (4, 2, 1), (1, 4, 3)])
def test_non_ascending_bits_raise(bits):
  errors = np.random.default_rng(0).random((4, 3))
  with pytest.raises(QuantizationError, match="ascending"):
    solve_budget(errors, np.full(4, 128.0), bits, 2.0)


# --------------------------------------------------------------------------------------------
# Bucket-size alignment (one tensor): brute force over which channels move.


def best_moves(errors, choice, frm, to, count):
  """Lowest total error after moving `count` channels from precision frm to to (enumerated)."""
  at = [c for c in range(len(choice)) if choice[c] == frm]
  best = np.inf
  for moved in itertools.combinations(at, count):
    new = np.array(choice)
    new[list(moved)] = to
    best = min(best, errors[np.arange(len(new)), new].sum())
  return best


@pytest.mark.parametrize(
  "top, slack, direction", [(5, 0.0, "down"), (7, 1e9, "up"), (7, 0.0, "down")]
)
def test_align_counts_moves_the_best_channels(top, slack, direction):
  rng = np.random.default_rng(top)
  n, m, k = 12, 4, 64
  errors = np.sort(rng.exponential(size=(n, 2)), axis=1)[:, ::-1].copy()  # 1 bit worse than 2
  choice = np.array([1] * top + [0] * (n - top))
  rng.shuffle(choice)
  new, added = align_counts(errors, choice, (1, 2), k, m, slack)
  r = top % m
  if direction == "down":
    assert (new == 1).sum() == top - r and added == -r * k
    expected = best_moves(errors, choice, 1, 0, r)
  else:
    assert (new == 1).sum() == top + m - r and added == (m - r) * k
    expected = best_moves(errors, choice, 0, 1, m - r)
  assert errors[np.arange(n), new].sum() == pytest.approx(expected, rel=1e-12)
  assert ((new != choice).sum()) == (r if direction == "down" else m - r)


def test_align_counts_three_precisions_multiples_and_budget():
  rng = np.random.default_rng(0)
  n, m, k = 1000, 16, 128
  errors = np.sort(rng.exponential(size=(n, 3)), axis=1)[:, ::-1].copy()
  bits = np.array([1.0, 2.0, 4.0])
  choice = rng.integers(0, 3, n)
  slack = 5.0 * k
  new, added = align_counts(errors, choice, bits, k, m, slack)
  counts = [(new == p).sum() for p in range(3)]
  assert counts[1] % m == 0 and counts[2] % m == 0 and sum(counts) == n
  assert added <= slack
  assert added == pytest.approx(k * (bits[new].sum() - bits[choice].sum()))
  assert (new != choice).sum() <= 2 * (m - 1)


def brute_force_with_counts(errors, counts):
  """min over every assignment with exactly counts[p] channels at precision p (P^N enumerated)."""
  n, p = errors.shape
  grid = np.array(list(itertools.product(range(p), repeat=n)), dtype=np.int64)
  ok = np.all(np.stack([(grid == j).sum(axis=1) for j in range(p)], axis=1) == counts, axis=1)
  return float(errors[np.arange(n)[None, :], grid[ok]].sum(axis=1).min())


@pytest.mark.parametrize("p", [2, 3, 4])
def test_assign_counts_matches_brute_force(p):
  rng = np.random.default_rng(p)
  for trial in range(6):
    n = 7 if p < 4 else 6
    errors = rng.exponential(size=(n, p)) * rng.lognormal(0, 2, (n, 1))  # not sorted: any order
    counts = np.bincount(rng.integers(0, p, n), minlength=p)
    choice = assign_counts(errors, counts)
    assert np.array_equal(np.bincount(choice, minlength=p), counts), trial
    want = brute_force_with_counts(errors, counts)
    assert errors[np.arange(n), choice].sum() == pytest.approx(want, rel=1e-9), trial
  with pytest.raises(QuantizationError, match="do not split 3 channels"):
    assign_counts(np.ones((3, 2)), np.array([1, 1]))


def test_assign_counts_matches_the_transportation_lp():
  """300 channels, 3 precisions: the objective of scipy's LP (integral here: a transportation
  problem) over x[c, p] in [0, 1] with one precision per channel and counts per precision."""
  rng = np.random.default_rng(7)
  n, p = 300, 3
  errors = np.sort(rng.exponential(size=(n, p)), axis=1)[:, ::-1] * rng.lognormal(0, 1, (n, 1))
  counts = np.array([70, 150, 80])
  rows = np.kron(np.eye(n), np.ones((1, p)))
  cols = np.kron(np.ones((1, n)), np.eye(p))
  lp = scipy.optimize.linprog(
    errors.reshape(-1), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([np.ones(n), counts]),
    bounds=(0, 1), method="highs",
  )
  choice = assign_counts(errors, counts)
  assert np.array_equal(np.bincount(choice, minlength=p), counts)
  assert errors[np.arange(n), choice].sum() == pytest.approx(lp.fun, rel=1e-9)


@pytest.mark.parametrize("bits", [(1.0, 2.0), (1.0, 2.0, 4.0)])
def test_shared_counts_are_rounded_means_within_the_budget(bits):
  """Counts per class: multiples of the class's multiple (cumulatively from the top), each within
  one multiple of its tensors' mean count, and the model within its code-bit capacity."""
  rng = np.random.default_rng(len(bits))
  bits = np.asarray(bits)
  classes = []
  for n, k, m, tensors in [(256, 64, 16, 3), (512, 128, 32, 2), (96, 256, 1, 4)]:
    mix = [rng.dirichlet(np.ones(len(bits))) for _ in range(tensors)]
    choices = [rng.choice(len(bits), n, p=q) for q in mix]
    classes.append((choices, k, m))
  solved = sum(len(ch) * k * bits[c].sum() for ch, k, _ in classes for c in ch)
  for capacity in (solved, solved * (1 + 1e-3)):  # tight: the rounding must come back down
    counts = shared_counts(classes, bits, capacity)
    used = 0.0
    for (choices, k, m), c in zip(classes, counts):
      n = len(choices[0])
      assert c.sum() == n and (c >= 0).all()
      at_or_above = np.cumsum(c[::-1])[::-1][1:]  # channels at precision >= 1, >= 2, ...
      assert (at_or_above % m == 0).all()
      mean = np.mean([[(ch >= j).sum() for j in range(1, len(bits))] for ch in choices], axis=0)
      assert (np.abs(at_or_above - mean) <= m).all()
      used += len(choices) * k * float(c @ bits)
    assert used <= capacity * (1 + 1e-12)
