"""Which sampler for the deep (scale) PC prior? Side by side on the band-gap fold-0 task.

    python benchmarks/bench_sampler.py --data-dir ../shared/data/bandgap \
        --samplers nuts,mclmc --seeds 0,1 --out benchmarks/results/sampler

The task is the headline's: :class:`pcbtl.HurdleRegressor` around
``PCTransferRegressor(source, prior="scale", transfer_layers=2)`` on Matbench's fold 0 of the
experimental band gaps (``KFold(5, shuffle=True, random_state=18012019)``), the source a
(128, 64) network trained on the 106,113 MP PBE gaps exactly as ``pcbtl bandgap`` trains it
(seed 0; ``--source FILE`` reuses a saved one). For each sampler and seed it fits the hurdle
(the classifier is the same for every fit; the regressor sees the 1,725 non-metal training
rows and 8,321 transfer weights) and records, on the 921 test materials:

* seconds for the fit (classifier included) and the regressor alone;
* MAE, and 95 % coverage and width for metals and non-metals apart;
* across the chains of the fit: the prediction R-hat of the posterior mean function at the
  non-metal test materials (share above 1.05 and above 1.1, largest), R-hat and bulk ESS of
  ``τ`` and ``σ``, the sampler warnings;

and, for each pair of seeds of one sampler, the share of test materials whose hurdle point
prediction moves by more than 0.1 eV (the issue's stability figure). Writes ``fits.csv``,
``pairs.csv`` and ``summary.md`` into ``--out``; a finished fit is appended at once, so an
interrupted run keeps what it has.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import platform
import sys
import time
import warnings
from datetime import date
from pathlib import Path

import numpy as np
from sklearn.model_selection import KFold

SAMPLER_OPTIONS = {
    # the band-gap application's NUTS settings before this benchmark (pcbtl bandgap)
    "nuts": dict(inference="nuts", num_warmup=300, num_samples=300),
    # MCLMC defaults of PCTransferRegressor (4 chains, 500 + 500 draws, 20 steps apart)
    "mclmc": dict(inference="mclmc"),
    "mclmc-8x": dict(inference="mclmc", num_chains=8),
    "mclmc-long": dict(inference="mclmc", thin=80),
    # the scale prior on the network linearised at the source: NUTS over (σ, τ), ε exact
    "tangent": dict(prior="tangent", inference="nuts"),
}


def _rhat_ess(draws: np.ndarray):
    from pcbtl.inference import rhat_ess

    return rhat_ess(draws)


def fit_one(source, X, y, Xte, yte, sampler: str, seed: int) -> tuple[dict, np.ndarray]:
    """Fit the hurdle with one sampler and seed; the row of figures and the point predictions."""
    from pcbtl.estimators.hurdle import HurdleRegressor
    from pcbtl.estimators.pc import PCTransferRegressor
    from pcbtl.materials.bandgap import _metal_features, _scores

    options = dict(SAMPLER_OPTIONS[sampler])
    reg = PCTransferRegressor(
        source,
        prior=options.pop("prior", "scale"),
        transfer_layers=2,
        seed=seed,
        progress_bar=False,
        **options,
    )
    model = HurdleRegressor(reg, classifier_features=_metal_features(source))
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(X, y)
    seconds = time.perf_counter() - t0
    pred = np.asarray(model.predict(Xte), np.float64)
    lo, hi = (np.asarray(a, np.float64) for a in model.predict_interval(Xte))
    row: dict = {"sampler": sampler, "seed": seed, "seconds": seconds}
    r = model.regressor_
    row["regressor_seconds"] = r.fit_seconds_
    row.update(_scores(yte, pred, lo, hi))
    nonmetal = yte > 0
    means = np.asarray(r._posterior_means(Xte[nonmetal].astype(np.float32)))
    chains = r.posterior_.num_chains
    rh, ess, _ = _rhat_ess(means.reshape(chains, -1, means.shape[-1]))
    row.update(
        chains=chains,
        pred_share_rhat_above_1_05=float(np.mean(rh > 1.05)),
        pred_share_rhat_above_1_1=float(np.mean(rh > 1.1)),
        pred_max_rhat=float(np.max(rh)),
        pred_median_bulk_ess=float(np.median(ess)),
        # the side-by-side cost figure: regressor seconds per effective draw of the prediction
        pred_seconds_per_ess=float(r.fit_seconds_ / max(np.median(ess), 1e-9)),
    )
    for site in ("tau", "sigma"):
        draws = r.posterior_.samples[site]
        rs, es, _ = _rhat_ess(draws[..., None])
        row[f"{site}_rhat"] = float(rs[0])
        row[f"{site}_bulk_ess"] = float(es[0])
        row[f"{site}_median"] = float(np.median(draws)) * (r._affine[1] if site == "sigma" else 1.0)
    row["tau_per_chain"] = json.dumps(
        np.round(np.median(r.posterior_.samples["tau"], axis=1), 3).tolist()
    )
    row["warnings"] = " | ".join(f"{w.category.__name__}: {w.message}"[:300] for w in caught)
    return row, pred


def _append(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def _summary(fits: list[dict], pairs: list[dict], header: str) -> str:
    cols = [
        ("seconds", "fit s", "{:.0f}"),
        ("regressor_seconds", "regressor s", "{:.0f}"),
        ("MAE", "MAE", "{:.3f}"),
        ("nonmetal_MAE", "non-metal MAE", "{:.3f}"),
        ("nonmetal_coverage95", "non-metal cover", "{:.3f}"),
        ("metal_coverage95", "metal cover", "{:.3f}"),
        ("pred_share_rhat_above_1_05", "pred R̂>1.05", "{:.1%}"),
        ("pred_max_rhat", "pred R̂ max", "{:.2f}"),
        ("pred_seconds_per_ess", "s / pred ESS", "{:.3g}"),
        ("tau_rhat", "τ R̂", "{:.2f}"),
        ("tau_bulk_ess", "τ ESS", "{:.0f}"),
        ("sigma_median", "σ", "{:.3f}"),
    ]
    lines = [header, "", "| sampler | seed | " + " | ".join(c[1] for c in cols) + " |"]
    lines.append("|---|---:|" + "---:|" * len(cols))
    for f in fits:
        cells = [c[2].format(float(f[c[0]])) for c in cols]
        lines.append(f"| {f['sampler']} | {f['seed']} | " + " | ".join(cells) + " |")
    if pairs:
        lines += ["", "| sampler | seeds | share moving > 0.1 eV | median move (eV) | max (eV) |"]
        lines.append("|---|---|---:|---:|---:|")
        for p in pairs:
            lines.append(
                f"| {p['sampler']} | {p['seeds']} | {p['share_moving_0_1']:.1%} | "
                f"{p['median_move']:.3f} | {p['max_move']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="folder with the Matbench band-gap files")
    ap.add_argument("--samplers", default="nuts,mclmc", help=f"of {sorted(SAMPLER_OPTIONS)}")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--source", default=None, help="a saved SourceModel to reuse")
    ap.add_argument("--out", default="benchmarks/results/sampler")
    args = ap.parse_args(argv)
    samplers = [s for s in args.samplers.split(",") if s]
    unknown = [s for s in samplers if s not in SAMPLER_OPTIONS]
    if unknown:
        ap.error(f"unknown sampler(s) {unknown}; choose from {sorted(SAMPLER_OPTIONS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]

    import jax

    from pcbtl.materials.bandgap import load_bandgap_tables
    from pcbtl.materials.features import CompositionFeaturizer
    from pcbtl.networks import SourceModel, train_source

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    expt, mp = load_bandgap_tables(args.data_dir)
    featurizer = CompositionFeaturizer()
    Xt, yt = featurizer.transform(expt.formulas), np.asarray(expt.y, np.float64)
    if args.source:
        source = SourceModel.load(args.source)
    else:
        Xs, ys = featurizer.transform(mp.formulas), np.asarray(mp.y, np.float64)
        source = train_source(
            Xs, ys, hidden=(128, 64), batch_size=256, seed=0, featurizer=featurizer.to_dict(),
            progress_bar=False,
        )  # fmt: skip
        source.save(out / "source_model.npz")
    tr, te = list(KFold(n_splits=5, shuffle=True, random_state=18012019).split(Xt))[args.fold]
    fits: list[dict] = []
    preds: dict[tuple[str, int], np.ndarray] = {}
    for path in (out / "fits.csv", out / "pairs.csv"):
        path.unlink(missing_ok=True)
    for sampler, seed in itertools.product(samplers, seeds):
        print(f"fitting {sampler} seed {seed} ...", file=sys.stderr, flush=True)
        row, pred = fit_one(source, Xt[tr], yt[tr], Xt[te], yt[te], sampler, seed)
        fits.append(row)
        preds[(sampler, seed)] = pred
        _append(out / "fits.csv", row)
        print(json.dumps({k: v for k, v in row.items() if k != "warnings"}), file=sys.stderr)
    pairs: list[dict] = []
    for sampler in samplers:
        for a, b in itertools.combinations(seeds, 2):
            move = np.abs(preds[(sampler, a)] - preds[(sampler, b)])
            pair = {
                "sampler": sampler,
                "seeds": f"{a},{b}",
                "share_moving_0_1": float(np.mean(move > 0.1)),
                "median_move": float(np.median(move)),
                "max_move": float(np.max(move)),
            }
            pairs.append(pair)
            _append(out / "pairs.csv", pair)
    np.savez(out / "predictions.npz", **{f"{s}_seed{k}": v for (s, k), v in preds.items()})
    header = (
        f"Sampler comparison, band-gap fold {args.fold}, hurdle + PC scale (last 2 layers of the "
        f"(128, 64) source). {date.today()}; jax {jax.__version__}; "
        f"{platform.machine()} CPU, {jax.device_count()} device(s)."
    )
    text = _summary(fits, pairs, header)
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
