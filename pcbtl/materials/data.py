"""Band-gap data sets: Matbench loaders with a checksummed download cache, and ase.db I/O.

Data sets
---------
* :func:`load_matbench_expt_gap` -- Matbench v0.1 task ``matbench_expt_gap``: 4,604
  experimental band gaps (eV) of inorganic solids, keyed by formula (Zhuo et al. 2018;
  Dunn et al. 2020). About half are metals (gap 0).
* :func:`load_matbench_mp_gap` -- Matbench v0.1 task ``matbench_mp_gap``: 106,113
  Materials Project PBE band gaps (eV), keyed by crystal structure (Jain et al. 2013;
  Dunn et al. 2020). Materials Project data are licensed CC BY 4.0.
* :func:`load_matbench_expt_is_metal` -- Matbench v0.1 task ``matbench_expt_is_metal``:
  4,921 experimental metal (1) / non-metal (0) labels keyed by formula, from the same
  source as ``matbench_expt_gap`` (Zhuo et al. 2018; Dunn et al. 2020); 2,451 metals.

Both are downloaded from the addresses Matbench distributes them at,
``https://ml.materialsproject.org/projects/<task>.json.gz``, into a cache directory and
checked against the SHA-256 listed in Matbench's ``matbench_v0.1_dataset_metadata.json``
(field ``hash``; the same values are in matminer's dataset metadata). The cache directory
is, in order of precedence, the ``cache_dir`` argument, the ``PCBTL_CACHE_DIR``
environment variable, or ``~/.cache/pcbtl``. A download is written to a temporary file in
the cache directory and moved into place with :func:`os.replace` only after its length and
checksum have been verified, so an interrupted transfer or a wrong checksum never leaves a
partial or wrong file under the final name. Without a checksum (``sha256=None``) a
download is kept only when it is provably complete -- its length matches the
``Content-Length`` header, or, when the server sends none, the file reads to its end in its
format -- and never when it is an HTML page (see :func:`fetch_file`).

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

Reading is strict (:func:`read_bandgap_file`): every problem in a file is a ``ValueError``
that names the file and, for a row, its CSV line or JSON ``data[i]`` index -- a truncated
gzip stream, text that is not UTF-8, a missing or extra field, a target that is empty, not a
number or not finite (NaN, infinity, ``1e999``). Exact duplicate rows are dropped and
formulas with conflicting targets kept, both reported by one :class:`DuplicateRowsWarning`
(the ``duplicates`` argument chooses otherwise). Gzip files are decompressed as a stream
that stops past ``max_bytes`` (:data:`MAX_FILE_BYTES`, 2 GiB, by default).

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
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from ase import Atoms
from ase.formula import Formula

from pcbtl._validation import check_integer

__all__ = [
    "MATBENCH_EXPT_GAP",
    "MATBENCH_EXPT_IS_METAL",
    "MATBENCH_MP_GAP",
    "MAX_FILE_BYTES",
    "AseDbData",
    "BandGapData",
    "DatasetInfo",
    "DownloadError",
    "DuplicateRowsWarning",
    "default_cache_dir",
    "fetch_file",
    "find_local_table",
    "from_ase_db",
    "load_matbench_expt_gap",
    "load_matbench_expt_is_metal",
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

#: Matbench v0.1 ``matbench_expt_is_metal`` (hash from matbench_v0.1_dataset_metadata.json).
MATBENCH_EXPT_IS_METAL = DatasetInfo(
    name="matbench_expt_is_metal",
    url="https://ml.materialsproject.org/projects/matbench_expt_is_metal.json.gz",
    sha256="8f2a4f9bacdcbc5c2c73615629ee7986f09d39bed40ba7db52b61b2889730887",
    n_rows=4921,
    target="is_metal",
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


class DuplicateRowsWarning(UserWarning):
    """A data file repeats rows: exact duplicates were dropped and/or a formula has
    conflicting targets (kept). Raised once per file by :func:`read_bandgap_file` with
    ``duplicates="drop"`` (the default), with the counts and the first example."""


#: Largest content a reader accepts by default, in bytes after gzip decompression (2 GiB);
#: the ``max_bytes`` argument of :func:`read_bandgap_file` and the loaders.
MAX_FILE_BYTES = 2 * 1024**3

_DUPLICATE_POLICIES = ("drop", "keep", "error")
_GZIP_MAGIC = b"\x1f\x8b"


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


def _head(path: Path, n: int = 1024) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _looks_like_html(head: bytes, content_type: str | None = None) -> bool:
    """Whether a response is a web page (a login wall, an error or rate-limit page)."""
    if content_type and content_type.split(";")[0].strip().lower() in (
        "text/html",
        "application/xhtml+xml",
    ):
        return True
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return start.startswith((b"<!doctype html", b"<html"))


def _gzip_blocks(path: Path, block: int = 1 << 20) -> Iterator[bytes]:
    """The decompressed content of a gzip file, ``block`` bytes at a time (never more)."""
    with gzip.open(path, "rb") as gz:
        while chunk := gz.read(block):
            yield chunk


def fetch_file(
    url: str,
    sha256: str | None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    filename: str | None = None,
    timeout: float = 60.0,
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Return the path of ``url``'s file in the cache, downloading it if needed.

    A cached file is used only if its SHA-256 equals ``sha256``; otherwise the file is
    (re-)downloaded to a temporary file in the cache directory and moved into place with
    :func:`os.replace` only once it is known to be complete and right:

    * its length equals the ``Content-Length`` header, when the server sends one;
    * with ``sha256``: its SHA-256 equals ``sha256`` (this alone proves the file);
    * with ``sha256=None``: it is not an HTML page (by ``Content-Type`` or content: a login,
      error or rate-limit page served with status 200), and, when the server sent no
      ``Content-Length`` (so a cut connection looks like the end of the file), it reads to
      its end in its own format: ``check(path)`` returns without raising ``ValueError``, or,
      without ``check``, the file is a gzip stream that reaches its end-of-stream marker.
      Anything else is not kept. With ``sha256=None`` a cached file is used unless it is an
      HTML page.

    Raises
    ------
    ValueError
        The downloaded file's checksum differs from ``sha256`` (nothing is kept).
    DownloadError
        No connection, an HTTP error, an interrupted or unverifiable transfer, or an HTML
        page instead of the file (nothing is kept).
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = filename or Path(urllib.parse.urlparse(url).path).name
    if not name:
        raise ValueError(f"cannot derive a file name from url {url!r}; pass filename=")
    dest = cache / name
    want = sha256.lower() if sha256 else None
    if dest.is_file():
        if want is None and not _looks_like_html(_head(dest)):
            return dest
        if want is not None and _sha256_of(dest) == want:
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
            head = b""
            try:
                req = urllib.request.Request(url, headers={"User-Agent": "pcbtl"})
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    length_header = resp.headers.get("Content-Length")
                    content_type = resp.headers.get("Content-Type")
                    while chunk := resp.read(1 << 20):
                        if len(head) < 1024:
                            head += chunk[: 1024 - len(head)]
                        h.update(chunk)
                        out.write(chunk)
                        n_bytes += len(chunk)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
                raise DownloadError(f"could not download {name} from {url}: {exc}. {hint}") from exc
        try:
            length = int(length_header) if length_header is not None else None
        except ValueError:
            length = None
        if length is not None and n_bytes != length:
            raise DownloadError(
                f"incomplete download of {name} from {url}: received {n_bytes} of "
                f"{length} bytes. {hint}"
            )
        page = _looks_like_html(head, content_type)
        got = h.hexdigest()
        if want is not None and got != want:
            what = " (the server sent an HTML page)" if page else ""
            raise ValueError(
                f"checksum mismatch for {name} downloaded from {url}{what}: expected sha256 "
                f"{want}, got {got}; the file was discarded"
            )
        if want is None and page:
            raise DownloadError(
                f"{url} answered with an HTML page (a login, error or rate-limit page?), "
                f"not the data file {name}; nothing was kept. {hint}"
            )
        if want is None and length is None:
            try:
                if check is not None:
                    check(tmp)
                elif head[:2] == _GZIP_MAGIC:
                    for _ in _gzip_blocks(tmp):
                        pass
                else:
                    raise ValueError("pcbtl has no way to check this file's format")
            except (ValueError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                raise DownloadError(
                    f"the download of {name} from {url} may have been cut short: the server "
                    f"sent no Content-Length, no sha256 was given to check it, and the file "
                    f"does not read to its end ({exc}); nothing was kept. Pass sha256= or "
                    f"retry. {hint}"
                ) from exc
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# --------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------


def _read_bytes(path: Path, max_bytes: int) -> bytes | bytearray:
    """The file's content, gunzipped (streamed, stopping past ``max_bytes``) if gzip."""
    if _head(path, 2) != _GZIP_MAGIC:
        size = path.stat().st_size
        if size > max_bytes:
            raise ValueError(
                f"{path}: the file holds {size} bytes, more than max_bytes={max_bytes}; "
                "pass a larger max_bytes to read it"
            )
        return path.read_bytes()
    buf = bytearray()
    try:
        for chunk in _gzip_blocks(path):
            if len(buf) + len(chunk) > max_bytes:
                raise ValueError(
                    f"{path}: decompresses to more than max_bytes={max_bytes} bytes (stopped "
                    "there: a gzip bomb, or a larger file than expected; pass a larger "
                    "max_bytes to read it)"
                )
            buf += chunk
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: not a complete gzip file (truncated or corrupt: {exc})") from exc
    return buf


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
    if not amounts:
        raise ValueError("the structure has no sites")
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


