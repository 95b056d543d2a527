"""The exact two-sample KS test against closed forms and hand-counted cases."""

from __future__ import annotations

import random
from math import comb

import pytest

from radixserve.security.ks import exact_pvalue, ks_2samp


def test_fully_separated_samples():
    # 3 vs 3, all of a below all of b: only 2 of the C(6,3) = 20 orders are that extreme
    result = ks_2samp([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert result.statistic == 1.0 and result.pvalue == pytest.approx(0.1)


@pytest.mark.parametrize("n", [5, 12, 30])
def test_equal_sizes_match_the_closed_form(n):
    # For n = m: P(D >= k/n) = 2 * sum_{j>=1} (-1)^(j+1) C(2n, n - j k) / C(2n, n)
    for k in range(1, n + 1):
        closed = 2 * sum((-1) ** (j + 1) * comb(2 * n, n - j * k) for j in range(1, n // k + 1)) / comb(2 * n, n)
        assert exact_pvalue(k * n, n, n) == pytest.approx(min(1.0, closed), rel=1e-12)


def test_statistic_and_symmetry():
    rng = random.Random(0)
    a = [rng.random() for _ in range(17)]
    b = [rng.random() + 0.3 for _ in range(23)]
    ab, ba = ks_2samp(a, b), ks_2samp(b, a)
    assert ab.statistic == pytest.approx(ba.statistic) and ab.pvalue == pytest.approx(ba.pvalue)
    # the statistic by brute force over every point
    points = sorted(a + b)
    brute = max(abs(sum(x <= p for x in a) / 17 - sum(x <= p for x in b) / 23) for p in points)
    assert ab.statistic == pytest.approx(brute)
    assert 0 < ab.pvalue < 1


def test_null_pvalues_are_not_too_small():
    # Under the null, P(p < alpha) <= alpha: 400 draws at alpha 0.05 stay well under 10%.
    rng = random.Random(1)
    small = sum(ks_2samp([rng.gauss(0, 1) for _ in range(12)], [rng.gauss(0, 1) for _ in range(12)]).pvalue < 0.05
                for _ in range(400))
    assert small < 40
