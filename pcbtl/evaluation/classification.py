r"""Scores of predicted class probabilities: discrimination, proper scores and calibration.

Conventions. ``y`` holds class indices ``0 … K−1`` (bools and ``{0, 1}`` floats are read as
indices); ``proba`` is either ``(n,)`` — the probability of class 1 of a binary task — or
``(n, K)`` with column ``k`` the probability of class ``k`` (rows summing to 1). Everything
scikit-learn provides is taken from :mod:`sklearn.metrics`; only the expected calibration error
(ECE), which scikit-learn does not have, and its bins are computed here.

The calibration bins are ``M`` (default 15) equal-width intervals of ``[0, 1]``,

.. math::

    B_1 = [0, 1/M],\qquad B_b = \big((b-1)/M,\; b/M\big] \quad (b = 2, …, M),

and, with the score ``s_i`` of row ``i`` and its outcome ``o_i ∈ \{0, 1\}``,

.. math::

    \mathrm{ECE} = \sum_{b=1}^{M} \frac{n_b}{n}\,\big|\bar o_b - \bar s_b\big|,\qquad
    \bar s_b = \frac{1}{n_b}\sum_{i: s_i ∈ B_b} s_i,\quad
    \bar o_b = \frac{1}{n_b}\sum_{i: s_i ∈ B_b} o_i

(empty bins contribute nothing; Naeini, Cooper & Hauskrecht 2015; Guo et al. 2017). Two
choices of ``(s, o)``, argument ``kind``:

* ``"positive"`` (default for two classes): ``s_i = p_i(y = 1)``, ``o_i = 1[y_i = 1]`` — the
  calibration of the predicted probability of the positive class over all of ``[0, 1]``, the
  quantity a reliability diagram of ``P(metal)`` shows;
* ``"top_label"`` (default for ``K ≥ 3``): ``s_i = \max_k p_i(y = k)`` (the confidence),
  ``o_i = 1[\arg\max_k p_i(y = k) = y_i]`` (Guo et al. 2017).

References
----------
Naeini M. P., Cooper G., Hauskrecht M. (2015) Obtaining well calibrated probabilities using
Bayesian binning. AAAI 29, 2901–2907.
Guo C., Pleiss G., Sun Y., Weinberger K. Q. (2017) On calibration of modern neural networks.
ICML, PMLR 70, 1321–1330.
Brier G. W. (1950) Verification of forecasts expressed in terms of probability. Monthly
Weather Review 78, 1–3.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from sklearn import metrics as skm

__all__ = [
    "CalibrationBins",
    "SCORE_NAMES",
    "calibration_bins",
    "calibrated_ece_reference",
    "classification_scores",
    "expected_calibration_error",
    "reliability_diagram",
]

#: Keys of :func:`classification_scores`, in the order tables show them.
SCORE_NAMES: tuple[str, ...] = (
    "roc_auc",
    "accuracy",
    "balanced_accuracy",
    "f1",
    "log_loss",
    "brier",
    "ece",
)

KINDS = ("auto", "positive", "top_label")


class CalibrationBins(NamedTuple):
    """Equal-width calibration bins (see the module docstring).

    Attributes
    ----------
    edges:
        ``(M + 1,)`` bin edges ``0, 1/M, …, 1``.
    counts:
        ``(M,)`` rows per bin ``n_b``.
    mean_score:
        ``(M,)`` mean score ``s̄_b`` per bin (NaN for an empty bin).
    mean_outcome:
        ``(M,)`` observed frequency ``ō_b`` per bin (NaN for an empty bin).
    kind:
        ``"positive"`` or ``"top_label"``: what ``s`` and ``o`` are.
    """

    edges: np.ndarray
    counts: np.ndarray
    mean_score: np.ndarray
    mean_outcome: np.ndarray
    kind: str


def _check(y: Any, proba: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(y as int indices (n,), proba as (n, K) float64)``; ``ValueError`` on bad input."""
    P = np.asarray(proba, dtype=np.float64)
    if P.ndim == 1:
        P = np.stack([1.0 - P, P], axis=1)
    if P.ndim != 2 or P.shape[1] < 2 or P.shape[0] == 0:
        raise ValueError(f"proba must be (n,) or (n, K) with K >= 2 and n >= 1, got {P.shape}")
    if not np.all(np.isfinite(P)) or P.min() < 0.0 or P.max() > 1.0:
        raise ValueError("proba must hold finite probabilities in [0, 1]")
    total = P.sum(axis=1, keepdims=True)
    if not np.allclose(total, 1.0, atol=1e-5):
        raise ValueError("each row of proba must sum to 1")
    P = P / total  # float32 round-off (≤ 1e-5) removed before scikit-learn's own check
    yy = np.asarray(y)
    if yy.ndim != 1 or yy.shape[0] != P.shape[0]:
        raise ValueError(f"y must be 1-D with one label per row of proba ({P.shape[0]})")
    if yy.dtype.kind == "b":
        yy = yy.astype(np.int64)
    if yy.dtype.kind not in "iuf" or not np.all(np.isfinite(yy)) or np.any(yy != np.round(yy)):
        raise ValueError("y must hold class indices 0 … K-1")
    yi = yy.astype(np.int64)
    if yi.min() < 0 or yi.max() >= P.shape[1]:
        raise ValueError(f"y must hold class indices 0 … {P.shape[1] - 1}")
    return yi, P


