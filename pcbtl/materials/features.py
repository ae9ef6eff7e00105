"""Composition and structure features for materials (Magpie-style descriptors).

Two featurizers turn materials into fixed-length float vectors:

* :class:`CompositionFeaturizer` maps a chemical formula (``"Fe2O3"``, ``"Ag(AuS)2"``,
  ``"Ag0.5Ge1Pb1.75S4"``) to

  1. the element fractions :math:`x_e = n_e / \\sum_{e'} n_{e'}` for the fixed element
     list H..Pu (Z = 1..94), and
  2. composition-weighted statistics of elemental properties :math:`p_e`, in the spirit of
     the Magpie descriptors (Ward et al. 2016):

     * ``mean``     :math:`\\bar p = \\sum_e x_e p_e`
     * ``avg_dev``  :math:`\\sum_e x_e |p_e - \\bar p|` (mean absolute deviation)
     * ``min`` / ``max`` over the elements present (:math:`x_e > 0`)
     * ``range``    ``max - min``
     * ``mode``     :math:`p_e` of the most abundant element; ties are broken by taking the
       smallest property value, so the result does not depend on the order in the formula.

* :class:`StructureFeaturizer` maps an :class:`ase.Atoms` crystal to a few geometric
  descriptors (volume per atom, density, packing fraction, nearest-neighbour distances and
  coordination numbers; definitions in its docstring) followed by the composition features
  of its atoms.

Element-property source
-----------------------
Atomic number, atomic mass and covalent radius come from :mod:`ase.data` (covalent radii
of Cordero et al. 2008). All other properties come from **mendeleev** (Mentel 2014,
MIT licence), read once through its public ``mendeleev.fetch.fetch_table`` API and cached
for the process. mendeleev was chosen over pymatgen and matminer's Magpie tables because it
is a small pure-Python package with a bundled SQLite database (pymatgen and matminer are
much heavier installs with compiled extensions; matminer pulls in pymatgen too), it is MIT
licensed, it is actively maintained, and it covers every element H..Pu for all the
properties used below except the gaps listed next. The properties (Magpie-like names) are:

=======================  ===========================================================
``Number``               atomic number Z (ase.data)
``MendeleevNumber``      Mendeleev (Pettifor-like) number (mendeleev)
``AtomicWeight``         standard atomic mass, u (ase.data)
``MeltingT``             melting point, K (mendeleev; the highest value over the
                         allotropes listed there)
``Column``               group 1..18 (mendeleev); lanthanides and actinides, which have
                         no group there, are assigned group 3 as in Magpie
``Row``                  period (mendeleev)
``CovalentRadius``       covalent radius, Angstrom (ase.data, Cordero et al. 2008)
``Electronegativity``    Pauling electronegativity (mendeleev)
``NsValence`` ...        number of s, p, d, f electrons outside the noble-gas core,
``NfValence``            parsed from mendeleev's ground-state electron configuration
``NValence``             their sum
``FirstIonization``      first ionisation energy, eV (mendeleev)
``ElectronAffinity``     electron affinity, eV (mendeleev)
``Polarizability``       static dipole polarisability, a.u. (mendeleev)
``Density``              density of the element, g/cm^3 (mendeleev)
=======================  ===========================================================

Missing values: mendeleev has no Pauling electronegativity for He, Ne, Ar, Kr, Pm, Eu,
Tb, Yb, Rn, no electron affinity for 18 of the 94 elements, and a few melting points are
missing. Each missing entry is **imputed with the mean of that property over the elements
(H..Pu) that have a value**; the imputed table is what the featurizer stores, so every
output is finite. The stored table travels with :meth:`CompositionFeaturizer.to_dict`,
so a featurizer reloaded with :meth:`CompositionFeaturizer.from_dict` reproduces the
training-time features exactly, even under another mendeleev version.

Formula parsing
---------------
Formulas are parsed with :class:`ase.formula.Formula` (which supports nested
parentheses). ``Formula`` rejects fractional amounts (about 450 of the 4,604 Matbench
experimental formulas have them), so when it fails a small tokenizer in this module is used
that accepts decimal amounts and nested parentheses. Element symbols are checked against
the fixed list H..Pu.

References
----------
Cordero B. et al. (2008) Covalent radii revisited. Dalton Trans. 2832-2838.
Mentel L. (2014) mendeleev - a Python resource for properties of chemical elements,
ions and isotopes. https://github.com/lmmentel/mendeleev
Ward L., Agrawal A., Choudhary A., Wolverton C. (2016) A general-purpose machine learning
framework for predicting properties of inorganic materials. npj Comput. Mater. 2, 16028.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from ase import Atoms
from ase.data import atomic_masses, chemical_symbols, covalent_radii
from ase.formula import Formula
from ase.neighborlist import neighbor_list
from sklearn.base import BaseEstimator, TransformerMixin

__all__ = [
    "ELEMENTS",
    "PROPERTY_NAMES",
    "STAT_NAMES",
    "CompositionFeaturizer",
    "FeaturizeResult",
    "SkippedRow",
    "StructureFeaturizer",
    "element_property_table",
    "featurize_compositions",
    "featurize_structures",
    "parse_formula",
]

#: Element symbols covered by the features: H..Pu (Z = 1..94).
ELEMENTS: tuple[str, ...] = tuple(chemical_symbols[1:95])
_ELEMENT_INDEX: dict[str, int] = {s: i for i, s in enumerate(ELEMENTS)}
_ALL_SYMBOLS = frozenset(chemical_symbols[1:])

#: Elemental properties used for the weighted statistics (see module docstring).
PROPERTY_NAMES: tuple[str, ...] = (
    "Number",
    "MendeleevNumber",
    "AtomicWeight",
    "MeltingT",
    "Column",
    "Row",
    "CovalentRadius",
    "Electronegativity",
    "NsValence",
    "NpValence",
    "NdValence",
    "NfValence",
    "NValence",
    "FirstIonization",
    "ElectronAffinity",
    "Polarizability",
    "Density",
)

#: Composition-weighted statistics computed for every property.
STAT_NAMES: tuple[str, ...] = ("mean", "avg_dev", "min", "max", "range", "mode")

_FEATURIZER_FORMAT_VERSION = 1


class SkippedRow(NamedTuple):
    """A row left out by ``skip_invalid=True``: its index, the entry and why."""

    index: int
    entry: str
    reason: str


class FeaturizeResult(NamedTuple):
    """Features of the valid rows.

    ``X[k]`` are the features of input row ``kept[k]``; ``skipped`` lists the rows left out
    (always empty unless ``skip_invalid=True``).
    """

    X: np.ndarray
    feature_names: list[str]
    kept: np.ndarray
    skipped: list[SkippedRow]


# --------------------------------------------------------------------------------------
# Element-property table
# --------------------------------------------------------------------------------------

_CONFIG_TOKEN = re.compile(r"(\d+)([spdf])(\d*)")


def _valence_counts(config: str) -> tuple[int, int, int, int]:
    """Numbers of s, p, d, f electrons outside the noble-gas core of a configuration.

    ``"[Xe] 4f14 5d10 6s2 6p2"`` -> (2, 2, 10, 14); a subshell written without a count
    (``"5d"``) holds one electron, as in mendeleev's notation.
    """
    counts = {"s": 0, "p": 0, "d": 0, "f": 0}
    body = re.sub(r"\[[A-Za-z]+\]", " ", config)
    for _, kind, n in _CONFIG_TOKEN.findall(body):
        counts[kind] += int(n) if n else 1
    return counts["s"], counts["p"], counts["d"], counts["f"]


@functools.lru_cache(maxsize=1)
def _raw_property_table() -> np.ndarray:
    """Raw (un-imputed) property table, shape (94, len(PROPERTY_NAMES)), NaN = missing."""
    from mendeleev.fetch import fetch_table

    el = fetch_table("elements").set_index("atomic_number")
    z = np.arange(1, 95)
    el = el.reindex(z)

    def col(name: str) -> np.ndarray:
        return el[name].to_numpy(dtype=float) if name in el.columns else np.full(94, np.nan)

    # Melting point: the elements table of older mendeleev versions, else the
    # phase-transition table (highest value over the listed allotropes).
    if "melting_point" in el.columns:
        melting = col("melting_point")
    else:
        pt = fetch_table("phasetransitions")
        melting = pt.groupby("atomic_number")["melting_point"].max().reindex(z)
        melting = melting.to_numpy(dtype=float)

    # First ionisation energy: neutral species (ion_charge 0) in mendeleev >= 1.0,
    # degree 1 in older versions.
    ie = fetch_table("ionizationenergies")
    if "ion_charge" in ie.columns:
        ie1 = ie[ie["ion_charge"] == 0].set_index("atomic_number")["ionization_energy"]
    else:
        ie1 = ie[ie["degree"] == 1].set_index("atomic_number")["energy"]
    ie1 = ie1.groupby(level=0).first().reindex(z).to_numpy(dtype=float)

    group = col("group_id")
    block = el["block"].astype(str).to_numpy()
    group = np.where(np.isnan(group) & (block == "f"), 3.0, group)

    valence = np.array(
        [_valence_counts(str(c)) for c in el["electronic_configuration"]], dtype=float
    )

    columns = {
        "Number": z.astype(float),
        "MendeleevNumber": col("mendeleev_number"),
        "AtomicWeight": np.asarray(atomic_masses[1:95], dtype=float),
        "MeltingT": melting,
        "Column": group,
        "Row": col("period"),
        "CovalentRadius": np.asarray(covalent_radii[1:95], dtype=float),
        "Electronegativity": col("en_pauling"),
        "NsValence": valence[:, 0],
        "NpValence": valence[:, 1],
        "NdValence": valence[:, 2],
        "NfValence": valence[:, 3],
        "NValence": valence.sum(axis=1),
        "FirstIonization": ie1,
        "ElectronAffinity": col("electron_affinity"),
        "Polarizability": col("dipole_polarizability"),
        "Density": col("density"),
    }
    table = np.column_stack([columns[name] for name in PROPERTY_NAMES])
    table.setflags(write=False)
    return table


def element_property_table(*, impute: bool = True) -> tuple[np.ndarray, list[str]]:
    """Elemental property table (rows H..Pu, columns :data:`PROPERTY_NAMES`).

    With ``impute=True`` (default) each missing value is replaced by the mean of its
    column over the elements that have a value; with ``impute=False`` missing entries are
    NaN. Returns ``(table, property_names)``; the table is a fresh copy.
    """
    raw = np.array(_raw_property_table(), dtype=float)
    if impute:
        col_mean = np.nanmean(raw, axis=0)
        raw = np.where(np.isnan(raw), col_mean[None, :], raw)
    return raw, list(PROPERTY_NAMES)


# --------------------------------------------------------------------------------------
# Formula parsing
# --------------------------------------------------------------------------------------

_TOKEN = re.compile(r"([A-Z][a-z]*)|(\d+(?:\.\d*)?|\.\d+)|(\()|(\))|(\s+)|(.)")


def _parse_fractional(formula: str) -> dict[str, float]:
    """Tokenizer for formulas with decimal amounts and nested parentheses."""
    stack: list[dict[str, float]] = [{}]
    last: dict[str, float] | None = None  # group the next number multiplies
    last_symbol: str | None = None
    for m in _TOKEN.finditer(formula):
        sym, num, lpar, rpar, space, other = m.groups()
        if space:
            continue
        if other is not None:
            raise ValueError(f"unexpected character {other!r}")
        if sym is not None:
            stack[-1][sym] = stack[-1].get(sym, 0.0) + 1.0
            last, last_symbol = None, sym
        elif num is not None:
            amount = float(num)
            if last_symbol is not None:
                stack[-1][last_symbol] += amount - 1.0
            elif last is not None:
                for k, v in last.items():
                    stack[-1][k] = stack[-1].get(k, 0.0) + v * (amount - 1.0)
            else:
                raise ValueError("a number must follow an element or ')'")
            last, last_symbol = None, None
        elif lpar is not None:
            stack.append({})
            last, last_symbol = None, None
        else:  # ')'
            if len(stack) == 1:
                raise ValueError("unbalanced ')'")
            group = stack.pop()
            for k, v in group.items():
                stack[-1][k] = stack[-1].get(k, 0.0) + v
            last, last_symbol = group, None
    if len(stack) != 1:
        raise ValueError("unbalanced '('")
    return stack[0]


def parse_formula(formula: str) -> dict[str, float]:
    """Parse a chemical formula into ``{element: amount}`` (amounts as floats).

    Uses :class:`ase.formula.Formula` first and falls back on a tokenizer that accepts
    decimal amounts (``"Al0.01Ga0.99P1"``) and nested parentheses. Raises ``ValueError``
    for an empty or unparsable formula, an unknown element symbol, or amounts that are
    not positive.
    """
    if not isinstance(formula, str):
        raise ValueError(f"formula must be a string, got {type(formula).__name__}")
    text = formula.strip()
    if not text:
        raise ValueError("empty formula")
    try:
        counts: dict[str, float] = {k: float(v) for k, v in Formula(text).count().items()}
    except Exception:  # ase rejects decimals; fall back on our tokenizer
        try:
            counts = _parse_fractional(text)
        except ValueError as exc:
            raise ValueError(f"cannot parse formula {formula!r}: {exc}") from None
    if not counts:
        raise ValueError(f"no elements in formula {formula!r}")
    for sym, amount in counts.items():
        if sym not in _ALL_SYMBOLS:
            raise ValueError(f"unknown element {sym!r} in formula {formula!r}")
        if not (amount > 0 and math.isfinite(amount)):
            raise ValueError(f"non-positive amount of {sym} in formula {formula!r}")
    return counts


# --------------------------------------------------------------------------------------
# Composition featurizer
# --------------------------------------------------------------------------------------


def _entries(X: Any) -> Any:
    """The rows of a transformer input: a sequence as it is; a one-column DataFrame or 2-D
    array (what ``ColumnTransformer`` passes) as its single column."""
    if getattr(X, "ndim", 1) == 2:
        if X.shape[1] != 1:
            raise ValueError(f"expected one column of entries, got shape {X.shape}")
        return X.iloc[:, 0] if hasattr(X, "iloc") else np.asarray(X)[:, 0]
    return X


class _StatelessTransformer(TransformerMixin, BaseEstimator):
    """A scikit-learn transformer that learns nothing: ``fit`` checks the parameters and
    returns ``self``, ``transform`` works with or without it, and ``get_feature_names_out``
    (hence ``set_output(transform="pandas")``) names the columns."""

    feature_names: list[str]

    def _check_params(self) -> None:
        raise NotImplementedError  # pragma: no cover - abstract

    def fit(self, X: Any = None, y: Any = None) -> _StatelessTransformer:
        """Check the parameters; nothing is learned from ``X`` (any ``y`` is ignored)."""
        self._check_params()
        return self

    def __sklearn_is_fitted__(self) -> bool:
        return True

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = False
        tags.input_tags.two_d_array = False
        tags.input_tags.one_d_array = True
        return tags

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Names of the output columns (the input has none to pass on)."""
        return np.asarray(self.feature_names, dtype=object)


