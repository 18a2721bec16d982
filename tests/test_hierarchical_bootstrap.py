"""The two-level bootstrap of a gain between two groups of runs (seeds, then test
images): against a direct resampling written here from its definition, and its coverage
on synthetic runs with a known effect."""

from __future__ import annotations

import numpy as np
import pytest

from kd_mlflow.stats import hierarchical_bootstrap


def _direct(a, b, paired: bool, n_resamples: int, seed: int, scale: float = 1.0):
    """The definition, one resample at a time, drawing from the same stream in the same
    order: the runs of every resample, then each resample's images."""
    rng = np.random.default_rng(seed)
    runs_a = rng.integers(0, len(a), size=(n_resamples, len(a)))
    runs_b = runs_a if paired else rng.integers(0, len(b), size=(n_resamples, len(b)))
    images = rng.integers(0, a.shape[1], size=(n_resamples, a.shape[1]))
    gains = []
    for r in range(n_resamples):
        side_a = [np.mean([a[j, i] for i in images[r]]) for j in runs_a[r]]
        side_b = [np.mean([b[j, i] for i in images[r]]) for j in runs_b[r]]
        gains.append(scale * (np.mean(side_b) - np.mean(side_a)))
    return np.percentile(gains, [2.5, 97.5])


@pytest.mark.parametrize("paired", [True, False])
def test_it_is_the_direct_two_level_resampling(paired):
    rng = np.random.default_rng(7)
    a = (rng.random((4, 30)) < 0.7).astype(float)
    b = (rng.random((4 if paired else 6, 30)) < 0.8).astype(float)
    got = hierarchical_bootstrap(a, b, paired=paired, scale=100.0, n_resamples=300, seed=3)
    lo, hi = _direct(a, b, paired, 300, 3, scale=100.0)
    assert (got.lo, got.hi) == pytest.approx((lo, hi), abs=1e-9)
    assert got.estimate == pytest.approx(100.0 * (b.mean() - a.mean()))
    assert (got.n_runs_a, got.n_runs_b, got.n_images, got.paired) == (len(a), len(b), 30, paired)


def _synthetic(rng, effect: float, n_runs: int, n_images: int, paired: bool):
    """Per-run, per-image values: a group mean, a seed effect per run (shared by a pair
    when paired), an image effect shared by every run, and per-run-per-image noise."""
    image = rng.normal(0, 1.0, n_images)
    seed_a = rng.normal(0, 0.5, (n_runs, 1))
    seed_b = seed_a + rng.normal(0, 0.2, (n_runs, 1)) if paired else rng.normal(0, 0.5, (n_runs, 1))
    # an image-by-group interaction, so that the images' sampling error does not cancel
    slope = rng.normal(0, 0.5, n_images)
    a = seed_a + image + rng.normal(0, 1.0, (n_runs, n_images))
    b = effect + seed_b + image + slope + rng.normal(0, 1.0, (n_runs, n_images))
    return a, b


@pytest.mark.parametrize("paired", [True, False])
def test_coverage_of_a_known_effect_is_about_95_percent(paired):
    rng = np.random.default_rng(11 + paired)
    effect, draws = 0.3, 300
    covered = 0
    for d in range(draws):
        a, b = _synthetic(rng, effect, n_runs=12, n_images=80, paired=paired)
        iv = hierarchical_bootstrap(a, b, paired=paired, n_resamples=400, seed=d)
        covered += iv.lo <= effect <= iv.hi
    assert 0.88 <= covered / draws <= 0.99, covered / draws


def test_paired_groups_must_have_as_many_runs():
    with pytest.raises(ValueError, match="paired"):
        hierarchical_bootstrap(np.zeros((3, 5)), np.zeros((2, 5)), paired=True)
