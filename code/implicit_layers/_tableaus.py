"""Explicit Runge-Kutta methods as data: Butcher tableaus in plain floats, read by the torch and the JAX ODE solver.

A method is its tableau plus an interpolant. Fixed-step methods (``euler``, ``midpoint``, ``rk4``) have no
embedded weights; adaptive ones (``bosh3``, ``dopri5``, ``tsit5``) carry ``b_low``, the weights of a lower-order
solution whose difference from ``b``'s gives the local error estimate. ``b_mid`` gives the solution at the step's
midpoint, which turns the cubic Hermite interpolant into a quartic one (dopri5, tsit5).
"""

import math
from dataclasses import dataclass

# A tolerance for sums of the published coefficients, which are rationals or 30-digit decimals rounded to float.
_SUM_TOLERANCE = 1e-12


@dataclass(frozen=True)
class ButcherTableau:
    """The coefficients of an explicit Runge-Kutta method, checked when built.

    A step of size ``h`` from ``(t, y)`` evaluates the stages
    ``k_i = f(t + c_i h, y + h * sum_j a[i][j] k_j)`` for ``j < i`` and returns ``y + h * sum_i b_i k_i``.

    Parameters
    ----------
    name : str
        The name ``odeint(method=...)`` takes.
    order : int
        The order of the solution given by ``b``; the step-size controller's exponents use it.
    c : tuple of float
        Stage times as fractions of the step, ``c[0] == 0``.
    a : tuple of tuple of float
        Row ``i`` holds ``a[i][0], ..., a[i][i-1]``; row 0 is ``()``.
    b : tuple of float
        Weights of the solution.
    b_low : tuple of float or None
        Weights of the embedded solution of order ``order - 1``; ``None`` for a fixed-step method.
    b_mid : tuple of float or None
        Weights giving the solution at the midpoint, ``y(t + h/2) ~ y + h * sum_i b_mid[i] k_i``; ``None`` where
        the interpolant is cubic Hermite.
    fsal : bool
        First same as last: the last stage is evaluated at the new solution (``c[-1] == 1`` and the last row of
        ``a`` equals ``b``), so it is the next step's first stage and an accepted step costs one evaluation less.

    Raises
    ------
    ValueError
        If the coefficients are inconsistent: a row of ``a`` of the wrong length or not summing to its ``c``,
        weights of the wrong length or not summing to one, or ``fsal`` not matching the coefficients.
    """

    name: str
    order: int
    c: tuple
    a: tuple
    b: tuple
    b_low: tuple = None
    b_mid: tuple = None
    fsal: bool = False

    def __post_init__(self):
        stages = len(self.c)
        if len(self.a) != stages or self.c[0] != 0:
            raise ValueError(f"{self.name}: a needs one row per stage ({stages}) and c[0] must be 0, got c={self.c}")
        for i, row in enumerate(self.a):
            if len(row) != i or not math.isclose(math.fsum(row), self.c[i], abs_tol=_SUM_TOLERANCE):
                raise ValueError(
                    f"{self.name}: row {i} of a needs {i} entries summing to c[{i}]={self.c[i]}, got {row}"
                )
        for field in ("b", "b_low"):
            weights = getattr(self, field)
            if weights is None:
                continue
            if len(weights) != stages or not math.isclose(math.fsum(weights), 1.0, abs_tol=_SUM_TOLERANCE):
                raise ValueError(f"{self.name}: {field} needs {stages} entries summing to 1, got {weights}")
        if self.b_mid is not None and (
            len(self.b_mid) != stages or not math.isclose(math.fsum(self.b_mid), 0.5, abs_tol=_SUM_TOLERANCE)
        ):
            raise ValueError(f"{self.name}: b_mid needs {stages} entries summing to 1/2, got {self.b_mid}")
        last_is_solution = self.c[-1] == 1 and all(
            math.isclose(a, b, abs_tol=_SUM_TOLERANCE) for a, b in zip(self.a[-1] + (0.0,), self.b)
        )
        if self.fsal != last_is_solution:
            raise ValueError(f"{self.name}: fsal={self.fsal} but the last stage is{'' if last_is_solution else ' not'} "
                             "evaluated at the new solution")

    @property
    def adaptive(self):
        """Whether the method has an embedded error estimate, so it can choose its own steps."""
        return self.b_low is not None

    @property
    def num_stages(self):
        """The number of stages, hence of evaluations of f per step (one less after the first when ``fsal``)."""
        return len(self.c)


EULER = ButcherTableau("euler", 1, c=(0.0,), a=((),), b=(1.0,))

MIDPOINT = ButcherTableau("midpoint", 2, c=(0.0, 0.5), a=((), (0.5,)), b=(0.0, 1.0))