def _scores_outcomes(
    yi: np.ndarray, P: np.ndarray, kind: str
) -> tuple[np.ndarray, np.ndarray, str]:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        kind = "positive" if P.shape[1] == 2 else "top_label"
    if kind == "positive":
        if P.shape[1] != 2:
            raise ValueError("kind='positive' needs two classes; use 'top_label'")
        return P[:, 1], (yi == 1).astype(np.float64), kind
    return P.max(axis=1), (P.argmax(axis=1) == yi).astype(np.float64), kind


def calibration_bins(
    y: Any, proba: Any, *, n_bins: int = 15, kind: str = "auto"
) -> CalibrationBins:
    r"""Counts, mean scores and observed frequencies in ``n_bins`` equal-width bins.

    Row ``i`` falls in bin ``b = \max(1, \lceil M s_i \rceil)`` (``M = n_bins``): bins are
    closed on the right and the first also holds ``s = 0`` (module docstring).

    Parameters
    ----------
    y:
        Class indices ``(n,)``.
    proba:
        ``(n,)`` probabilities of class 1, or ``(n, K)``.
    n_bins:
        ``M``, the number of equal-width bins of ``[0, 1]`` (default 15).
    kind:
        ``"auto"``, ``"positive"`` or ``"top_label"`` (module docstring).

    Returns
    -------
    CalibrationBins
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    yi, P = _check(y, proba)
    s, o, kind = _scores_outcomes(yi, P, kind)
    idx = np.clip(np.ceil(s * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    counts = np.bincount(idx, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_s = np.bincount(idx, weights=s, minlength=n_bins) / counts
        mean_o = np.bincount(idx, weights=o, minlength=n_bins) / counts
    return CalibrationBins(np.linspace(0.0, 1.0, n_bins + 1), counts, mean_s, mean_o, kind)


def expected_calibration_error(
    y: Any, proba: Any, *, n_bins: int = 15, kind: str = "auto"
) -> float:
    r"""Expected calibration error with ``n_bins`` equal-width bins (default 15).

    .. math::

        \mathrm{ECE} = \sum_{b=1}^{M} \frac{n_b}{n}\,\big|\bar o_b - \bar s_b\big|

    with the bins, scores ``s`` and outcomes ``o`` of the module docstring (``kind``:
    positive class for two classes, top label for more). A perfectly calibrated classifier
    has ``E[ō_b] = s̄_b`` in every bin, so its ECE is the binning noise only, of order
    ``Σ_b (n_b/n) sqrt(s̄_b(1−s̄_b)/n_b)``.

    Parameters
    ----------
    y, proba, n_bins, kind:
        As :func:`calibration_bins`.

    Returns
    -------
    float
        ECE in ``[0, 1]``.

    Example
    -------
    >>> expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.9, 0.9])
    0.25
    """
    bins = calibration_bins(y, proba, n_bins=n_bins, kind=kind)
    ok = bins.counts > 0
    n = bins.counts.sum()
    gap = np.abs(bins.mean_outcome[ok] - bins.mean_score[ok])
    return float(np.round(np.sum(bins.counts[ok] / n * gap), 15))


def calibrated_ece_reference(
    proba: Any, *, n_bins: int = 15, kind: str = "auto", n_draws: int = 200, seed: int = 0
) -> tuple[float, float]:
    r"""ECE that a *perfectly calibrated* classifier predicting ``proba`` would score.

    The ECE is biased upwards by binning noise: even when ``P(y = k | p̂) = p̂_k`` exactly,
    ``ō_b`` scatters around ``s̄_b`` by about ``sqrt(s̄_b(1 − s̄_b)/n_b)``. This Monte Carlo
    reference draws labels from the predicted probabilities themselves,
    ``y*_i ~ Categorical(p̂_i)`` (``n_draws`` times), and returns the mean and the 95%
    quantile of :func:`expected_calibration_error` ``(y*, p̂)``. An observed ECE inside that
    range is consistent with perfect calibration at this sample size.

    Parameters
    ----------
    proba:
        ``(n,)`` probabilities of class 1, or ``(n, K)``.
    n_bins, kind:
        As :func:`expected_calibration_error`.
    n_draws:
        Monte Carlo label draws.
    seed:
        Seed of the draws.

    Returns
    -------
    (float, float)
        Mean and 95% quantile of the ECE under perfect calibration.
    """
    _, P = _check(np.zeros(np.shape(proba)[0], np.int64), proba)
    rng = np.random.default_rng(seed)
    cdf = np.cumsum(P, axis=1)
    values = []
    for _ in range(int(n_draws)):
        u = rng.random((P.shape[0], 1))
        y_star = np.minimum((cdf < u).sum(axis=1), P.shape[1] - 1)
        values.append(expected_calibration_error(y_star, P, n_bins=n_bins, kind=kind))
    return float(np.mean(values)), float(np.quantile(values, 0.95))


def classification_scores(
    y: Any, proba: Any, *, n_bins: int = 15, ece_kind: str = "auto"
) -> dict[str, float]:
    r"""All the scores of predicted probabilities, in the order of :data:`SCORE_NAMES`.

    With ``p_{ik}`` the probability of class ``k`` for row ``i`` and ``ŷ_i = \arg\max_k p_{ik}``:

    * ``roc_auc`` — area under the ROC curve of ``p_{i1}`` (binary), one-vs-rest macro
      average for ``K ≥ 3`` (:func:`sklearn.metrics.roc_auc_score`); NaN when ``y`` holds one
      class only (and ``balanced_accuracy`` is then that class's recall);
    * ``accuracy`` — ``(1/n) Σ 1[ŷ_i = y_i]``;
    * ``balanced_accuracy`` — mean over classes of the recall ``(1/K) Σ_k P(ŷ = k | y = k)``;
    * ``f1`` — ``2·precision·recall/(precision + recall)`` of class 1 (binary), macro average
      for ``K ≥ 3``;
    * ``log_loss`` — ``−(1/n) Σ log p_{i,y_i}`` (probabilities clipped by scikit-learn's
      :func:`~sklearn.metrics.log_loss` at machine epsilon);
    * ``brier`` — ``(1/n) Σ (p_{i1} − 1[y_i = 1])²`` (binary), ``(1/n) Σ_i Σ_k (p_{ik} −
      1[y_i = k])²`` for ``K ≥ 3`` (Brier 1950; :func:`sklearn.metrics.brier_score_loss`);
    * ``ece`` — :func:`expected_calibration_error` with ``n_bins`` and ``kind=ece_kind``.

    Parameters
    ----------
    y:
        Class indices ``(n,)``.
    proba:
        ``(n,)`` probabilities of class 1, or ``(n, K)``.
    n_bins, ece_kind:
        Bins and kind of the ECE.

    Returns
    -------
    dict
        ``{name: value}`` for every name of :data:`SCORE_NAMES`.

    Example
    -------
    >>> s = classification_scores([0, 0, 1, 1], [0.2, 0.6, 0.4, 0.9])
    >>> s["roc_auc"], s["accuracy"], s["brier"]
    (0.75, 0.5, 0.1925)
    """
    yi, P = _check(y, proba)
    K = P.shape[1]
    labels = np.arange(K)
    pred = P.argmax(axis=1)
    binary = K == 2
    present = np.unique(yi)
    if present.size < 2:
        # one class in y: no ROC curve; balanced accuracy is that class's recall (the
        # definition scikit-learn's balanced_accuracy_score applies, without its warning)
        auc = float("nan")
        bal = float(np.mean(pred == present[0]))
    elif binary:
        auc = float(skm.roc_auc_score(yi, P[:, 1]))
    else:
        auc = float(skm.roc_auc_score(yi, P, multi_class="ovr", average="macro", labels=labels))
    if present.size >= 2:
        bal = float(skm.balanced_accuracy_score(yi, pred))
    return {
        "roc_auc": auc,
        "accuracy": float(skm.accuracy_score(yi, pred)),
        "balanced_accuracy": bal,
        "f1": float(
            skm.f1_score(
                yi, pred, labels=labels, average="binary" if binary else "macro", zero_division=0.0
            )
        ),
        "log_loss": float(skm.log_loss(yi, P, labels=labels)),
        "brier": float(
            skm.brier_score_loss(yi, P[:, 1], pos_label=1)
            if binary
            else skm.brier_score_loss(yi, P, labels=labels)
        ),
        "ece": expected_calibration_error(yi, P, n_bins=n_bins, kind=ece_kind),
    }


def reliability_diagram(
    y: Any,
    proba: Any,
    *,
    n_bins: int = 15,
    kind: str = "auto",
    ax: Any = None,
    title: str | None = None,
    show_counts: bool = True,
) -> Any:
    r"""Reliability diagram: observed frequency ``ō_b`` against mean score ``s̄_b`` per bin.

    The bins are those of :func:`calibration_bins`; a calibrated classifier lies on the
    diagonal. Each bin's count ``n_b`` is drawn as a grey bar on a second (log-scaled)
    y-axis and written above the bar, and the title carries the ECE.

    Parameters
    ----------
    y, proba, n_bins, kind:
        As :func:`calibration_bins`.
    ax:
        Matplotlib axes (a new figure when ``None``).
    title:
        Title prefix (``"ECE …"`` is appended).
    show_counts:
        Draw the bin counts.

    Returns
    -------
    matplotlib.axes.Axes
        The reliability axes.
    """
    import matplotlib.pyplot as plt

    bins = calibration_bins(y, proba, n_bins=n_bins, kind=kind)
    if ax is None:
        _, ax = plt.subplots(figsize=(4.5, 4.5))
    ok = bins.counts > 0
    width = 1.0 / n_bins
    centres = bins.edges[:-1] + width / 2
    if show_counts:
        ax2 = ax.twinx()
        ax2.bar(centres[ok], bins.counts[ok], width=width * 0.9, color="0.85", zorder=0)
        ax2.set_yscale("log")
        ax2.set_ylim(0.8, max(10.0, bins.counts.max() * 30.0))
        ax2.set_ylabel("rows per bin", color="0.45", fontsize=8)
        ax2.tick_params(axis="y", colors="0.45", labelsize=7)
        for c, n in zip(centres[ok], bins.counts[ok], strict=True):
            ax2.text(c, n * 1.1, str(int(n)), ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_zorder(ax2.get_zorder() + 1)
        ax.patch.set_visible(False)
    ax.plot([0, 1], [0, 1], color="k", lw=0.8, ls="--")
    ax.plot(bins.mean_score[ok], bins.mean_outcome[ok], "o-", color="C0", ms=4)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    what = "P(class 1)" if bins.kind == "positive" else "confidence"
    ax.set_xlabel(f"mean predicted {what}")
    ax.set_ylabel("observed frequency" if bins.kind == "positive" else "accuracy")
    ece = expected_calibration_error(y, proba, n_bins=n_bins, kind=bins.kind)
    ax.set_title(f"{title + ': ' if title else ''}ECE {ece:.3f}", fontsize=9)
    return ax