class CompositionFeaturizer(_StatelessTransformer):
    """Element fractions plus Magpie-style weighted property statistics of a formula.

    A scikit-learn transformer: ``Pipeline([("features", CompositionFeaturizer()),
    ("model", PCTransferRegressor(source))]).fit(formulas, y)`` works on a list (or Series, or
    one-column DataFrame) of formulas; ``fit`` learns nothing, and :meth:`transform` works
    without it. The parameters are stored as given and checked in ``fit`` and ``transform``.

    Parameters
    ----------
    include_fractions
        Include the 94 element-fraction columns ``frac_H`` .. ``frac_Pu``.
    stats
        Which of :data:`STAT_NAMES` to compute for every property.
    property_table, property_names
        Use a given (94, P) property table instead of the mendeleev/ase one (mainly for
        :meth:`from_dict`). Must be finite.

    The feature order is: element fractions, then for every property the statistics in
    the order of ``stats``, named ``"<stat>_<property>"`` (e.g. ``"mean_Electronegativity"``).
    Definitions are in the module docstring.
    """

    def __init__(
        self,
        *,
        include_fractions: bool = True,
        stats: Sequence[str] = STAT_NAMES,
        property_table: np.ndarray | None = None,
        property_names: Sequence[str] | None = None,
    ) -> None:
        self.include_fractions = include_fractions
        self.stats = stats
        self.property_table = property_table
        self.property_names = property_names

    def _check_params(self) -> None:
        unknown = [s for s in self.stats if s not in STAT_NAMES]
        if unknown:
            raise ValueError(f"unknown statistics {unknown}; choose from {STAT_NAMES}")
        self._table()

    def _table(self) -> tuple[np.ndarray, list[str]]:
        """The (94, P) property table in use and its column names (checked)."""
        if self.property_table is None:
            return element_property_table(impute=True)
        table = np.array(self.property_table, dtype=float)
        names = list(self.property_names) if self.property_names is not None else []
        if table.ndim != 2 or table.shape[0] != len(ELEMENTS):
            raise ValueError(f"property_table must have shape ({len(ELEMENTS)}, P)")
        if len(names) != table.shape[1]:
            raise ValueError("property_names must name every column of property_table")
        if not np.all(np.isfinite(table)):
            raise ValueError("property_table must be finite (impute missing values)")
        return table, names

    # -- names -------------------------------------------------------------------------
    @property
    def feature_names(self) -> list[str]:
        """Names of the output columns, in order."""
        names = [f"frac_{e}" for e in ELEMENTS] if self.include_fractions else []
        for p in self._table()[1]:
            names.extend(f"{s}_{p}" for s in self.stats)
        return names

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    # -- featurization -----------------------------------------------------------------
    def transform(self, formulas: Iterable[str]) -> np.ndarray:
        """Features of every formula, shape (n, n_features); ``ValueError`` on a bad row."""
        return self.featurize(_entries(formulas)).X

    def featurize(self, formulas: Iterable[str], *, skip_invalid: bool = False) -> FeaturizeResult:
        """Featurize formulas; with ``skip_invalid`` bad rows are reported, not raised."""
        if isinstance(formulas, str):
            raise TypeError("formulas must be a sequence of strings, not a single string")
        self._check_params()
        comps: list[dict[str, float]] = []
        kept: list[int] = []
        skipped: list[SkippedRow] = []
        cache: dict[str, dict[str, float] | str] = {}
        for i, f in enumerate(formulas):
            key = f if isinstance(f, str) else repr(f)
            parsed = cache.get(key) if isinstance(f, str) else None
            if parsed is None:
                try:
                    parsed = self._check_supported(parse_formula(f))
                except ValueError as exc:
                    parsed = str(exc)
                if isinstance(f, str):
                    cache[key] = parsed
            if isinstance(parsed, str):
                if not skip_invalid:
                    raise ValueError(f"row {i}: invalid formula {f!r}: {parsed}")
                skipped.append(SkippedRow(i, str(f), parsed))
                continue
            comps.append(parsed)
            kept.append(i)
        X = self._from_compositions(comps)
        return FeaturizeResult(X, self.feature_names, np.asarray(kept, dtype=int), skipped)

    @staticmethod
    def _check_supported(comp: dict[str, float]) -> dict[str, float]:
        bad = [s for s in comp if s not in _ELEMENT_INDEX]
        if bad:
            raise ValueError(
                f"element(s) {', '.join(bad)} outside the supported range H..Pu (Z <= 94)"
            )
        return comp

    def _from_compositions(self, comps: Sequence[Mapping[str, float]]) -> np.ndarray:
        """Vectorised features of already validated compositions."""
        property_table, _ = self._table()
        stats = tuple(self.stats)
        n = len(comps)
        n_el = len(ELEMENTS)
        if n == 0:
            return np.zeros((0, self.n_features))
        width = max(len(c) for c in comps)
        idx = np.full((n, width), n_el, dtype=np.int64)  # pad -> dummy row n_el
        amt = np.zeros((n, width))
        for r, comp in enumerate(comps):
            for k, (sym, a) in enumerate(comp.items()):
                idx[r, k] = _ELEMENT_INDEX[sym]
                amt[r, k] = a
        frac = amt / amt.sum(axis=1, keepdims=True)
        present = frac > 0

        blocks = []
        if self.include_fractions:
            fr = np.zeros((n, n_el + 1))
            np.add.at(fr, (np.repeat(np.arange(n), width), idx.ravel()), frac.ravel())
            blocks.append(fr[:, :n_el])

        table = np.vstack([property_table, np.zeros((1, property_table.shape[1]))])
        P = table[idx]  # (n, width, n_prop)
        w = frac[:, :, None]
        mask = present[:, :, None]
        mean = (w * P).sum(axis=1)
        stat_values: dict[str, np.ndarray] = {"mean": mean}
        if "avg_dev" in stats:
            stat_values["avg_dev"] = (w * np.abs(P - mean[:, None, :])).sum(axis=1)
        pmin = np.where(mask, P, np.inf).min(axis=1)
        pmax = np.where(mask, P, -np.inf).max(axis=1)
        stat_values["min"], stat_values["max"], stat_values["range"] = pmin, pmax, pmax - pmin
        if "mode" in stats:
            top = frac.max(axis=1, keepdims=True)
            is_top = present & (frac >= top * (1.0 - 1e-9))
            stat_values["mode"] = np.where(is_top[:, :, None], P, np.inf).min(axis=1)
        stacked = np.stack([stat_values[s] for s in stats], axis=2)  # (n, n_prop, n_stat)
        blocks.append(stacked.reshape(n, -1))
        return np.ascontiguousarray(np.hstack(blocks), dtype=float)

    # -- serialisation -----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, including the property table itself."""
        self._check_params()
        table, names = self._table()
        return {
            "type": "CompositionFeaturizer",
            "format_version": _FEATURIZER_FORMAT_VERSION,
            "elements": list(ELEMENTS),
            "include_fractions": bool(self.include_fractions),
            "stats": list(self.stats),
            "property_names": list(names),
            "property_table": table.tolist(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CompositionFeaturizer:
        """Rebuild a featurizer saved with :meth:`to_dict` (uses the stored table)."""
        if d.get("type") != "CompositionFeaturizer":
            raise ValueError(f"not a CompositionFeaturizer description: type={d.get('type')!r}")
        if d.get("format_version") != _FEATURIZER_FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {d.get('format_version')!r}")
        if list(d["elements"]) != list(ELEMENTS):
            raise ValueError("stored element list differs from this version's H..Pu list")
        out = cls(
            include_fractions=bool(d["include_fractions"]),
            stats=tuple(d["stats"]),
            property_table=np.asarray(d["property_table"], dtype=float),
            property_names=list(d["property_names"]),
        )
        out._check_params()
        return out


# --------------------------------------------------------------------------------------
# Structure featurizer
# --------------------------------------------------------------------------------------

_AMU_PER_A3_TO_G_PER_CM3 = 1.66053906660  # 1 u / 1 Angstrom^3 in g/cm^3


class StructureFeaturizer(_StatelessTransformer):
    """Geometric descriptors of a periodic crystal plus its composition features.

    A scikit-learn transformer of a list of :class:`ase.Atoms` (as
    :class:`CompositionFeaturizer`: ``fit`` learns nothing; parameters are checked in ``fit``
    and ``transform``). ``composition=None`` uses a default :class:`CompositionFeaturizer`.

    For an :class:`ase.Atoms` with N atoms, masses :math:`m_i` (u), covalent radii
    :math:`r_i` (Cordero et al. 2008, from :data:`ase.data.covalent_radii`) and cell
    volume V (Angstrom^3, must be > 0):

    * ``volume_per_atom``  :math:`V/N` (Angstrom^3)
    * ``density``          :math:`\\sum_i m_i / V` in g/cm^3 (1 u/Angstrom^3 =
      1.66053906660 g/cm^3)
    * ``packing_fraction`` :math:`\\sum_i \\tfrac43 \\pi r_i^3 / V` (covalent radii)
    * nearest-neighbour distance :math:`d_i` of every atom (the shortest distance to
      another atom or periodic image): ``nn_dist_mean``, ``_std``, ``_min``, ``_max``
    * coordination number :math:`c_i` = number of neighbours j (periodic images
      included) with :math:`d_{ij} \\le (1 + \\text{tol})\\, d_i` — a relative-distance
      cutoff rule with ``nn_tolerance`` tol = 0.1 by default, independent of tabulated
      radii; ``coord_mean``, ``_std``, ``_min``, ``_max``

    Neighbours are found with :func:`ase.neighborlist.neighbor_list`, with a search
    radius grown until every atom has a neighbour and the radius exceeds
    :math:`(1 + \\text{tol}) \\max_i d_i`. Standard deviations are population ones (ddof=0).
    The composition features (:class:`CompositionFeaturizer`) of the atoms follow.
    """

    GEOMETRY_NAMES: tuple[str, ...] = (
        "volume_per_atom",
        "density",
        "packing_fraction",
        "nn_dist_mean",
        "nn_dist_std",
        "nn_dist_min",
        "nn_dist_max",
        "coord_mean",
        "coord_std",
        "coord_min",
        "coord_max",
    )

    def __init__(
        self,
        *,
        nn_tolerance: float = 0.1,
        composition: CompositionFeaturizer | None = None,
        max_cutoff: float = 20.0,
    ) -> None:
        self.nn_tolerance = nn_tolerance
        self.composition = composition
        self.max_cutoff = max_cutoff

    def _check_params(self) -> None:
        if not self.nn_tolerance >= 0:
            raise ValueError("nn_tolerance must be >= 0")
        self._composition()._check_params()

    def _composition(self) -> CompositionFeaturizer:
        if self.composition is None:
            return _default_composition_featurizer()
        return self.composition

    @property
    def feature_names(self) -> list[str]:
        return list(self.GEOMETRY_NAMES) + self._composition().feature_names

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def transform(self, atoms_list: Iterable[Atoms]) -> np.ndarray:
        """Features of every structure, shape (n, n_features); ``ValueError`` on a bad row."""
        return self.featurize(_entries(atoms_list)).X

    def featurize(
        self, atoms_list: Iterable[Atoms], *, skip_invalid: bool = False
    ) -> FeaturizeResult:
        """Featurize structures; with ``skip_invalid`` bad rows are reported, not raised."""
        if isinstance(atoms_list, Atoms):
            raise TypeError("atoms_list must be a sequence of Atoms, not a single Atoms")
        self._check_params()
        geo: list[np.ndarray] = []
        comps: list[dict[str, float]] = []
        kept: list[int] = []
        skipped: list[SkippedRow] = []
        for i, atoms in enumerate(atoms_list):
            label = _describe_atoms(atoms)
            try:
                g, comp = self._one(atoms)
            except ValueError as exc:
                if not skip_invalid:
                    raise ValueError(f"row {i}: invalid structure {label}: {exc}") from None
                skipped.append(SkippedRow(i, label, str(exc)))
                continue
            geo.append(g)
            comps.append(comp)
            kept.append(i)
        G = np.array(geo, dtype=float).reshape(len(geo), len(self.GEOMETRY_NAMES))
        C = self._composition()._from_compositions(comps)
        X = np.hstack([G, C]) if len(kept) else np.zeros((0, self.n_features))
        return FeaturizeResult(X, self.feature_names, np.asarray(kept, dtype=int), skipped)

    def _one(self, atoms: Atoms) -> tuple[np.ndarray, dict[str, float]]:
        if not isinstance(atoms, Atoms):
            raise ValueError(f"expected ase.Atoms, got {type(atoms).__name__}")
        n = len(atoms)
        if n == 0:
            raise ValueError("structure has no atoms")
        numbers = atoms.get_atomic_numbers()
        bad = sorted({chemical_symbols[z] for z in numbers if not 1 <= z <= len(ELEMENTS)})
        if bad:
            raise ValueError(f"element(s) {', '.join(bad)} outside the supported range H..Pu")
        if not atoms.pbc.all():
            raise ValueError("structure must be periodic in all three directions")
        volume = abs(float(np.linalg.det(atoms.cell.array)))
        if not volume > 1e-8:
            raise ValueError("structure has a zero-volume cell")

        vpa = volume / n
        density = atomic_masses[numbers].sum() / volume * _AMU_PER_A3_TO_G_PER_CM3
        packing = (4.0 / 3.0 * np.pi * covalent_radii[numbers] ** 3).sum() / volume
        d_nn, coord = self._neighbours(atoms)
        g = np.array(
            [
                vpa,
                density,
                packing,
                d_nn.mean(),
                d_nn.std(),
                d_nn.min(),
                d_nn.max(),
                coord.mean(),
                coord.std(),
                coord.min(),
                coord.max(),
            ]
        )
        comp: dict[str, float] = {}
        for z in numbers:
            s = chemical_symbols[z]
            comp[s] = comp.get(s, 0.0) + 1.0
        return g, comp

    def _neighbours(self, atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
        n = len(atoms)
        cutoff = max(3.0, 1.5 * (atoms.get_volume() / n) ** (1.0 / 3.0))
        while True:
            i, d = neighbor_list("id", atoms, cutoff)
            d_nn = np.full(n, np.inf)
            np.minimum.at(d_nn, i, d)
            if np.all(np.isfinite(d_nn)) and cutoff >= (1 + self.nn_tolerance) * d_nn.max():
                break
            if cutoff >= self.max_cutoff:
                raise ValueError(f"no neighbours found within {self.max_cutoff} Angstrom")
            if np.all(np.isfinite(d_nn)):
                cutoff = min(self.max_cutoff, (1 + self.nn_tolerance) * d_nn.max() * 1.01)
            else:
                cutoff = min(self.max_cutoff, 2 * cutoff)
        within = d <= (1 + self.nn_tolerance) * d_nn[i] * (1 + 1e-12)
        coord = np.bincount(i[within], minlength=n).astype(float)
        return d_nn, coord

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description (includes the composition featurizer and its table)."""
        self._check_params()
        return {
            "type": "StructureFeaturizer",
            "format_version": _FEATURIZER_FORMAT_VERSION,
            "nn_tolerance": float(self.nn_tolerance),
            "max_cutoff": float(self.max_cutoff),
            "composition": self._composition().to_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StructureFeaturizer:
        """Rebuild a featurizer saved with :meth:`to_dict`."""
        if d.get("type") != "StructureFeaturizer":
            raise ValueError(f"not a StructureFeaturizer description: type={d.get('type')!r}")
        if d.get("format_version") != _FEATURIZER_FORMAT_VERSION:
            raise ValueError(f"unsupported format_version {d.get('format_version')!r}")
        out = cls(
            nn_tolerance=float(d["nn_tolerance"]),
            max_cutoff=float(d["max_cutoff"]),
            composition=CompositionFeaturizer.from_dict(d["composition"]),
        )
        out._check_params()
        return out


def _describe_atoms(atoms: object) -> str:
    if isinstance(atoms, Atoms):
        return f"Atoms({atoms.get_chemical_formula() or 'empty'}, {len(atoms)} atoms)"
    return repr(atoms)[:80]


# --------------------------------------------------------------------------------------
# Convenience functions
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _default_composition_featurizer() -> CompositionFeaturizer:
    return CompositionFeaturizer()


def featurize_compositions(
    formulas: Iterable[str], *, skip_invalid: bool = False
) -> FeaturizeResult:
    """Composition features of formulas with the default :class:`CompositionFeaturizer`.

    Returns a :class:`FeaturizeResult` ``(X, feature_names, kept, skipped)``. Raises
    ``ValueError`` naming the row index and entry of the first invalid formula (unknown
    element, empty, unparsable) unless ``skip_invalid=True``.
    """
    return _default_composition_featurizer().featurize(formulas, skip_invalid=skip_invalid)


def featurize_structures(
    atoms_list: Iterable[Atoms], *, skip_invalid: bool = False
) -> FeaturizeResult:
    """Structure features with the default :class:`StructureFeaturizer`.

    Returns a :class:`FeaturizeResult`; raises ``ValueError`` naming the row of the first
    invalid structure (no atoms, non-periodic or zero-volume cell, unsupported element)
    unless ``skip_invalid=True``.
    """
    return StructureFeaturizer(composition=_default_composition_featurizer()).featurize(
        atoms_list, skip_invalid=skip_invalid
    )
