"""Band-gap data sets: Matbench loaders with a checksummed download cache, and ase.db I/O.

Data sets
---------
* :func:`load_matbench_expt_gap` -- Matbench v0.1 task ``matbench_expt_gap``: 4,604
  experimental band gaps (eV) of inorganic solids, keyed by formula (Zhuo et al. 2018;
  Dunn et al. 2020). About half are metals (gap 0).
* :func:`load_matbench_mp_gap` -- Matbench v0.1 task ``matbench_mp_gap``: 106,113
  Materials Project PBE band gaps (eV), keyed by crystal structure (Jain et al. 2013;
  Dunn et al. 2020). Materials Project data are licensed CC BY 4.0.

Both are downloaded from the addresses Matbench distributes them at,
``https://ml.materialsproject.org/projects/<task>.json.gz``, into a cache directory and
checked against the SHA-256 listed in Matbench's ``matbench_v0.1_dataset_metadata.json``
(field ``hash``; the same values are in matminer's dataset metadata). The cache directory
is, in order of precedence, the ``cache_dir`` argument, the ``PCBTL_CACHE_DIR``
environment variable, or ``~/.cache/pcbtl``. A download is written to a temporary file in
the cache directory and moved into place with :func:`os.replace` only after its length and
checksum have been verified, so an interrupted transfer or a wrong checksum never leaves a
partial or wrong file under the final name.

The official files are pandas ``to_json(orient="split")`` documents::

    {"index": [...], "columns": ["composition", "gap expt"], "data": [["Hg0.7Cd0.3Te", 0.35], ...]}
    {"index": [...], "columns": ["structure", "gap pbe"],
     "data": [[{pymatgen Structure dict}, 0.0], ...]}

For ``mp_gap`` each pymatgen structure dictionary is turned into its reduced formula with
:mod:`ase.formula` (and, with ``with_structures=True``, into an :class:`ase.Atoms`);
pymatgen is not needed.

Any loader also accepts ``path=``: a local copy of the official JSON (``.json`` or
gzip-compressed, detected from the content) or a CSV file with header ``formula,target``
(a ``composition`` column is accepted in place of ``formula``). Local files are read as
they are, without a checksum.

ase.db storage
--------------
:func:`to_ase_db` / :func:`from_ase_db` keep a data set in an :mod:`ase.db` database (an
SQLite file for ``*.db``; the same code works with ase.db's other backends, e.g. JSON or
PostgreSQL, chosen by :func:`ase.db.connect` from the name). Each material is one row whose
``key_value_pairs`` hold ``composition`` (the formula string; ``formula`` itself is a
reserved ase.db key), ``y_source``, ``y_target``, ``split`` and optionally ``dataset``;
missing labels are left out of the row. The row stores the crystal as its ``Atoms`` when a
structure is known and an empty ``Atoms()`` otherwise (ase.db allows rows with zero
atoms), so the rows can be queried (``db.select(split="train")``) and extended with
ordinary ase.db tools.

References
----------
Dunn A., Wang Q., Ganose A., Dopp D., Jain A. (2020) Benchmarking materials property
prediction methods: the Matbench test set and Automatminer reference algorithm.
npj Comput. Mater. 6, 138.
Jain A. et al. (2013) The Materials Project: a materials genome approach to accelerating
materials innovation. APL Mater. 1, 011002.
Zhuo Y., Mansouri Tehrani A., Brgoch J. (2018) Predicting the band gaps of inorganic
solids by machine learning. J. Phys. Chem. Lett. 9, 1668-1673.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import io
import json
import math
import os
import re
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from ase import Atoms
from ase.formula import Formula

__all__ = [
    "MATBENCH_EXPT_GAP",
    "MATBENCH_MP_GAP",
    "AseDbData",
    "BandGapData",
    "DatasetInfo",
    "DownloadError",
    "default_cache_dir",
    "fetch_file",
    "from_ase_db",
    "load_matbench_expt_gap",
    "load_matbench_mp_gap",
    "read_bandgap_file",
    "to_ase_db",
]


# --------------------------------------------------------------------------------------
# Data set descriptions
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInfo:
    """Where a data set is published and how to check it."""

    name: str
    url: str
    sha256: str
    n_rows: int
    target: str


#: Matbench v0.1 ``matbench_expt_gap`` (hash from matbench_v0.1_dataset_metadata.json).
MATBENCH_EXPT_GAP = DatasetInfo(
    name="matbench_expt_gap",
    url="https://ml.materialsproject.org/projects/matbench_expt_gap.json.gz",
    sha256="783e7d1461eb83b00b2f2942da4b95fda5e58a0d1ae26b581c24cf8a82ca75b2",
    n_rows=4604,
    target="gap expt",
)

#: Matbench v0.1 ``matbench_mp_gap`` (hash from matbench_v0.1_dataset_metadata.json).
MATBENCH_MP_GAP = DatasetInfo(
    name="matbench_mp_gap",
    url="https://ml.materialsproject.org/projects/matbench_mp_gap.json.gz",
    sha256="58b65746bd88329986ed66031a2ac1369c7c522f7bc9f9081528e07097c2c057",
    n_rows=106113,
    target="gap pbe",
)

_DEFAULT = object()  # sentinel: "use the data set's official checksum"


@dataclass(frozen=True)
class BandGapData:
    """A band-gap table.

    Attributes
    ----------
    formulas
        One formula per material: the reduced formula for structure-keyed JSON data, the
        formula as written for CSV input (e.g. ``Fe4O6``; features use element fractions, so
        they do not depend on the reduction).
    y
        Band gaps in eV, float array of shape ``(n,)``.
    atoms
        ``ase.Atoms`` per material when structures were loaded, else ``None``.
    name
        Data-set name (e.g. ``"matbench_expt_gap"``).
    source
        The file the data were read from.
    """

    formulas: list[str]
    y: np.ndarray
    atoms: list[Atoms] | None = None
    name: str = ""
    source: str = ""

    def __len__(self) -> int:
        return len(self.formulas)


class DownloadError(OSError):
    """A data file could not be downloaded (offline, HTTP error, interrupted transfer)."""


# --------------------------------------------------------------------------------------
# Download cache
# --------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$PCBTL_CACHE_DIR`` if set, else ``~/.cache/pcbtl``."""
    env = os.environ.get("PCBTL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pcbtl"


def _sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_file(
    url: str,
    sha256: str | None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    filename: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Return the path of ``url``'s file in the cache, downloading it if needed.

    A cached file is used only if its SHA-256 equals ``sha256`` (``None`` skips the
    check); otherwise the file is (re-)downloaded to a temporary file in the cache
    directory, its length is compared with the ``Content-Length`` header and its SHA-256
    with ``sha256``, and only then is it moved into place with :func:`os.replace`.

    Raises
    ------
    ValueError
        The downloaded file's checksum differs from ``sha256`` (nothing is kept).
    DownloadError
        No connection, an HTTP error, or an interrupted transfer (nothing is kept).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = filename or Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot derive a file name from url {url!r}; pass filename=")
    dest = cache / name
    want = sha256.lower() if sha256 else None
    if dest.is_file() and (want is None or _sha256_of(dest) == want):
        return dest

    cache.mkdir(parents=True, exist_ok=True)
    hint = (
        f"Download {url} yourself and pass path='/path/to/{name}' to the loader, "
        f"or put the file in the cache directory {cache} (see PCBTL_CACHE_DIR)."
    )
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".part", dir=cache)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            h = hashlib.sha256()
            n_bytes = 0
            try:
                req = urllib.request.Request(url, headers={"User-Agent": "pcbtl"})
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    length = resp.headers.get("Content-Length")
                    while chunk := resp.read(1 << 20):
                        h.update(chunk)
                        out.write(chunk)
                        n_bytes += len(chunk)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                raise DownloadError(f"could not download {name} from {url}: {exc}. {hint}") from exc
        if length is not None and n_bytes != int(length):
            raise DownloadError(
                f"incomplete download of {name} from {url}: received {n_bytes} of "
                f"{int(length)} bytes. {hint}"
            )
        got = h.hexdigest()
        if want is not None and got != want:
            raise ValueError(
                f"checksum mismatch for {name} downloaded from {url}: expected sha256 "
                f"{want}, got {got}; the file was discarded"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# --------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw


def _symbol(element: str) -> str:
    m = re.match(r"[A-Z][a-z]?", element)
    if m is None:
        raise ValueError(f"cannot read element {element!r}")
    return m.group(0)


def _format_amount(x: float) -> str:
    return "" if x == 1 else (str(int(x)) if float(x).is_integer() else f"{x:.6g}")


def _structure_to_formula_atoms(
    struct: dict[str, Any], want_atoms: bool
) -> tuple[str, Atoms | None]:
    """Reduced formula (and optionally Atoms) of a pymatgen ``Structure.as_dict()``.

    Sites with partial occupancy contribute their occupancies to the formula; the Atoms
    get the majority species of such a site.
    """
    sites = struct["sites"]
    symbols: list[str] = []
    amounts: dict[str, float] = {}
    for site in sites:
        species = site["species"]
        for sp in species:
            s = _symbol(sp["element"])
            amounts[s] = amounts.get(s, 0.0) + float(sp.get("occu", 1.0))
        best = max(species, key=lambda sp: float(sp.get("occu", 1.0)))
        symbols.append(_symbol(best["element"]))
    if all(abs(v - round(v)) < 1e-8 for v in amounts.values()):
        counts = {k: round(v) for k, v in amounts.items()}
        formula = str(Formula.from_dict(counts).reduce()[0])
    else:
        formula = "".join(f"{k}{_format_amount(v)}" for k, v in amounts.items())
    atoms = None
    if want_atoms:
        atoms = Atoms(
            symbols=symbols,
            positions=[site["xyz"] for site in sites],
            cell=struct["lattice"]["matrix"],
            pbc=True,
        )
    return formula, atoms


def _read_json(path: Path, target: str | None, want_atoms: bool) -> tuple[list, np.ndarray, list]:
    doc = json.loads(_read_bytes(path))
    if not (isinstance(doc, dict) and "columns" in doc and "data" in doc):
        raise ValueError(f"{path}: expected a Matbench JSON document with 'columns' and 'data'")
    columns = list(doc["columns"])
    inputs = [c for c in ("composition", "formula", "structure") if c in columns]
    if not inputs:
        raise ValueError(f"{path}: no 'composition', 'formula' or 'structure' column in {columns}")
    in_col = columns.index(inputs[0])
    if target is not None and target in columns:
        y_col = columns.index(target)
    else:
        others = [
            i for i, c in enumerate(columns) if c not in ("composition", "formula", "structure")
        ]
        if len(others) != 1:
            raise ValueError(f"{path}: cannot tell the target column among {columns}")
        y_col = others[0]
    formulas: list[str] = []
    atoms: list[Atoms] = []
    y = np.empty(len(doc["data"]))
    for r, row in enumerate(doc["data"]):
        value = row[in_col]
        if isinstance(value, dict):
            f, a = _structure_to_formula_atoms(value, want_atoms)
            formulas.append(f)
            if a is not None:
                atoms.append(a)
        else:
            formulas.append(str(value))
        y[r] = float(row[y_col])
    return formulas, y, atoms


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    text = _read_bytes(path).decode("utf-8-sig")
    reader = csv.DictReader(io.StringIO(text))
    fields = reader.fieldnames or []
    f_col = (
        "formula" if "formula" in fields else ("composition" if "composition" in fields else None)
    )
    if f_col is None or "target" not in fields:
        raise ValueError(f"{path}: CSV header must contain 'formula' and 'target', got {fields}")
    formulas: list[str] = []
    ys: list[float] = []
    for row in reader:
        formulas.append(row[f_col])
        ys.append(float(row["target"]))
    return formulas, np.asarray(ys, dtype=float)


def read_bandgap_file(
    path: str | os.PathLike[str],
    *,
    target: str | None = None,
    with_structures: bool = False,
    name: str = "",
) -> BandGapData:
    """Read a band-gap table from a CSV (``formula,target``) or Matbench JSON(.gz) file.

    The format is taken from the content: a JSON object (optionally gzip-compressed) is
    read as a Matbench ``columns``/``data`` document, anything else as CSV. ``target``
    names the JSON target column (default: the only non-input column).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no such data file: {p}")
    head = _read_bytes(p)[:64].lstrip()
    if head.startswith(b"{"):
        formulas, y, atoms = _read_json(p, target, with_structures)
        if with_structures and len(atoms) != len(formulas):
            raise ValueError(f"{p}: with_structures=True needs a 'structure' column")
        return BandGapData(formulas, y, atoms if with_structures else None, name, str(p))
    if with_structures:
        raise ValueError(f"{p}: a CSV file holds no structures (with_structures=True)")
    formulas, y = _read_csv(p)
    return BandGapData(formulas, y, None, name, str(p))


def _load(
    info: DatasetInfo,
    path: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    url: str | None,
    sha256: Any,
    with_structures: bool,
    timeout: float,
) -> BandGapData:
    if path is None:
        checksum = info.sha256 if sha256 is _DEFAULT else sha256
        path = fetch_file(url or info.url, checksum, cache_dir=cache_dir, timeout=timeout)
    return read_bandgap_file(
        path, target=info.target, with_structures=with_structures, name=info.name
    )


def load_matbench_expt_gap(
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
    *,
    sha256: str | None = _DEFAULT,  # type: ignore[assignment]
    timeout: float = 60.0,
) -> BandGapData:
    """Load Matbench v0.1 ``matbench_expt_gap`` (4,604 experimental gaps, Zhuo et al. 2018).

    Parameters
    ----------
    path
        A local copy (official ``.json.gz``/``.json`` or CSV ``formula,target``); when
        given, nothing is downloaded and no checksum is checked.
    cache_dir
        Cache directory (default ``$PCBTL_CACHE_DIR`` or ``~/.cache/pcbtl``).
    url
        Download address (default: :data:`MATBENCH_EXPT_GAP` ``.url``, the official
        Matbench address). The cached file is named after the URL's last path component.
    sha256
        Expected SHA-256 of the downloaded file. Defaults to the official file's hash
        (``783e7d14...``, from Matbench's dataset metadata); pass another hash when
        ``url`` points at a different file, or ``None`` to skip the check.
    timeout
        Socket timeout in seconds.

    Returns
    -------
    BandGapData
        ``formulas`` (as written in the data set, some with fractional amounts) and ``y``
        (gap, eV), in the data set's original order (required by Matbench's folds).
    """
    return _load(MATBENCH_EXPT_GAP, path, cache_dir, url, sha256, False, timeout)


def load_matbench_mp_gap(
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
    *,
    sha256: str | None = _DEFAULT,  # type: ignore[assignment]
    with_structures: bool = False,
    timeout: float = 300.0,
) -> BandGapData:
    """Load Matbench v0.1 ``matbench_mp_gap`` (106,113 Materials Project PBE gaps).

    Same parameters as :func:`load_matbench_expt_gap` (default hash ``58b65746...`` from
    Matbench's dataset metadata). The official file is keyed by pymatgen structures; each
    becomes its reduced formula (via :mod:`ase.formula`; a formula CSV is read as written), and with
    ``with_structures=True`` also an :class:`ase.Atoms` in ``BandGapData.atoms`` (only
    possible from the JSON file, not from a formula CSV). Several polymorphs can share a
    formula. Materials Project data are licensed CC BY 4.0 (Jain et al. 2013).
    """
    return _load(MATBENCH_MP_GAP, path, cache_dir, url, sha256, with_structures, timeout)


# --------------------------------------------------------------------------------------
# ase.db
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AseDbData:
    """Rows read back by :func:`from_ase_db` (in row-id order).

    ``y_source``/``y_target`` are NaN and ``split`` is ``None`` where a row has no such
    value; ``atoms[k]`` is ``None`` for rows stored without a structure.
    """

    ids: list[int]
    formulas: list[str]
    y_source: np.ndarray
    y_target: np.ndarray
    split: list[str | None]
    atoms: list[Atoms | None]

    def __len__(self) -> int:
        return len(self.ids)


def _connect(db: Any) -> Any:
    import ase.db

    if isinstance(db, str | os.PathLike):
        return ase.db.connect(os.fspath(db))
    if hasattr(db, "write") and hasattr(db, "select"):
        return db
    raise TypeError(f"expected a path/URL or an ase.db connection, got {type(db).__name__}")


def _optional_column(values: Sequence[Any] | np.ndarray | None, n: int, label: str) -> list:
    if values is None:
        return [None] * n
    seq = list(values)
    if len(seq) != n:
        raise ValueError(f"{label} has {len(seq)} entries, expected {n} (one per formula)")
    return seq


def to_ase_db(
    db_path_or_connection: Any,
    formulas: Sequence[str],
    y_source: Sequence[float] | np.ndarray | None = None,
    y_target: Sequence[float] | np.ndarray | None = None,
    split: Sequence[str | None] | None = None,
    atoms: Sequence[Atoms | None] | None = None,
    *,
    dataset: str | None = None,
) -> list[int]:
    """Write one ase.db row per material and return the new row ids.

    ``db_path_or_connection`` is a file name / URL for :func:`ase.db.connect` (``.db``
    -> SQLite) or an open ase.db connection. Rows are appended; all writes happen in one
    transaction (``with db:``). Per row the key-value pairs are ``composition`` (the
    formula), ``y_source`` / ``y_target`` (floats; left out where None or NaN), ``split``
    (left out where None) and ``dataset`` (if given). The row's atoms are ``atoms[i]`` if
    given and not None, else an empty ``Atoms()``.

    Note: ase.db's JSON backend rewrites the whole file per row; use SQLite for large sets.
    """
    n = len(formulas)
    ys = _optional_column(y_source, n, "y_source")
    yt = _optional_column(y_target, n, "y_target")
    sp = _optional_column(split, n, "split")
    at = _optional_column(atoms, n, "atoms")
    con = _connect(db_path_or_connection)
    ids: list[int] = []
    with con:
        for i in range(n):
            kvp: dict[str, Any] = {"composition": str(formulas[i])}
            for key, val in (("y_source", ys[i]), ("y_target", yt[i])):
                if val is not None and not math.isnan(float(val)):
                    kvp[key] = float(val)
            if sp[i] is not None:
                kvp["split"] = str(sp[i])
            if dataset is not None:
                kvp["dataset"] = str(dataset)
            a = at[i] if at[i] is not None else Atoms()
            if not isinstance(a, Atoms):
                raise TypeError(f"row {i}: atoms must be ase.Atoms or None")
            ids.append(int(con.write(a, key_value_pairs=kvp)))
    return ids


def from_ase_db(db_path_or_connection: Any, selection: Any = None, **query: Any) -> AseDbData:
    """Read rows written by :func:`to_ase_db` (or compatible ones) back, by row id.

    ``selection`` and ``query`` are passed to ``db.select`` (e.g. ``split="test"`` or
    ``dataset="matbench_expt_gap"``). Rows without a ``composition`` key take the
    formula of their atoms.
    """
    con = _connect(db_path_or_connection)
    ids: list[int] = []
    formulas: list[str] = []
    ys: list[float] = []
    yt: list[float] = []
    sp: list[str | None] = []
    at: list[Atoms | None] = []
    rows = sorted(con.select(selection, **query), key=lambda r: r.id)
    for row in rows:
        kvp = row.key_value_pairs
        a = row.toatoms() if row.natoms > 0 else None
        formula = kvp.get("composition")
        if formula is None:
            if a is None:
                raise ValueError(f"row {row.id}: neither a 'composition' key nor atoms")
            formula = a.get_chemical_formula()
        ids.append(int(row.id))
        formulas.append(str(formula))
        ys.append(float(kvp.get("y_source", np.nan)))
        yt.append(float(kvp.get("y_target", np.nan)))
        sp.append(kvp.get("split"))
        at.append(a)
    return AseDbData(ids, formulas, np.asarray(ys, float), np.asarray(yt, float), sp, at)
