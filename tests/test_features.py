"""Tests for pcbtl.materials.features (composition and structure featurizers)."""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from ase.data import atomic_masses, atomic_numbers, covalent_radii
from ase.io import read, write
from shared_data import SHARED_DATA

from pcbtl.materials.features import (
    ELEMENTS,
    PROPERTY_NAMES,
    STAT_NAMES,
    CompositionFeaturizer,
    StructureFeaturizer,
    element_property_table,
    featurize_compositions,
    featurize_structures,
    parse_formula,
)

SHARED = SHARED_DATA
EXPT_CSV = SHARED / "bandgap" / "matbench_expt_gap.csv"
MP_CSV = SHARED / "bandgap" / "matbench_mp_gap.csv"


def _read_formulas(path: Path) -> list[str]:
    if not path.is_file():
        pytest.skip(f"shared data file {path} not present (set PCBTL_SHARED_DATA to its folder)")
    with open(path, newline="") as fh:
        return [row["formula"] for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def featurizer() -> CompositionFeaturizer:
    return CompositionFeaturizer()


def _col(f: CompositionFeaturizer, name: str) -> int:
    return f.feature_names.index(name)


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("formula", "expected"),
    [
        ("H2O", {"H": 2, "O": 1}),
        ("Ag(AuS)2", {"Ag": 1, "Au": 2, "S": 2}),
        ("Ag(W3Br7)2", {"Ag": 1, "W": 6, "Br": 14}),
        ("Ag0.5Ge1Pb1.75S4", {"Ag": 0.5, "Ge": 1, "Pb": 1.75, "S": 4}),
        ("Al0.01Ga0.99P1", {"Al": 0.01, "Ga": 0.99, "P": 1}),
        ("(Al0.5(Ga2)0.5)2O3", {"Al": 1.0, "Ga": 2.0, "O": 3.0}),
        ("((CH3)2)3", {"C": 6, "H": 18}),
        ("Ca(NO3)0.5Cl1.5", {"Ca": 1, "N": 0.5, "O": 1.5, "Cl": 1.5}),
    ],
)
def test_parse_formula(formula: str, expected: dict[str, float]) -> None:
    got = parse_formula(formula)
    assert set(got) == set(expected)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v)


@pytest.mark.parametrize("bad", ["Xx2O", "", "   ", "Fe2(O", "Fe2)O", "Fe-2O", "Fe0O"])
def test_parse_formula_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_formula(bad)


def test_parse_real_expt_formulas_with_fractions() -> None:
    formulas = _read_formulas(EXPT_CSV)
    fractional = [f for f in formulas if "." in f]
    assert len(fractional) > 400  # the ~450 formulas ase.formula.Formula rejects
    for f in fractional[:200]:
        comp = parse_formula(f)
        # independent check: the numbers in the string (no parentheses in these) sum up
        if "(" not in f:
            import re

            total = sum(float(x) for x in re.findall(r"\d+(?:\.\d+)?", f))
            n_plain = sum(1 for m in re.finditer(r"[A-Z][a-z]?(?![a-z0-9.])", f))
            assert sum(comp.values()) == pytest.approx(total + n_plain)


# ------------------------------------------------------------------ composition features


def test_property_table_shape_and_imputation() -> None:
    raw, names = element_property_table(impute=False)
    imp, _ = element_property_table(impute=True)
    assert raw.shape == (94, len(PROPERTY_NAMES)) and names == list(PROPERTY_NAMES)
    assert np.isfinite(imp).all()
    # He has no Pauling electronegativity: imputed with the column mean over elements
    j = names.index("Electronegativity")
    he = ELEMENTS.index("He")
    assert math.isnan(raw[he, j])
    assert imp[he, j] == pytest.approx(np.nanmean(raw[:, j]))
    # values that must agree with ase.data and textbook facts
    assert np.allclose(imp[:, names.index("Number")], np.arange(1, 95))
    assert np.allclose(imp[:, names.index("AtomicWeight")], atomic_masses[1:95])
    assert np.allclose(imp[:, names.index("CovalentRadius")], covalent_radii[1:95])
    fe = ELEMENTS.index("Fe")
    assert imp[fe, names.index("Row")] == 4 and imp[fe, names.index("Column")] == 8
    assert imp[fe, names.index("NdValence")] == 6 and imp[fe, names.index("NsValence")] == 2
    o = ELEMENTS.index("O")
    assert imp[o, names.index("Electronegativity")] == pytest.approx(3.44, abs=0.01)
    assert imp[o, names.index("NValence")] == 6
    ce = ELEMENTS.index("Ce")  # f-block without a group in mendeleev -> group 3 like Magpie
    assert imp[ce, names.index("Column")] == 3


