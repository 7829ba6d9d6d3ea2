"""KID (eval/kid.py): against torchmetrics' implementation and the definition, its lack of
small-sample bias next to FID's, its growth with a shift, its std, its seeding and refusals.

Features are Gaussian vectors standing in for backbone features; everything runs in well under
a second per test.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from xctsam.eval.fid import frechet_distance
from xctsam.eval.kid import kernel_distance, mmd2_unbiased
from xctsam.util.compat import ensure_torchvision


def _gaussian(seed: int, rows: int, dims: int = 32, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dims)) + shift


def _torchmetrics_kid():
    ensure_torchvision()  # torchmetrics imports torchvision, which needs the CPU patch here
    from torchmetrics.image import kid

    return kid


# ---------------------------------------------------------------- against other implementations
def test_subsets_agree_with_torchmetrics_poly_mmd():
    """Same subsets (drawn as the docstring says) through torchmetrics' poly_mmd: same mean and std."""
    tm = _torchmetrics_kid()
    a, b = _gaussian(1, 150), _gaussian(2, 120, shift=0.3)
    mean, std = kernel_distance(a, b, subsets=7, subset_size=50, seed=3)

    rng = np.random.default_rng(3)
    reference = []
    for _ in range(7):
        rows_a, rows_b = rng.choice(150, 50, replace=False), rng.choice(120, 50, replace=False)
        value = tm.poly_mmd(torch.from_numpy(a[rows_a]), torch.from_numpy(b[rows_b]))  # degree 3, gamma 1/d, coef 1
        reference.append(float(value))
    assert mean > 0.01  # a real shift, not a comparison of two zeros
    assert mean == pytest.approx(np.mean(reference), abs=1e-6, rel=1e-9)
    assert std == pytest.approx(np.std(reference), abs=1e-6, rel=1e-9)  # population std, as theirs
    assert std > 0


def test_whole_sets_agree_with_torchmetrics_metric_class():
    """torchmetrics' KernelInceptionDistance fed the features themselves (identity `feature`)."""
    tm = _torchmetrics_kid()
    a, b = _gaussian(4, 60), _gaussian(5, 60, shift=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "will save all extracted features in buffer"
        metric = tm.KernelInceptionDistance(feature=torch.nn.Identity(), subsets=3, subset_size=60)
    metric.update(torch.from_numpy(a), real=True)
    metric.update(torch.from_numpy(b), real=False)
    their_mean, their_std = metric.compute()
    # every subset is all 60 rows (in some order), so the subsets' draws cannot differ
    mean, std = kernel_distance(a, b, subsets=3, subset_size=60, seed=0)
    assert mean == pytest.approx(float(their_mean), abs=1e-6, rel=1e-9)
    assert std == pytest.approx(float(their_std), abs=1e-6)
    assert std < 1e-12


def test_mmd_matches_the_definition_pair_by_pair():
    """Plain double loops over the pairs of a small set, straight from the formula."""
    x, y = _gaussian(6, 7, dims=5), _gaussian(7, 7, dims=5, shift=0.5)
    m, d = x.shape

    def k(u: np.ndarray, v: np.ndarray) -> float:
        return (float(np.dot(u, v)) / d + 1.0) ** 3

    within = sum(k(x[i], x[j]) + k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    across = sum(k(x[i], y[j]) for i in range(m) for j in range(m))
    expected = within / (m * (m - 1)) - 2.0 * across / (m * m)
    assert mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-12)
    assert kernel_distance(x, y, subsets=1, subset_size=m) == pytest.approx((expected, 0.0), rel=1e-12)


# ---------------------------------------------------------------- behaviour
@pytest.mark.parametrize("seed", range(6))
def test_same_distribution_is_zero_within_its_std_where_fid_is_not(seed):
    features = np.random.default_rng(seed).standard_normal((160, 64))
    a, b = features[::2], features[1::2]  # 80 v 80 of one distribution
    mean, std = kernel_distance(a, b, subsets=100, subset_size=50, seed=0)
    assert std > 0
    assert abs(mean) < 2 * std
    assert frechet_distance(a, b) > 10  # FID's small-sample bias (about 27 here)


@pytest.mark.parametrize(
    ("make", "levels"),
    [
        (lambda base, noise, level: base + level, (0.0, 0.15, 0.3, 0.6, 1.2)),  # mean shift
        (lambda base, noise, level: base + level * noise, (0.0, 0.75, 1.5, 3.0)),  # added noise
    ],
    ids=["shift", "noise"],
)
def test_grows_monotonically_with_the_difference(make, levels):
    rng = np.random.default_rng(11)
    reference, base, noise = (rng.standard_normal((200, 64)) for _ in range(3))
    means = [kernel_distance(reference, make(base, noise, level), 50, 100, seed=0)[0] for level in levels]
    assert all(lower < higher for lower, higher in zip(means, means[1:])), means
    assert abs(means[0]) < 0.01 < means[1]


def test_std_over_subsets():
    a, b = _gaussian(8, 100), _gaussian(9, 100)
    assert kernel_distance(a, b, subsets=10, subset_size=30, seed=0)[1] > 0
    whole = kernel_distance(a, b, subsets=1, subset_size=100, seed=0)
    assert whole[1] == 0.0
    # several subsets that each cover everything: the same value each time
    assert kernel_distance(a, b, subsets=5, subset_size=100, seed=1) == pytest.approx(whole, abs=1e-12)


def test_subset_size_is_clipped_to_the_smaller_set():
    a, b = _gaussian(10, 40), _gaussian(11, 90)
    assert kernel_distance(a, b, subsets=4, subset_size=1000, seed=2) == kernel_distance(a, b, subsets=4, subset_size=40, seed=2)


def test_same_seed_same_numbers():
    a, b = _gaussian(12, 80), _gaussian(13, 70)
    first = kernel_distance(a, b, subsets=20, subset_size=30, seed=5)
    assert kernel_distance(a, b, subsets=20, subset_size=30, seed=5) == first
    assert kernel_distance(a, b, subsets=20, subset_size=30, seed=6) != first
    assert isinstance(first[0], float) and isinstance(first[1], float)


@pytest.mark.parametrize(
    ("a", "b", "kwargs", "message"),
    [
        (np.zeros((1, 4)), np.zeros((5, 4)), {}, "at least 2 samples"),
        (np.zeros((5, 4)), np.zeros((1, 4)), {}, "at least 2 samples"),
        (np.zeros((5, 4)), np.zeros((5, 3)), {}, "dimensions differ"),
        (np.zeros(5), np.zeros((5, 1)), {}, r"\(N, D\)"),
        (np.full((5, 4), np.nan), np.zeros((5, 4)), {}, "NaN"),
        (np.zeros((5, 4)), np.array([[0.0] * 4] * 4 + [[np.nan, 0, 0, 0]]), {}, "NaN"),
        (np.zeros((5, 4)), np.zeros((5, 4)), {"subsets": 0}, "subsets"),
        (np.zeros((5, 4)), np.zeros((5, 4)), {"subset_size": 1}, "subset_size"),
    ],
)
def test_refusals(a, b, kwargs, message):
    with pytest.raises(ValueError, match=message):
        kernel_distance(a, b, **kwargs)