def _target(value: Any, path: Path, where: str) -> float:
    """A row's target as a finite float, or a ``ValueError`` naming the file and row."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            raise ValueError(f"{path}, {where}: the target is empty")
        try:
            y = float(text)
        except ValueError:
            raise ValueError(f"{path}, {where}: target {value!r} is not a number") from None
    elif isinstance(value, int | float):
        y = float(value)
    elif value is None:
        raise ValueError(f"{path}, {where}: the target is missing (null)")
    else:
        raise ValueError(f"{path}, {where}: target {value!r} is not a number")
    if not math.isfinite(y):
        raise ValueError(
            f"{path}, {where}: target {value!r} is not finite (NaN or infinity); "
            "remove the row or give its value"
        )
    return y


def _short(value: Any, n: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


class _Table(NamedTuple):
    formulas: list[str]
    y: list[float]
    atoms: list[Atoms]
    where: list[str]  # "line 7" / "data[5]", for messages
    keys: list[Any]  # what a duplicate must repeat: the formula or the structure


def _read_json(path: Path, raw: bytes | bytearray, target: str | None, want_atoms: bool) -> _Table:
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path}, line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})"
        ) from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 JSON ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ValueError(f"{path}: the JSON document is nested too deeply to read") from None
    if not (isinstance(doc, dict) and "columns" in doc and "data" in doc):
        raise ValueError(f"{path}: expected a Matbench JSON document with 'columns' and 'data'")
    columns, data = doc["columns"], doc["data"]
    if not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        raise ValueError(f"{path}: 'columns' must be a list of names, got {_short(columns)}")
    if not isinstance(data, list):
        raise ValueError(f"{path}: 'data' must be a list of rows, got {_short(data)}")
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
    table = _Table([], [], [], [], [])
    for r, row in enumerate(data):
        where = f"data[{r}]"
        if not isinstance(row, list) or len(row) != len(columns):
            raise ValueError(
                f"{path}, {where}: expected a list of {len(columns)} values {columns}, "
                f"got {_short(row)}"
            )
        value = row[in_col]
        if isinstance(value, dict):
            try:
                f, a = _structure_to_formula_atoms(value, want_atoms)
            except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
                raise ValueError(
                    f"{path}, {where}: not a readable pymatgen structure "
                    f"({type(exc).__name__}: {exc})"
                ) from None
            if a is not None:
                table.atoms.append(a)
        elif isinstance(value, str) and value.strip():
            f = value.strip()
        else:
            raise ValueError(
                f"{path}, {where}: {columns[in_col]!r} must be a formula or a structure, "
                f"got {_short(value)}"
            )
        table.formulas.append(f)
        table.y.append(_target(row[y_col], path, where))
        table.where.append(where)
        table.keys.append(value)
    return table


def _read_csv(path: Path, raw: bytes | bytearray) -> _Table:
    bom = raw.startswith(b"\xef\xbb\xbf")
    try:
        text = raw[3 if bom else 0 :].decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start + (3 if bom else 0)].count(b"\n") + 1
        raise ValueError(
            f"{path}, line {line}: not UTF-8 text ({exc.reason}, byte {exc.object[exc.start]:#x}); "
            "save the file as UTF-8"
        ) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    table = _Table([], [], [], [], [])
    try:
        header = [c.strip() for c in next(reader, [])]
        f_col = next((header.index(c) for c in ("formula", "composition") if c in header), None)
        if f_col is None or "target" not in header:
            raise ValueError(
                f"{path}: CSV header must contain 'formula' and 'target', got {header}"
            )
        y_col = header.index("target")
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            where = f"line {reader.line_num}"
            if len(row) != len(header):
                raise ValueError(
                    f"{path}, {where}: expected {len(header)} fields ({','.join(header)}), "
                    f"got {len(row)}: {_short(','.join(row))}"
                )
            formula = row[f_col].strip()
            if not formula:
                raise ValueError(f"{path}, {where}: empty formula")
            table.formulas.append(formula)
            table.y.append(_target(row[y_col], path, where))
            table.where.append(where)
            table.keys.append(formula)
    except csv.Error as exc:
        raise ValueError(f"{path}, line {reader.line_num}: {exc}") from None
    return table


def _duplicate_key(value: Any) -> Any:
    return json.dumps(value, sort_keys=True) if isinstance(value, dict) else value


def _handle_duplicates(path: Path, table: _Table, policy: str) -> list[int]:
    """Rows to keep under ``policy`` (see :func:`read_bandgap_file`), warning or raising."""
    if policy == "keep":
        return list(range(len(table.y)))
    first_row: dict[tuple[Any, float], int] = {}  # (input, target) -> first row
    first_input: dict[Any, int] = {}  # input -> first row
    dropped: list[tuple[int, int]] = []  # (row, the earlier row it repeats)
    conflicts: dict[Any, tuple[int, int]] = {}  # input -> first two rows that disagree
    keep: list[int] = []
    for i, value in enumerate(table.keys):
        key = _duplicate_key(value)
        j = first_row.get((key, table.y[i]))
        if j is not None:
            if policy == "error":
                raise ValueError(
                    f"{path}, {table.where[i]}: repeats {table.where[j]} "
                    f"({table.formulas[i]}, {table.y[i]:.6g}); pass duplicates='drop' or 'keep'"
                )
            dropped.append((i, j))
            continue
        first_row[(key, table.y[i])] = i
        keep.append(i)
        k = first_input.setdefault(key, i)
        if k != i and key not in conflicts:
            if policy == "error":
                raise ValueError(
                    f"{path}, {table.where[i]}: {table.formulas[i]} has target {table.y[i]:.6g} "
                    f"but {table.y[k]:.6g} at {table.where[k]}; pass duplicates='drop' or 'keep'"
                )
            conflicts[key] = (k, i)
    notes = []
    if dropped:
        i, j = dropped[0]
        s = "" if len(dropped) == 1 else "s"
        notes.append(
            f"{len(dropped)} exact duplicate row{s} dropped (the first at {table.where[i]}, "
            f"a repeat of {table.where[j]}: {table.formulas[i]}, {table.y[i]:.6g})"
        )
    if conflicts:
        k, i = next(iter(conflicts.values()))
        s = "" if len(conflicts) == 1 else "s"
        notes.append(
            f"{len(conflicts)} formula{s} with conflicting targets kept as separate rows "
            f"(the first: {table.formulas[k]} = {table.y[k]:.6g} at {table.where[k]} but "
            f"{table.y[i]:.6g} at {table.where[i]})"
        )
    if notes:
        warnings.warn(
            f"{path}: " + "; ".join(notes) + ". duplicates='keep' keeps every row silently, "
            "duplicates='error' refuses such a file.",
            DuplicateRowsWarning,
            stacklevel=3,
        )
    return keep


def read_bandgap_file(
    path: str | os.PathLike[str],
    *,
    target: str | None = None,
    with_structures: bool = False,
    name: str = "",
    duplicates: str = "drop",
    max_bytes: int = MAX_FILE_BYTES,
) -> BandGapData:
    """Read a band-gap table from a CSV (``formula,target``) or Matbench JSON(.gz) file.

    The format is taken from the content: a JSON object (optionally gzip-compressed) is
    read as a Matbench ``columns``/``data`` document, anything else as UTF-8 CSV. ``target``
    names the JSON target column (default: the only non-input column).

    Parameters
    ----------
    path
        The file.
    target
        JSON target column (default: the only column that is not an input).
    with_structures
        Also build ``ase.Atoms`` from a ``structure`` column.
    name
        Data-set name stored in the result.
    duplicates
        What to do with rows whose input repeats an earlier row's (the formula as written,
        or the whole structure of structure-keyed JSON):

        * ``"drop"`` (default): an *exact* duplicate (same input, same target) is dropped,
          the first occurrence kept in place; inputs with *conflicting* targets are kept
          as separate rows (averaging would invent a measurement, and a model fitted to both
          rows reads the disagreement as noise). Either case raises one
          :class:`DuplicateRowsWarning` with the counts and the first example.
        * ``"keep"``: every row as written, silently (for tables whose rows are distinct
          materials sharing a formula, such as polymorphs).
        * ``"error"``: the first repeat or conflict raises ``ValueError``.
    max_bytes
        Largest content read, in bytes, after gzip decompression (default
        :data:`MAX_FILE_BYTES`, 2 GiB). Compressed files are decompressed as a stream and
        reading stops with ``ValueError`` as soon as the limit is passed, so a small
        gzip bomb cannot fill the memory.

    Raises
    ------
    FileNotFoundError
        No such file.
    ValueError
        Anything wrong in the file, always naming the file and, for a row, its CSV line
        (``line 7``) or its JSON index (``data[5]``): a truncated or corrupt gzip stream,
        text that is not UTF-8, invalid or too deeply nested JSON, a row with a missing or
        extra field, an empty formula, a target that is empty, not a number or not finite
        (NaN, infinity, ``1e999``), an unreadable structure, or content past ``max_bytes``.
    """
    if duplicates not in _DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {_DUPLICATE_POLICIES}, got {duplicates!r}")
    max_bytes = check_integer(max_bytes, "max_bytes", minimum=1)
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"no such data file: {p}")
    raw = _read_bytes(p, max_bytes)
    if raw[:64].lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{"):
        table = _read_json(p, raw, target, with_structures)
        if with_structures and len(table.atoms) != len(table.formulas):
            raise ValueError(f"{p}: with_structures=True needs a 'structure' column")
    else:
        if with_structures:
            raise ValueError(f"{p}: a CSV file holds no structures (with_structures=True)")
        table = _read_csv(p, raw)
    del raw
    keep = _handle_duplicates(p, table, duplicates)
    formulas = [table.formulas[i] for i in keep]
    y = np.asarray([table.y[i] for i in keep], dtype=float)
    atoms = [table.atoms[i] for i in keep] if with_structures else None
    return BandGapData(formulas, y, atoms, name, str(p))


def _load(
    info: DatasetInfo,
    path: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    url: str | None,
    sha256: Any,
    with_structures: bool,
    timeout: float,
    duplicates: str,
    max_bytes: int,
) -> BandGapData:
    if path is None:
        checksum = info.sha256 if sha256 is _DEFAULT else sha256

        def check(p: Path) -> None:  # a download without checksum or length must read
            read_bandgap_file(p, target=info.target, duplicates="keep", max_bytes=max_bytes)

        path = fetch_file(
            url or info.url, checksum, cache_dir=cache_dir, timeout=timeout, check=check
        )
    return read_bandgap_file(
        path,
        target=info.target,
        with_structures=with_structures,
        name=info.name,
        duplicates=duplicates,
        max_bytes=max_bytes,
    )


def find_local_table(data_dir: str | Path | None, name: str) -> Path | None:
    """The local copy of Matbench task ``name`` in ``data_dir``:
    ``{name}.csv``, ``{name}.json.gz`` or ``{name}.json`` (first found), looked for in
    ``data_dir`` itself and then in its ``bandgap/`` and ``metallicity/`` folders (the layout
    of the shared data). ``None`` for ``data_dir=None`` (no local copy: the loaders download);
    ``FileNotFoundError`` naming the folder when it holds none."""
    if data_dir is None:
        return None
    root = Path(data_dir)
    for folder in (root, root / "bandgap", root / "metallicity"):
        for ext in (".csv", ".json.gz", ".json"):
            path = folder / f"{name}{ext}"
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"no {name}.csv/.json.gz/.json in {root} (or its bandgap/ and metallicity/ folders); "
        "pass another data folder, or none to download the official file"
    )


def load_matbench_expt_gap(
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
    *,
    sha256: str | None = _DEFAULT,  # type: ignore[assignment]
    timeout: float = 60.0,
    duplicates: str = "drop",
    max_bytes: int = MAX_FILE_BYTES,
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
        ``url`` points at a different file, or ``None`` to skip the check (a download is
        then kept only when it is provably complete, see :func:`fetch_file`).
    timeout
        Socket timeout in seconds.
    duplicates, max_bytes
        See :func:`read_bandgap_file` (exact duplicate rows are dropped with a
        :class:`DuplicateRowsWarning`; the official file has none).

    Returns
    -------
    BandGapData
        ``formulas`` (as written in the data set, some with fractional amounts) and ``y``
        (gap, eV), in the data set's original order (required by Matbench's folds).

    Raises
    ------
    ValueError
        A bad file (see :func:`read_bandgap_file`) or a checksum mismatch.
    DownloadError
        The file could not be downloaded, or not verified (see :func:`fetch_file`).
    """
    return _load(
        MATBENCH_EXPT_GAP, path, cache_dir, url, sha256, False, timeout, duplicates, max_bytes
    )


