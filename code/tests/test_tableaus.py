"""The Butcher tableaus satisfy the order conditions they claim, and their midpoint weights give y(t + h/2)."""

import math
from fractions import Fraction

import numpy as np
import pytest

from implicit_layers._tableaus import ODE_METHODS, ButcherTableau


def rooted_trees(order):
    """Every rooted tree with ``order`` vertices, as a sorted tuple of its root's subtrees."""
    if order == 1:
        return [()]
    trees = set()
    for first in range(1, order):
        for child in rooted_trees(first):
            for rest in rooted_trees(order - first):
                trees.add(tuple(sorted(rest + (child,))))
    return sorted(trees)


def tree_order(tree):
    return 1 + sum(tree_order(child) for child in tree)


def density(tree):
    """gamma(t): the tree's order times the densities of its subtrees."""
    return tree_order(tree) * math.prod(density(child) for child in tree)


def stage_weights(tableau, tree):
    """The vector Phi_i(t) of the elementary weight, so that the condition reads b . Phi(t) = 1 / gamma(t)."""
    a = np.zeros((len(tableau.c), len(tableau.c)))
    for i, row in enumerate(tableau.a):
        a[i, : len(row)] = row
    phi = np.ones(len(tableau.c))
    for child in tree:
        phi = phi * (a @ stage_weights(tableau, child))
    return phi


def test_rooted_tree_counts():
    assert [len(rooted_trees(n)) for n in range(1, 6)] == [1, 1, 2, 4, 9]


@pytest.mark.parametrize("name", list(ODE_METHODS))
def test_order_conditions(name):
    """b meets every condition up to the method's order and fails one of the next (b_low: one order lower)."""
    tableau = ODE_METHODS[name]
    for weights, order in ((tableau.b, tableau.order), (tableau.b_low, tableau.order - 1)):
        if weights is None:
            continue
        for n in range(1, order + 1):
            for tree in rooted_trees(n):
                assert np.dot(weights, stage_weights(tableau, tree)) == pytest.approx(1 / density(tree), abs=1e-13)
        defects = [abs(np.dot(weights, stage_weights(tableau, tree)) - 1 / density(tree))
                   for tree in rooted_trees(order + 1)]
        assert max(defects) > 1e-6, f"{name}: weights of order {order} meet the conditions of order {order + 1}"


@pytest.mark.parametrize("name", [name for name, tableau in ODE_METHODS.items() if tableau.b_mid is not None])
def test_midpoint_weights_meet_the_continuous_order_conditions(name):
    """At theta = 1/2 the conditions read b_mid . Phi(t) = theta**order(t) / gamma(t), for the interpolant's order 4."""
    tableau = ODE_METHODS[name]
    for n in range(1, 5):
        for tree in rooted_trees(n):
            assert np.dot(tableau.b_mid, stage_weights(tableau, tree)) == pytest.approx(
                0.5**n / density(tree), abs=1e-12
            )


@pytest.mark.parametrize("name", [name for name, tableau in ODE_METHODS.items() if tableau.b_mid is not None])
def test_midpoint_weights_reproduce_a_polynomial_solution(name):
    """On y' = 4 t**3 (solution t**4) the quartic interpolant is exact: b_mid lands on y(t0 + h/2) to round-off."""
    tableau = ODE_METHODS[name]
    t0, h = Fraction(3, 10), Fraction(7, 10)
    stages = [4 * float(t0 + c * h) ** 3 for c in tableau.c]
    midpoint = float(t0) ** 4 + float(h) * np.dot(tableau.b_mid, stages)
    assert midpoint == pytest.approx(float(t0 + h / 2) ** 4, rel=1e-13)


def test_midpoint_weights_converge_at_fifth_order_on_exp():
    """On y' = y the midpoint value's local error falls as h**5 (an order-4 interpolant): halving h divides it
    by about 32."""
    tableau = ODE_METHODS["dopri5"]

    def midpoint_error(h):
        stages = []
        for row in tableau.a:
            stages.append(1.0 + h * sum(a * k for a, k in zip(row, stages)))
        return abs(1.0 + h * np.dot(tableau.b_mid, stages) - math.exp(h / 2))

    slope = math.log2(midpoint_error(0.2) / midpoint_error(0.1))
    assert slope > 4.5


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(a=((), (0.4,))), "row 1 of a"),
        (dict(b=(0.5, 0.6)), "b needs 2 entries summing to 1"),
        (dict(b_low=(1.0,)), "b_low needs 2 entries"),
        (dict(b_mid=(0.5, 0.5)), "b_mid needs 2 entries summing to 1/2"),
        (dict(fsal=True), "fsal=True"),
    ],
)
def test_inconsistent_tableaus_are_refused(change, message):
    fields = dict(name="broken", order=2, c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0))
    with pytest.raises(ValueError, match=message):
        ButcherTableau(**{**fields, **change})


def test_methods_are_named_by_their_keys():
    assert list(ODE_METHODS) == ["euler", "midpoint", "rk4", "bosh3", "dopri5", "tsit5"]
    assert all(ODE_METHODS[name].name == name for name in ODE_METHODS)
    assert [name for name, tableau in ODE_METHODS.items() if tableau.adaptive] == ["bosh3", "dopri5", "tsit5"]