# The classical fourth-order method (Kutta 1901).
RK4 = ButcherTableau(
    "rk4",
    4,
    c=(0.0, 0.5, 0.5, 1.0),
    a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
    b=(1 / 6, 1 / 3, 1 / 3, 1 / 6),
)

# Bogacki & Shampine (1989), "A 3(2) pair of Runge-Kutta formulas", Appl. Math. Lett. 2(4).
BOSH3 = ButcherTableau(
    "bosh3",
    3,
    c=(0.0, 1 / 2, 3 / 4, 1.0),
    a=((), (1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    b=(2 / 9, 1 / 3, 4 / 9, 0.0),
    b_low=(7 / 24, 1 / 4, 1 / 3, 1 / 8),
    fsal=True,
)

# Dormand & Prince (1980), "A family of embedded Runge-Kutta formulae", J. Comp. Appl. Math. 6(1), RK5(4)7M;
# the midpoint weights are Shampine's (1986), "Some practical Runge-Kutta formulas", Math. Comp. 46(173).
DOPRI5 = ButcherTableau(
    "dopri5",
    5,
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=(
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
    ),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_low=(5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40),
    b_mid=(
        6025192743 / 30085553152 / 2,
        0.0,
        51252292925 / 65400821598 / 2,
        -2691868925 / 45128329728 / 2,
        187940372067 / 1594534317056 / 2,
        -1776094331 / 19743644256 / 2,
        11237099 / 235043384 / 2,
    ),
    fsal=True,
)


def _tsit5_dense_weights(theta):
    """Weights of Tsitouras's (2011) continuous extension at ``theta`` in [0, 1]:
    ``y(t + theta h) ~ y + h sum_i b_i(theta) k_i``."""
    return (
        -1.0530884977290216 * theta * (theta - 1.3299890189751412)
        * (theta * theta - 1.4364028541716351 * theta + 0.7139816917074209),
        0.1017 * theta * theta * (theta * theta - 2.1966568338249754 * theta + 1.2949852507374631),
        2.490627285651252793 * theta * theta * (theta * theta - 2.38535645472061657 * theta + 1.57803468208092486),
        -16.54810288924490272 * (theta - 1.21712927295533244) * (theta - 0.61620406037800089) * theta * theta,
        47.37952196281928122 * (theta - 1.203071208372362603) * (theta - 0.658047292653547382) * theta * theta,
        -34.87065786149660974 * (theta - 1.2) * (theta - 2 / 3) * theta * theta,
        2.5 * (theta - 1) * (theta - 0.6) * theta * theta,
    )


# Tsitouras (2011), "Runge-Kutta pairs of order 5(4) satisfying only the first column simplifying assumption",
# Comput. Math. Appl. 62(2); coefficients to the paper's digits (rounded to float).
_TSIT5_LAST_ROW = (
    0.09646076681806522951816731316512876333711995238157997181903319145764851595234062815396,
    0.01,
    0.4798896504144995747752495322905965199130404621990332488332634944254542060153074523509,
    1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331,
    -3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677,
    2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841,
)
TSIT5 = ButcherTableau(
    "tsit5",
    5,
    c=(0.0, 0.161, 0.327, 0.9, 0.9800255409045096857298102862870245954942137979563024768854764293221195950761080302604,
       1.0, 1.0),
    a=(
        (),
        (0.161,),
        (
            -0.008480655492356988544426874250230774675121177393430391537369234245294192976164141156943,
            0.3354806554923569885444268742502307746751211773934303915373692342452941929761641411569,
        ),
        (
            2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289,
            -6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366,
            4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077,
        ),
        (
            5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791,
            -11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589,
            7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753,
            -0.09249506636175524925650207933207191611349983406029535244034750452930469056411389539635,
        ),
        (
            5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748,
            -12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452,
            8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986,
            -0.07158497328140099722453054252582973869127213147363544882721139659546372402303777878835,
            -0.02826905039406838290900305721271224146717633626879770007617876201276764571291579142206,
        ),
        _TSIT5_LAST_ROW,
    ),
    b=_TSIT5_LAST_ROW + (0.0,),
    b_low=(
        0.09468075576583945807478876255758922856117527357724631226139574065785592789071067303271,
        0.009183565540343253096776363936645313759813746240984095238905939532922955247253608687270,
        0.4877705284247615707855642599631228241516691959761363774365216240304071651579571959813,
        1.234297566930478985655109673884237654035539930748192848315425833500484878378061439761,
        -2.707712349983525454881109975059321670689605166938197378763992255714444407154902012702,
        1.866628418170587035753719399566211498666255505244122593996591602841258328965767580089,
        1 / 66,
    ),
    b_mid=_tsit5_dense_weights(0.5),
    fsal=True,
)

ODE_METHODS = {tableau.name: tableau for tableau in (EULER, MIDPOINT, RK4, BOSH3, DOPRI5, TSIT5)}
"""Every method ``odeint`` takes, by name."""