def load_matbench_mp_gap(
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
    *,
    sha256: str | None = _DEFAULT,  # type: ignore[assignment]
    with_structures: bool = False,
    timeout: float = 300.0,
    duplicates: str = "keep",
    max_bytes: int = MAX_FILE_BYTES,
) -> BandGapData:
    """Load Matbench v0.1 ``matbench_mp_gap`` (106,113 Materials Project PBE gaps).

    Same parameters as :func:`load_matbench_expt_gap` (default hash ``58b65746...`` from
    Matbench's dataset metadata). The official file is keyed by pymatgen structures; each
    becomes its reduced formula (via :mod:`ase.formula`; a formula CSV is read as written), and with
    ``with_structures=True`` also an :class:`ase.Atoms` in ``BandGapData.atoms`` (only
    possible from the JSON file, not from a formula CSV). Several polymorphs can share a
    formula, with different gaps or with the same one (metals: 0), so ``duplicates``
    defaults to ``"keep"`` here: every row is a material (in the formula CSV copy 6,260
    formulas have polymorphs with different gaps and 5,195 rows repeat an earlier
    formula and gap). Materials Project data are licensed CC BY 4.0 (Jain et al. 2013).
    """
    return _load(
        MATBENCH_MP_GAP,
        path,
        cache_dir,
        url,
        sha256,
        with_structures,
        timeout,
        duplicates,
        max_bytes,
    )