def test_composition_features_by_hand(featurizer: CompositionFeaturizer) -> None:
    table, names = element_property_table()
    X = featurizer.transform(["Fe2O3", "NaCl", "Si"])
    assert X.shape == (3, len(featurizer.feature_names))
    # fractions
    assert X[0, _col(featurizer, "frac_Fe")] == pytest.approx(0.4)
    assert X[0, _col(featurizer, "frac_O")] == pytest.approx(0.6)
    assert X[0, : len(ELEMENTS)].sum() == pytest.approx(1.0)
    assert X[2, _col(featurizer, "frac_Si")] == 1.0
    # statistics of Fe2O3 computed independently
    for p in ("Electronegativity", "AtomicWeight", "MeltingT"):
        pfe = table[ELEMENTS.index("Fe"), names.index(p)]
        po = table[ELEMENTS.index("O"), names.index(p)]
        mean = 0.4 * pfe + 0.6 * po
        assert X[0, _col(featurizer, f"mean_{p}")] == pytest.approx(mean)
        dev = 0.4 * abs(pfe - mean) + 0.6 * abs(po - mean)
        assert X[0, _col(featurizer, f"avg_dev_{p}")] == pytest.approx(dev)
        assert X[0, _col(featurizer, f"min_{p}")] == pytest.approx(min(pfe, po))
        assert X[0, _col(featurizer, f"max_{p}")] == pytest.approx(max(pfe, po))
        assert X[0, _col(featurizer, f"range_{p}")] == pytest.approx(abs(pfe - po))
        assert X[0, _col(featurizer, f"mode_{p}")] == pytest.approx(po)  # O most abundant
    # NaCl: tie in fractions -> mode is the smaller value; single element -> no spread
    zna, zcl = atomic_numbers["Na"], atomic_numbers["Cl"]
    assert X[1, _col(featurizer, "mode_Number")] == min(zna, zcl)
    assert X[2, _col(featurizer, "avg_dev_Number")] == 0.0
    assert X[2, _col(featurizer, "range_Number")] == 0.0


def test_features_invariant_to_scaling_and_order(featurizer: CompositionFeaturizer) -> None:
    X = featurizer.transform(["Fe2O3", "O6Fe4", "Fe0.4O0.6", "(FeO1.5)2"])
    for k in range(1, 4):
        np.testing.assert_allclose(X[k], X[0], rtol=1e-12, atol=1e-12)


def test_feature_names_layout(featurizer: CompositionFeaturizer) -> None:
    names = featurizer.feature_names
    assert len(names) == len(set(names)) == 94 + len(PROPERTY_NAMES) * len(STAT_NAMES)
    assert names[0] == "frac_H" and names[93] == "frac_Pu"
    small = CompositionFeaturizer(include_fractions=False, stats=("mean", "max"))
    assert small.feature_names[:2] == ["mean_Number", "max_Number"]
    Xs = small.transform(["Fe2O3"])
    Xf = featurizer.transform(["Fe2O3"])
    assert Xs[0, 0] == Xf[0, _col(featurizer, "mean_Number")]


