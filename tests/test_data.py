"""Tests for pcbtl.materials.data: Matbench loaders, the checksummed download cache, ase.db I/O."""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import re
import socket
import threading
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk
from shared_data import SHARED_DATA

from pcbtl.materials import data as pdata
from pcbtl.materials.data import (
    MATBENCH_EXPT_GAP,
    MATBENCH_MP_GAP,
    DownloadError,
    find_local_table,
    from_ase_db,
    load_matbench_expt_gap,
    load_matbench_mp_gap,
    read_bandgap_file,
    to_ase_db,
)

SHARED = SHARED_DATA
EXPT_CSV = SHARED / "bandgap" / "matbench_expt_gap.csv"
# from /work/shared/data/README.md (the shared CSV copy, not the official JSON)
EXPT_CSV_SHA256 = "3de82c37f1db3ab9bbd92366c96633f131913ded5db0969eb36216bdd11cef2f"


def _need_expt_csv() -> Path:
    if not EXPT_CSV.is_file():
        pytest.skip(f"shared data file {EXPT_CSV} not present (set PCBTL_SHARED_DATA)")
    return EXPT_CSV


def _csv_rows(path: Path) -> list[tuple[str, float]]:
    with open(path, newline="") as fh:
        return [(r["formula"], float(r["target"])) for r in csv.DictReader(fh)]


# ------------------------------------------------------------------------ HTTP server


