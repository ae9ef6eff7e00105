"""The plotting helpers draw what their labels say."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pcbtl.plots import distance_plot  # noqa: E402


def test_distance_plot_draws_the_exponential_prior_and_names_the_unit():
    rate = 3.0
    d = np.random.default_rng(0).exponential(1 / rate, 2000)
    ax = distance_plot(d, rate)
    assert ax.get_xlabel().endswith("(noise sds)")
    x, y = ax.lines[0].get_data()
    np.testing.assert_allclose(y, rate * np.exp(-rate * x))
    plt.close(ax.figure)
    ax = distance_plot(d, rate, units=None)  # a classifier's d has no noise scale
    assert ax.get_xlabel() == "distance d from the source model"
    plt.close(ax.figure)