def test_invalid_rows_raise_with_index(featurizer: CompositionFeaturizer) -> None:
    for bad in ("Xx2O", "", "Fe2(O", "Am2O3"):
        with pytest.raises(ValueError, match=r"^row 1: ") as info:
            featurizer.transform(["NaCl", bad, "Si"])
        assert repr(bad) in str(info.value)


def test_skip_invalid_reports_rows(featurizer: CompositionFeaturizer) -> None:
    res = featurize_compositions(["NaCl", "Xx2O", "", "Si", "Fe2(O"], skip_invalid=True)
    assert res.kept.tolist() == [0, 3]
    assert [(s.index, s.entry) for s in res.skipped] == [(1, "Xx2O"), (2, ""), (4, "Fe2(O")]
    assert "Xx" in res.skipped[0].reason and "empty" in res.skipped[1].reason
    np.testing.assert_array_equal(res.X, featurizer.transform(["NaCl", "Si"]))
    assert res.feature_names == featurizer.feature_names


def test_to_dict_round_trip_is_exact(featurizer: CompositionFeaturizer) -> None:
    d = json.loads(json.dumps(featurizer.to_dict()))
    again = CompositionFeaturizer.from_dict(d)
    formulas = ["Fe2O3", "Ag0.5Ge1Pb1.75S4", "Ag(W3Br7)2"]
    np.testing.assert_array_equal(again.transform(formulas), featurizer.transform(formulas))
    assert again.feature_names == featurizer.feature_names
    # the stored table, not mendeleev, is used after reloading
    d["property_table"][ELEMENTS.index("O")][PROPERTY_NAMES.index("Number")] = 80.0
    changed = CompositionFeaturizer.from_dict(d).transform(["Fe2O3"])
    assert changed[0, _col(featurizer, "max_Number")] == 80.0
    with pytest.raises(ValueError):
        CompositionFeaturizer.from_dict({**d, "type": "Other"})


def test_featurize_all_expt_formulas() -> None:
    formulas = _read_formulas(EXPT_CSV)
    res = featurize_compositions(formulas)
    assert res.X.shape[0] == len(formulas) == 4604
    assert np.isfinite(res.X).all()
    np.testing.assert_allclose(res.X[:, :94].sum(axis=1), 1.0)


def test_featurize_mp_formulas_fast() -> None:
    formulas = _read_formulas(MP_CSV)
    featurize_compositions(formulas[:10])  # warm the property-table cache
    t0 = time.perf_counter()
    res = featurize_compositions(formulas)
    elapsed = time.perf_counter() - t0
    assert res.X.shape == (106113, 94 + len(PROPERTY_NAMES) * len(STAT_NAMES))
    assert np.isfinite(res.X).all()
    assert elapsed < 30.0, f"featurizing 106,113 formulas took {elapsed:.1f} s"


# -------------------------------------------------------------------- structure features


def _crystals() -> list[tuple[Atoms, float, float, int, float]]:
    """(atoms, nearest-neighbour distance, volume per atom, coordination, a) by hand."""
    a_si, a_nacl, a_cu = 5.431, 5.64, 3.615
    return [
        (bulk("Si", "diamond", a=a_si), a_si * math.sqrt(3) / 4, a_si**3 / 8, 4, a_si),
        (bulk("NaCl", "rocksalt", a=a_nacl), a_nacl / 2, a_nacl**3 / 8, 6, a_nacl),
        (bulk("Cu", "fcc", a=a_cu), a_cu / math.sqrt(2), a_cu**3 / 4, 12, a_cu),
    ]