def load_matbench_expt_is_metal(
    path: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    url: str | None = None,
    *,
    sha256: str | None = _DEFAULT,  # type: ignore[assignment]
    timeout: float = 60.0,
    duplicates: str = "drop",
    max_bytes: int = MAX_FILE_BYTES,
) -> BandGapData:
    """Load Matbench v0.1 ``matbench_expt_is_metal`` (4,921 experimental metal labels).

    The classification task of Matbench built from the same experimental data as
    ``matbench_expt_gap`` (Zhuo et al. 2018): one row per composition, deduplicated by
    Matbench so that no composition is reported both metal and non-metal; target 1 for a
    metal, 0 for a non-metal (2,451 metals). Every formula of ``matbench_expt_gap`` is here,
    with target 1 exactly where its gap is 0, plus 317 more.

    Parameters
    ----------
    path
        A local copy (official ``.json.gz``/``.json``, whose ``is_metal`` column holds
        booleans, or CSV ``formula,target`` with 0/1); when given, nothing is downloaded and
        no checksum is checked.
    cache_dir, url, timeout, duplicates, max_bytes
        As :func:`load_matbench_expt_gap`.
    sha256
        Expected SHA-256 of the download; defaults to the official file's hash
        (``8f2a4f9b...``, from Matbench's dataset metadata), ``None`` skips the check.

    Returns
    -------
    BandGapData
        ``formulas`` and ``y`` (float ``1.0`` metal, ``0.0`` non-metal), in the data set's
        original order (required by Matbench's folds).

    Raises
    ------
    ValueError
        A bad file (see :func:`read_bandgap_file`), a checksum mismatch, or a target that is
        not 0 or 1.
    DownloadError
        The file could not be downloaded, or not verified (see :func:`fetch_file`).
    """
    data = _load(
        MATBENCH_EXPT_IS_METAL, path, cache_dir, url, sha256, False, timeout, duplicates, max_bytes
    )
    bad = ~np.isin(data.y, (0.0, 1.0))
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{data.source}: target {data.y[i]!r} of {data.formulas[i]} is not 0 or 1 "
            "(matbench_expt_is_metal labels metals 1 and non-metals 0)"
        )
    return data


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