class _Server:
    """Tiny HTTP server on 127.0.0.1 serving in-memory files and counting requests."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.truncate: set[str] = set()  # paths answered with a short body
        self.cut: dict[str, int] = {}  # paths answered with only their first n bytes
        self.no_length: set[str] = set()  # paths answered without Content-Length
        self.content_type: dict[str, str] = {}
        self.hits: dict[str, int] = {}
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                outer.hits[self.path] = outer.hits.get(self.path, 0) + 1
                body = outer.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                ctype = outer.content_type.get(self.path, "application/octet-stream")
                self.send_header("Content-Type", ctype)
                if self.path not in outer.no_length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.path in outer.truncate or self.path in outer.cut:
                    self.wfile.write(body[: outer.cut.get(self.path, len(body) // 2)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def url(self, path: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}{path}"


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    srv.thread.start()
    try:
        yield srv
    finally:
        srv.httpd.shutdown()
        srv.httpd.server_close()
        srv.thread.join(timeout=5)


def _cache_listing(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


# ------------------------------------------------------------------- official metadata


def test_official_addresses_and_hashes() -> None:
    for info, n in ((MATBENCH_EXPT_GAP, 4604), (MATBENCH_MP_GAP, 106113)):
        assert info.url == f"https://ml.materialsproject.org/projects/{info.name}.json.gz"
        assert len(info.sha256) == 64 and int(info.sha256, 16) >= 0
        assert info.n_rows == n


# ----------------------------------------------------------------------- downloading


def test_download_right_checksum_loads_and_caches(server: _Server, tmp_path: Path) -> None:
    src = _need_expt_csv()
    payload = src.read_bytes()
    assert hashlib.sha256(payload).hexdigest() == EXPT_CSV_SHA256
    server.files["/matbench_expt_gap.csv"] = payload
    url = server.url("/matbench_expt_gap.csv")
    cache = tmp_path / "cache"

    d1 = load_matbench_expt_gap(cache_dir=cache, url=url, sha256=EXPT_CSV_SHA256)
    rows = _csv_rows(src)
    assert len(d1) == len(rows) == 4604
    assert d1.formulas == [f for f, _ in rows]
    np.testing.assert_array_equal(d1.y, [y for _, y in rows])
    assert d1.name == "matbench_expt_gap"
    assert _cache_listing(cache) == ["matbench_expt_gap.csv"]
    assert (cache / "matbench_expt_gap.csv").read_bytes() == payload
    assert server.hits["/matbench_expt_gap.csv"] == 1

    d2 = load_matbench_expt_gap(cache_dir=cache, url=url, sha256=EXPT_CSV_SHA256)
    assert server.hits["/matbench_expt_gap.csv"] == 1  # served from the cache
    assert d2.formulas == d1.formulas


def test_cache_dir_from_environment(
    server: _Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = b"formula,target\nNaCl,8.5\nSi,1.12\n"
    server.files["/tiny.csv"] = body
    monkeypatch.setenv("PCBTL_CACHE_DIR", str(tmp_path / "envcache"))
    assert pdata.default_cache_dir() == tmp_path / "envcache"
    d = load_matbench_expt_gap(url=server.url("/tiny.csv"), sha256=hashlib.sha256(body).hexdigest())
    assert d.formulas == ["NaCl", "Si"] and d.y.tolist() == [8.5, 1.12]
    assert (tmp_path / "envcache" / "tiny.csv").is_file()


def test_wrong_checksum_raises_and_leaves_nothing(server: _Server, tmp_path: Path) -> None:
    server.files["/matbench_expt_gap.csv"] = b"formula,target\nNaCl,8.5\n"
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="checksum"):
        load_matbench_expt_gap(
            cache_dir=cache, url=server.url("/matbench_expt_gap.csv"), sha256="0" * 64
        )
    assert _cache_listing(cache) == []


def test_default_checksum_is_the_official_one(server: _Server, tmp_path: Path) -> None:
    # a file that is not the official one must be refused when no sha256 is given
    server.files["/matbench_expt_gap.json.gz"] = gzip.compress(b'{"columns": [], "data": []}')
    with pytest.raises(ValueError, match=MATBENCH_EXPT_GAP.sha256):
        load_matbench_expt_gap(cache_dir=tmp_path, url=server.url("/matbench_expt_gap.json.gz"))
    assert _cache_listing(tmp_path) == []


def test_corrupt_cached_file_is_replaced(server: _Server, tmp_path: Path) -> None:
    body = b"formula,target\nGaAs,1.42\n"
    server.files["/x.csv"] = body
    (tmp_path / "x.csv").write_bytes(b"formula,target\nGaAs,99\n")  # stale/corrupt copy
    d = load_matbench_expt_gap(
        cache_dir=tmp_path, url=server.url("/x.csv"), sha256=hashlib.sha256(body).hexdigest()
    )
    assert d.y.tolist() == [1.42]
    assert server.hits["/x.csv"] == 1
    assert (tmp_path / "x.csv").read_bytes() == body


def test_interrupted_transfer_leaves_no_half_file(server: _Server, tmp_path: Path) -> None:
    body = b"formula,target\n" + b"".join(b"NaCl,%d\n" % i for i in range(5000))
    server.files["/cut.csv"] = body
    server.truncate.add("/cut.csv")
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="incomplete"):
        load_matbench_expt_gap(cache_dir=cache, url=server.url("/cut.csv"), sha256=None)
    assert _cache_listing(cache) == []


def _expt_json_gz(rows: list[tuple[str, float]]) -> bytes:
    doc = {
        "index": list(range(len(rows))),
        "columns": ["composition", "gap expt"],
        "data": [[f, y] for f, y in rows],
    }
    return gzip.compress(json.dumps(doc).encode())


_SMALL_CSV = b"formula,target\n" + b"".join(b"Na%dCl,%d.25\n" % (i, i) for i in range(1, 3000))


@pytest.mark.parametrize("kind", ["gzip", "csv"])
def test_cut_transfer_without_length_or_checksum_is_not_kept(
    server: _Server, tmp_path: Path, kind: str
) -> None:
    # no Content-Length and no checksum: only the file's own format can tell a cut transfer
    if kind == "gzip":
        path, body = "/matbench_expt_gap.json.gz", _expt_json_gz([("NaCl", 8.5)] * 2000)
        cut = len(body) // 2
    else:
        path, body = "/cut.csv", _SMALL_CSV
        cut = body.index(b"Na1500Cl,") + len(b"Na1500Cl,")  # the last row lost its target
    server.files[path] = body
    server.cut[path] = cut
    server.no_length.add(path)
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="cut short"):
        load_matbench_expt_gap(cache_dir=cache, url=server.url(path), sha256=None)
    assert _cache_listing(cache) == []


@pytest.mark.parametrize("ctype", ["text/html; charset=utf-8", "application/octet-stream"])
def test_html_page_is_never_cached(server: _Server, tmp_path: Path, ctype: str) -> None:
    # a login wall / rate-limit page answered with 200 and a correct Content-Length
    page = b"\n<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>...</body></html>"
    server.files["/matbench_expt_gap.json.gz"] = page
    server.content_type["/matbench_expt_gap.json.gz"] = ctype
    url = server.url("/matbench_expt_gap.json.gz")
    cache = tmp_path / "cache"
    for _ in range(2):  # and the next call asks the server again
        with pytest.raises(DownloadError, match="HTML page"):
            load_matbench_expt_gap(cache_dir=cache, url=url, sha256=None)
        assert _cache_listing(cache) == []
    assert server.hits["/matbench_expt_gap.json.gz"] == 2


def test_complete_file_without_length_or_checksum_is_kept(server: _Server, tmp_path: Path) -> None:
    server.files["/whole.csv"] = _SMALL_CSV
    server.no_length.add("/whole.csv")
    cache = tmp_path / "cache"
    d = load_matbench_expt_gap(cache_dir=cache, url=server.url("/whole.csv"), sha256=None)
    assert len(d) == 2999 and d.y[-1] == 2999.25
    assert _cache_listing(cache) == ["whole.csv"]
    load_matbench_expt_gap(cache_dir=cache, url=server.url("/whole.csv"), sha256=None)
    assert server.hits["/whole.csv"] == 1


def test_http_error_is_reported(server: _Server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="path="):
        load_matbench_expt_gap(cache_dir=tmp_path, url=server.url("/nope.json.gz"))
    assert _cache_listing(tmp_path) == []


def test_offline_without_cache_names_file_and_path_option(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/matbench_mp_gap.json.gz"
    with pytest.raises(DownloadError) as info:
        load_matbench_mp_gap(cache_dir=tmp_path, url=url, timeout=5)
    msg = str(info.value)
    assert "matbench_mp_gap.json.gz" in msg and "path=" in msg
    assert _cache_listing(tmp_path) == []


# ------------------------------------------------------------------ reading local files


def _pymatgen_dict(atoms: Atoms) -> dict:
    """A pymatgen ``Structure.as_dict()``-shaped dictionary written by hand."""
    return {
        "@module": "pymatgen.core.structure",
        "@class": "Structure",
        "charge": 0,
        "lattice": {"matrix": atoms.cell.array.tolist(), "pbc": [True, True, True]},
        "sites": [
            {
                "species": [{"element": s, "occu": 1}],
                "abc": list(map(float, f)),
                "xyz": list(map(float, x)),
                "label": s,
                "properties": {},
            }
            for s, f, x in zip(
                atoms.get_chemical_symbols(),
                atoms.get_scaled_positions(),
                atoms.positions,
                strict=True,
            )
        ],
    }


def test_official_json_layout_composition(tmp_path: Path, server: _Server) -> None:
    src = _need_expt_csv()
    rows = _csv_rows(src)[:300]
    doc = {
        "index": list(range(len(rows))),
        "columns": ["composition", "gap expt"],
        "data": [[f, y] for f, y in rows],
    }
    gz = gzip.compress(json.dumps(doc).encode())
    path = tmp_path / "matbench_expt_gap.json.gz"
    path.write_bytes(gz)
    d = load_matbench_expt_gap(path=path)
    assert d.formulas == [f for f, _ in rows]
    np.testing.assert_array_equal(d.y, [y for _, y in rows])
    # the same file via the download path (cached under the official file name)
    server.files["/projects/matbench_expt_gap.json.gz"] = gz
    cache = tmp_path / "cache"
    d2 = load_matbench_expt_gap(
        cache_dir=cache,
        url=server.url("/projects/matbench_expt_gap.json.gz"),
        sha256=hashlib.sha256(gz).hexdigest(),
    )
    assert d2.formulas == d.formulas
    assert _cache_listing(cache) == ["matbench_expt_gap.json.gz"]


def test_official_json_layout_structures(tmp_path: Path) -> None:
    crystals = [
        bulk("Si", "diamond", a=5.431),
        bulk("NaCl", "rocksalt", a=5.64).repeat((2, 1, 1)),
        bulk("Cu", "fcc", a=3.615, cubic=True),
    ]
    gaps = [0.6, 5.0, 0.0]
    doc = {
        "index": [0, 1, 2],
        "columns": ["structure", "gap pbe"],
        "data": [[_pymatgen_dict(a), g] for a, g in zip(crystals, gaps, strict=True)],
    }
    path = tmp_path / "mp.json"  # not compressed: also accepted
    path.write_text(json.dumps(doc))
    d = load_matbench_mp_gap(path=path, with_structures=True)
    assert d.formulas == ["Si", "NaCl", "Cu"]  # reduced formulas
    np.testing.assert_array_equal(d.y, gaps)
    assert d.atoms is not None
    for a, b in zip(d.atoms, crystals, strict=True):
        assert a.get_chemical_symbols() == b.get_chemical_symbols()
        np.testing.assert_allclose(a.cell.array, b.cell.array)
        np.testing.assert_allclose(a.positions, b.positions)
        assert a.pbc.all()
    assert load_matbench_mp_gap(path=path).atoms is None


def test_partial_occupancy_formula(tmp_path: Path) -> None:
    atoms = bulk("Cu", "fcc", a=3.6)
    sd = _pymatgen_dict(atoms)
    sd["sites"][0]["species"] = [{"element": "Cu", "occu": 0.75}, {"element": "Au", "occu": 0.25}]
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"columns": ["structure", "gap pbe"], "data": [[sd, 0.0]]}))
    assert read_bandgap_file(path).formulas == ["Cu0.75Au0.25"]


def test_bad_local_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_matbench_expt_gap(path=tmp_path / "missing.csv")
    p = tmp_path / "bad.csv"
    p.write_text("name,value\nNaCl,1\n")
    with pytest.raises(ValueError, match="formula"):
        load_matbench_expt_gap(path=p)
    q = tmp_path / "ok.csv"
    q.write_text("formula,target\nNaCl,1\n")
    with pytest.raises(ValueError, match="structures"):
        load_matbench_mp_gap(path=q, with_structures=True)


def test_find_local_table_order_and_error(tmp_path: Path) -> None:
    """The folder itself before its bandgap/ and metallicity/ folders, CSV before JSON; a
    missing table names the folder."""
    (tmp_path / "bandgap").mkdir()
    (tmp_path / "metallicity").mkdir()
    nested = tmp_path / "metallicity" / "matbench_expt_is_metal.csv"
    nested.write_text("formula,target\nCu,1\n")
    assert find_local_table(tmp_path, "matbench_expt_is_metal") == nested
    gz = tmp_path / "bandgap" / "matbench_expt_is_metal.json.gz"
    gz.write_bytes(b"")
    assert find_local_table(tmp_path, "matbench_expt_is_metal") == gz
    top_json = tmp_path / "matbench_expt_is_metal.json"
    top_json.write_text("{}")
    assert find_local_table(tmp_path, "matbench_expt_is_metal") == top_json
    top_csv = tmp_path / "matbench_expt_is_metal.csv"
    top_csv.write_text("formula,target\nCu,1\n")
    assert find_local_table(tmp_path, "matbench_expt_is_metal") == top_csv
    assert find_local_table(None, "matbench_mp_gap") is None  # no folder: the loaders download
    with pytest.raises(
        FileNotFoundError, match=r"no matbench_mp_gap\.csv.*in " + re.escape(str(tmp_path))
    ):
        find_local_table(tmp_path, "matbench_mp_gap")


_JSON_HEAD = '{"columns": ["composition", "gap expt"], "data": '

_BAD_FILES = [
    # (case, file name, content, where the message must point)
    ("empty-target", "a.csv", b"formula,target\nNaCl,8.5\nGaAs,", "line 3"),
    ("missing-target", "b.csv", b"formula,target\nNaCl,8.5\nGa", "line 3"),
    ("text-target", "c.csv", b"formula,target\nNaCl,8.5\nSi,one\n", "line 3"),
    ("empty-formula", "d.csv", b"formula,target\n,1.0\n", "line 2"),
    ("extra-field", "e.csv", b"formula,target\nNaCl,8.5,7\n", "line 2"),
    ("not-utf8", "f.csv", "formula,target\nNaCl,8.5\nCaé,2\n".encode("latin-1"), "line 3"),
    ("cut-gzip", "g.json.gz", _expt_json_gz([("NaCl", 8.5)] * 500)[:300], "truncated"),
    (
        "null-target",
        "h.json",
        (_JSON_HEAD + '[["NaCl", 8.5], ["GaAs", null]]}').encode(),
        r"data\[1\]",
    ),
    ("short-row", "i.json", (_JSON_HEAD + '[["NaCl", 8.5], ["GaAs"]]}').encode(), r"data\[1\]"),
    ("number-formula", "j.json", (_JSON_HEAD + "[[7, 8.5]]}").encode(), r"data\[0\]"),
    ("json-syntax", "k.json", (_JSON_HEAD + '[["NaCl", 8.5],\n ["GaAs" 1.4]]}').encode(), "line 2"),
    ("deep-json", "l.json", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    (
        "bad-structure",
        "m.json",
        b'{"columns": ["structure", "gap pbe"], "data": [[{"sites": [{}]}, 0.0]]}',
        r"data\[0\]",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "where"),
    [case[1:] for case in _BAD_FILES],
    ids=[case[0] for case in _BAD_FILES],
)
def test_bad_rows_raise_value_error_naming_file_and_row(
    tmp_path: Path, name: str, content: bytes, where: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        load_matbench_expt_gap(path=path)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert re.search(where, msg), msg


@pytest.mark.parametrize("value", [b"nan", b"NaN", b"inf", b"-inf", b"1e999", b"-1E400"])
def test_non_finite_targets_are_rejected(tmp_path: Path, value: bytes) -> None:
    path = tmp_path / "nonfinite.csv"
    path.write_bytes(b"formula,target\nNaCl,8.5\nSi," + value + b"\nGaAs,1.4\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*line 3.*finite"):
        read_bandgap_file(path)
    js = tmp_path / "nonfinite.json"
    token = {b"nan": b"NaN", b"inf": b"Infinity", b"-inf": b"-Infinity"}.get(value.lower(), value)
    js.write_bytes(_JSON_HEAD.encode() + b'[["NaCl", 8.5], ["Si", ' + token + b"]]}")
    with pytest.raises(ValueError, match=rf"{re.escape(str(js))}.*data\[1\].*finite"):
        read_bandgap_file(js)


_DUPLICATES = b"formula,target\nNaCl,8.5\nSi,1.1\nNaCl,8.5\nSi,1.2\nNaCl,8.50\nGaAs,1.4\n"


def test_duplicate_rows_dropped_with_a_warning_conflicts_kept(tmp_path: Path) -> None:
    path = tmp_path / "dups.csv"
    path.write_bytes(_DUPLICATES)
    with pytest.warns(pdata.DuplicateRowsWarning) as record:
        d = load_matbench_expt_gap(path=path)
    assert len(record) == 1
    msg = str(record[0].message)
    assert str(path) in msg and "2 exact duplicate rows dropped" in msg and "line 4" in msg
    assert "1 formula with conflicting targets" in msg and "Si" in msg
    assert d.formulas == ["NaCl", "Si", "Si", "GaAs"]  # first occurrences, in file order
    assert d.y.tolist() == [8.5, 1.1, 1.2, 1.4]

    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*line 4.*line 2"):
        read_bandgap_file(path, duplicates="error")
    kept = read_bandgap_file(path, duplicates="keep")  # no warning (warnings are errors here)
    assert len(kept) == 6
    with pytest.raises(ValueError, match="duplicates"):
        read_bandgap_file(path, duplicates="average")


def test_conflicting_rows_alone_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "conflict.json"
    path.write_text(_JSON_HEAD + '[["Si", 1.1], ["GaAs", 1.4], ["Si", 0.6]]}')
    with pytest.warns(pdata.DuplicateRowsWarning, match="conflicting") as record:
        d = read_bandgap_file(path)
    assert "exact duplicate" not in str(record[0].message)
    assert d.formulas == ["Si", "GaAs", "Si"]


def test_mp_gap_keeps_polymorphs_sharing_a_formula(tmp_path: Path) -> None:
    # mp_gap rows are crystal structures: polymorphs share a formula (and metals a gap of 0)
    path = tmp_path / "mp.csv"
    path.write_text("formula,target\nTiO2,1.8\nTiO2,2.1\nFe,0\nFe,0\n")
    d = load_matbench_mp_gap(path=path)
    assert d.formulas == ["TiO2", "TiO2", "Fe", "Fe"]
    with pytest.warns(pdata.DuplicateRowsWarning):
        assert len(load_matbench_mp_gap(path=path, duplicates="drop")) == 3


def test_gzip_bomb_stops_at_the_size_limit(tmp_path: Path) -> None:
    assert pdata.MAX_FILE_BYTES == 2 * 1024**3
    bomb = tmp_path / "bomb.json.gz"
    bomb.write_bytes(gzip.compress(b"formula,target\n" + b" " * (24 << 20), compresslevel=1))
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"{re.escape(str(bomb))}.*1048576 bytes"):
            load_matbench_expt_gap(path=bomb, max_bytes=1 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # streamed: never inflated to its 24 MiB
    plain = tmp_path / "big.csv"
    plain.write_bytes(b"formula,target\n" + b"NaCl,1\n" * 200_000)
    with pytest.raises(ValueError, match="max_bytes"):
        read_bandgap_file(plain, max_bytes=1 << 20)
    with pytest.raises(ValueError, match="max_bytes"):
        read_bandgap_file(plain, max_bytes=0)


# ---------------------------------------------------------------------------- ase.db


def test_ase_db_round_trip_sqlite(tmp_path: Path) -> None:
    formulas = ["NaCl", "Si", "Fe2O3", "Ag0.5Ge1Pb1.75S4", "Cu"]
    y_s = [5.0, 0.6, float("nan"), 1.2, 0.0]
    y_t = [8.5, 1.1, 2.2, None, 0.0]
    split = ["train", "test", None, "train", "test"]
    atoms = [bulk("NaCl", "rocksalt", a=5.64), bulk("Si", "diamond", a=5.431), None, None, None]
    path = tmp_path / "gaps.db"
    ids = to_ase_db(path, formulas, y_s, y_t, split, atoms, dataset="demo")
    assert len(ids) == 5 and len(set(ids)) == 5

    back = from_ase_db(path)
    assert back.ids == ids
    assert back.formulas == formulas
    np.testing.assert_array_equal(back.y_source, [5.0, 0.6, np.nan, 1.2, 0.0])
    np.testing.assert_array_equal(back.y_target, [8.5, 1.1, 2.2, np.nan, 0.0])
    assert back.split == split
    assert back.atoms[2] is None and back.atoms[3] is None
    for k in (0, 1):
        got = back.atoms[k]
        assert got is not None
        assert got.get_chemical_symbols() == atoms[k].get_chemical_symbols()
        np.testing.assert_allclose(got.positions, atoms[k].positions)
        np.testing.assert_allclose(got.cell.array, atoms[k].cell.array)

    # queryable and extendable with plain ase.db
    import ase.db

    db = ase.db.connect(path)
    assert db.count(split="train") == 2
    assert {r.composition for r in db.select(split="test")} == {"Si", "Cu"}
    test_rows = from_ase_db(path, split="test")
    assert test_rows.formulas == ["Si", "Cu"]
    db.write(bulk("Al", "fcc", a=4.05), y_target=0.0, split="test")  # no composition key
    ext = from_ase_db(db, split="test")
    assert ext.formulas == ["Si", "Cu", "Al"] and math.isnan(ext.y_source[-1])
    assert from_ase_db(path, dataset="demo").ids == ids


def test_ase_db_bulk_real_data(tmp_path: Path) -> None:
    rows = _csv_rows(_need_expt_csv())
    formulas = [f for f, _ in rows]
    y = np.array([g for _, g in rows])
    split = ["train" if i % 5 else "test" for i in range(len(rows))]
    path = tmp_path / "expt.db"
    to_ase_db(path, formulas, y_target=y, split=split, dataset="matbench_expt_gap")
    back = from_ase_db(path)
    assert back.formulas == formulas
    np.testing.assert_array_equal(back.y_target, y)
    assert np.isnan(back.y_source).all()
    assert back.split == split
    assert from_ase_db(path, split="test").formulas == formulas[::5]


def test_ase_db_other_backend_json(tmp_path: Path) -> None:
    path = tmp_path / "small.json"  # ase.db picks its JSON backend from the name
    to_ase_db(path, ["GaAs", "ZnO"], y_source=[0.5, 0.7], split=["a", "b"])
    back = from_ase_db(path)
    assert back.formulas == ["GaAs", "ZnO"] and back.y_source.tolist() == [0.5, 0.7]
    assert back.atoms == [None, None]


def test_ase_db_length_mismatch(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="y_target"):
        to_ase_db(tmp_path / "x.db", ["NaCl", "Si"], y_target=[1.0])