def test_structure_features_by_hand() -> None:
    cases = _crystals()
    res = featurize_structures([c[0] for c in cases])
    names = res.feature_names
    amu_g = 1.66053906660e-24  # g
    for row, (atoms, d_nn, vpa, cn, _a) in zip(res.X, cases, strict=True):
        f = dict(zip(names, row, strict=True))
        assert f["volume_per_atom"] == pytest.approx(vpa, rel=1e-9)
        for key in ("nn_dist_mean", "nn_dist_min", "nn_dist_max"):
            assert f[key] == pytest.approx(d_nn, rel=1e-9)
        assert f["nn_dist_std"] == pytest.approx(0.0, abs=1e-9)
        assert f["coord_mean"] == f["coord_min"] == f["coord_max"] == cn
        z = atoms.numbers
        mass_g = atomic_masses[z].sum() * amu_g
        vol_cm3 = vpa * len(atoms) * 1e-24
        assert f["density"] == pytest.approx(mass_g / vol_cm3, rel=1e-6)
        spheres = sum(4 / 3 * math.pi * covalent_radii[k] ** 3 for k in z)
        assert f["packing_fraction"] == pytest.approx(spheres / (vpa * len(atoms)), rel=1e-9)
    # Si density is about 2.33 g/cm^3, Cu about 8.9-9.0 (known experimental values)
    assert res.X[0, names.index("density")] == pytest.approx(2.33, abs=0.01)
    assert res.X[2, names.index("density")] == pytest.approx(8.93, abs=0.05)
    # composition block equals the composition featurizer on the formula
    comp = CompositionFeaturizer().transform(["Si", "NaCl", "Cu"])
    np.testing.assert_allclose(res.X[:, len(StructureFeaturizer.GEOMETRY_NAMES) :], comp)


def test_structure_supercell_and_cell_choice_invariance() -> None:
    si = bulk("Si", "diamond", a=5.431)
    si_cubic = bulk("Si", "diamond", a=5.431, cubic=True)
    X = featurize_structures([si, si.repeat((2, 1, 3)), si_cubic]).X
    np.testing.assert_allclose(X[1], X[0], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(X[2], X[0], rtol=1e-9, atol=1e-9)


def test_structure_mixed_coordination() -> None:
    # bcc Fe: 8 neighbours at a*sqrt(3)/2, 6 more at a (ratio 1.155 > 1.1 tolerance)
    a = 2.87
    fe = bulk("Fe", "bcc", a=a)
    X, names = featurize_structures([fe])[:2]
    f = dict(zip(names, X[0], strict=True))
    assert f["nn_dist_min"] == pytest.approx(a * math.sqrt(3) / 2)
    assert f["coord_mean"] == 8
    wide = StructureFeaturizer(nn_tolerance=0.2).transform([fe])[0]
    assert wide[StructureFeaturizer.GEOMETRY_NAMES.index("coord_mean")] == 14


@pytest.mark.parametrize(("fmt", "ext"), [("cif", "cif"), ("vasp", "POSCAR"), ("extxyz", "xyz")])
def test_structure_io_round_trip(tmp_path: Path, fmt: str, ext: str) -> None:
    atoms = [c[0] for c in _crystals()]
    X0 = featurize_structures(atoms).X
    back = []
    for k, a in enumerate(atoms):
        p = tmp_path / f"s{k}.{ext}"
        write(p, a, format=fmt)
        back.append(read(p, format=fmt))
    X1 = featurize_structures(back).X
    np.testing.assert_allclose(X1, X0, rtol=1e-5, atol=1e-6)


def test_invalid_structures() -> None:
    good = bulk("Cu", "fcc", a=3.615)
    molecule = Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.74]])
    for bad, word in ((Atoms(), "no atoms"), (molecule, "periodic")):
        with pytest.raises(ValueError, match=rf"row 1.*{word}"):
            featurize_structures([good, bad])
    res = featurize_structures([Atoms(), good, molecule], skip_invalid=True)
    assert res.kept.tolist() == [1]
    assert [s.index for s in res.skipped] == [0, 2]
    assert "no atoms" in res.skipped[0].reason


def test_structure_featurizer_to_dict() -> None:
    sf = StructureFeaturizer(nn_tolerance=0.15)
    again = StructureFeaturizer.from_dict(json.loads(json.dumps(sf.to_dict())))
    atoms = [c[0] for c in _crystals()]
    np.testing.assert_array_equal(again.transform(atoms), sf.transform(atoms))
    assert again.nn_tolerance == 0.15
