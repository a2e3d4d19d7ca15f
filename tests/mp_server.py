"""A loopback Materials Project API for tests: the real ``mp-api`` client talks to it over HTTP.

It serves exactly the routes ``cmma fetch --source mp`` makes the client call, in the shapes the real
API (emmet-api on maggma) returns, built from the real data in ``../shared/data``:

``GET /heartbeat``
    ``{"status", "time", "version", "db_version", "access_controlled_batch_ids", ...}`` (no key needed).
``GET /materials/summary/``
    ``SummaryDoc``-shaped documents made from ``mp20/mp20_sample.csv``: the CIF as a pymatgen
    ``Structure.as_dict()``, the table's energies and band gap, symmetry computed with pymatgen
    (symprec 0.1, as the Materials Project does). Filters ``material_ids``, ``elements``,
    ``exclude_elements``, ``chemsys``, ``formula``, ``nsites_min/max``, ``is_stable``, ``deprecated``,
    ``energy_above_hull_min/max``, ``band_gap_min/max``; sparse fields ``_fields`` / ``_all_fields``
    (default ``material_id``); paging ``_skip``/``_limit`` (default 100, at most 1000) or
    ``_page``/``_per_page``.
``GET /materials/synthesis/``
    Recipes from ``synthesis/solid-state_dataset_2019-12-03.json.xz`` whose targets share a reduced
    formula with a served material, in the synthesis endpoint's layout (``synthesis_type``,
    ``targets_formula_s``, ``precursors_formula_s`` added, the endpoint's projection, paragraphs cut to
    100 characters as the API does). Filters ``target_formula``, ``precursor_formula``,
    ``synthesis_type``, ``operations`` and ``keywords`` (all words in the paragraph: a stand-in for the
    API's Atlas text search); ``_skip``/``_limit`` (default 10).
``GET /materials/robocrys/``
    Robocrystallographer documents from ``tests/fixtures/mp_robocrys.json`` (real robocrys 0.2.13
    output for some served structures), by ``material_ids``, with sparse fields and paging.

Anything else is a 404, and a query parameter the server does not emulate is a 400, so a client
change that the tests do not cover fails loudly instead of being silently ignored. Every request is
logged (:attr:`LoopbackMP.requests`) so tests can count them, and failures can be injected per route
(:meth:`LoopbackMP.fail`) on the k-th request: an HTTP status (with any body, content type and headers,
e.g. ``Retry-After``; a 200 with an HTML page or broken JSON is what a proxy may send), a dropped
connection (:data:`DROP`), the real answer cut short (:data:`TRUNCATE`), or no answer at all
(:data:`HANG`: the connection stays open, silent, until :meth:`LoopbackMP.heal` (then the real answer comes),
:meth:`LoopbackMP.stop` or :data:`HANG_LIMIT_S` (then the connection closes)).
"""

from __future__ import annotations

import json
import lzma
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pandas as pd

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MP20_CSV = DATA / "mp20" / "mp20_sample.csv"
SOLID_STATE_JSON = DATA / "synthesis" / "solid-state_dataset_2019-12-03.json.xz"
ROBOCRYS_FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mp_robocrys.json"

#: The one key the server accepts (keys are 32 characters; mp-api rejects any other length itself).
TEST_API_KEY = "cmmaLoopbackTestKey0123456789abc"
DB_VERSION = "2025.06.09"
MAX_LIMIT = 1000
SYMPREC = 0.1

ROUTES = {
    "/heartbeat": "heartbeat",
    "/materials/summary/": "summary",
    "/materials/synthesis/": "synthesis",
    "/materials/robocrys/": "robocrys",
}

#: Fields the synthesis endpoint projects (emmet-api SynthesisSearchQuery).
SYNTHESIS_PROJECTION = [
    "doi", "synthesis_type", "reaction", "reaction_string", "operations", "target", "targets_formula",
    "targets_formula_s", "precursors", "precursors_formula_s", "paragraph_string",
]


# ------------------------------------------------------------------------------------------ content


@dataclass
class MPContent:
    """What the server serves: summary, synthesis and robocrys documents (JSON-ready dicts)."""

    summary: list[dict[str, Any]]
    synthesis: list[dict[str, Any]]
    robocrys: list[dict[str, Any]]
    table: pd.DataFrame  # the mp20 rows behind ``summary`` (for expected values in tests)


def _reduced(formula: str | None, cache: dict[str, str | None]) -> str | None:
    if formula not in cache:
        from cmma_cli.sources.recipes import reduced_formula

        cache[formula] = reduced_formula(formula)
    return cache[formula]


def _target_element_sets(record: dict[str, Any]) -> set[frozenset[str]]:
    """Element sets of the recipe's targets, read without parsing formulas (a cheap pre-filter)."""
    target = record.get("target") or {}
    sets = {frozenset(el for comp in target.get("composition") or [] for el in (comp.get("elements") or {}))}
    sets.update(frozenset(re.findall(r"[A-Z][a-z]?", t)) for t in record.get("targets_string") or [])
    return sets


def select_rows(table: pd.DataFrame, recipes: list[dict[str, Any]], n: int) -> pd.DataFrame:
    """The served mp20 rows: every row a recipe targets (by formula or id), then the first rows, ``n`` in all."""
    from pymatgen.core import Composition

    reduced = table["pretty_formula"].map(lambda f: Composition(f).reduced_formula)
    element_sets = {frozenset(Composition(f).chemical_system.split("-")) for f in reduced}
    cache: dict[str, str | None] = {}
    recipe_formulas: set[str] = set()
    recipe_ids: set[str] = set()
    for r in recipes:
        target = r.get("target") or {}
        if target.get("mp_id"):
            recipe_ids.add(target["mp_id"])
        if _target_element_sets(r) & element_sets:
            recipe_formulas.add(_reduced(target.get("material_formula"), cache))
    wanted = reduced.isin(recipe_formulas) | table["material_id"].isin(recipe_ids)
    chosen = table[wanted]
    rest = table[~wanted].head(max(0, n - len(chosen)))
    return pd.concat([chosen, rest]).sort_index().reset_index(drop=True)


def summary_doc(row: pd.Series) -> dict[str, Any]:
    """A ``SummaryDoc``-shaped document for one mp20 row."""
    import spglib
    from monty.json import jsanitize
    from pymatgen.core import Structure
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # CIF rounding notes and spglib's deprecation notice
        s = Structure.from_str(row["cif"], fmt="cif")
        sga = SpacegroupAnalyzer(s, symprec=SYMPREC)
        symmetry = {
            "crystal_system": sga.get_crystal_system().capitalize(),
            "symbol": sga.get_space_group_symbol(),
            "hall": sga.get_hall(),
            "number": sga.get_space_group_number(),
            "point_group": sga.get_point_group_symbol(),
            "symprec": SYMPREC,
            "angle_tolerance": 5.0,
            "version": spglib.__version__,
        }
    comp = s.composition
    e_hull = float(row["e_above_hull"])
    gap = float(row["band_gap"])
    doc = {
        "material_id": row["material_id"],
        "formula_pretty": comp.reduced_formula,
        "formula_anonymous": comp.anonymized_formula,
        "chemsys": comp.chemical_system,
        "elements": sorted(el.symbol for el in comp.elements),
        "nelements": len(comp.elements),
        "nsites": len(s),
        "composition": comp.as_dict(),
        "composition_reduced": comp.reduced_composition.as_dict(),
        "volume": s.volume,
        "density": float(s.density),
        "density_atomic": s.volume / len(s),
        "symmetry": symmetry,
        "structure": s.as_dict(),
        "formation_energy_per_atom": float(row["formation_energy_per_atom"]),
        "energy_above_hull": e_hull,
        "is_stable": e_hull <= 0.0,
        "band_gap": gap,
        "is_metal": gap == 0.0,  # the table has no band structures; a zero gap is how MP labels metals
        "bulk_modulus": None,  # mp20 carries no elastic data (most MP materials have none either)
        "shear_modulus": None,
        "deprecated": False,
        "theoretical": False,
        "last_updated": "2025-06-09T00:00:00",
    }
    return jsanitize(doc, strict=False)


#: The 2019 text-mined dataset's operation types -> emmet-core's OperationTypeEnum (what the endpoint serves).
OPERATION_TYPES = {"Mixing": "MixingOperation", "LiquidGrinding": "MixingOperation", "SolutionMixing": "MixingOperation"}


def _operation(op: dict[str, Any]) -> dict[str, Any]:
    """One operation in emmet-core's ``Operation`` layout (typed enum, conditions always a dict)."""
    cond = op.get("conditions") or {}

    def joined(values: list[str] | None) -> str | None:
        return ", ".join(values) if values else None

    return {
        "type": OPERATION_TYPES.get(op.get("type"), op.get("type")),
        "token": op.get("token") or "",
        "conditions": {
            "heating_temperature": cond.get("heating_temperature") or [],
            "heating_time": cond.get("heating_time") or [],
            "heating_atmosphere": cond.get("heating_atmosphere") or [],
            "mixing_device": joined(cond.get("mixing_device")),
            "mixing_media": joined(cond.get("mixing_media")),
        },
    }


def synthesis_doc(record: dict[str, Any], cache: dict[str, str | None]) -> dict[str, Any]:
    """A text-mined recipe in the synthesis endpoint's stored layout.

    The endpoint serves emmet-core ``SynthesisSearchResultModel`` documents: the same record with
    ``synthesis_type``, the formula index fields (``targets_formula``, ``targets_formula_s``,
    ``precursors_formula_s``) and operations typed by ``OperationTypeEnum``. The target keeps its
    ``mp_id`` as the text-mined dataset gives it.
    """
    target = record.get("target") or {}
    targets = [target.get("material_formula"), *(record.get("targets_string") or [])]
    doc = dict(record)
    doc["synthesis_type"] = record.get("synthesis_type") or "solid-state"
    doc["operations"] = [_operation(op) for op in record.get("operations") or []]
    doc["targets_formula"] = sorted({t for t in targets if t})
    doc["targets_formula_s"] = sorted({r for t in targets if (r := _reduced(t, cache))})
    precursors = [p.get("material_formula") for p in record.get("precursors") or []]
    doc["precursors_formula_s"] = sorted({r for p in precursors if (r := _reduced(p, cache))})
    return doc


def build_content(n_materials: int = 200) -> MPContent:
    """Build the served documents from ../shared/data (a few seconds: the recipe file is 85 MB of JSON)."""
    from pymatgen.core import Composition

    table = pd.read_csv(MP20_CSV)
    with lzma.open(SOLID_STATE_JSON) as fh:
        recipes = json.loads(fh.read())["reactions"]
    rows = select_rows(table, recipes, n_materials)
    summary = [summary_doc(row) for _, row in rows.iterrows()]
    formulas = {Composition(f).reduced_formula for f in rows["pretty_formula"]}
    cache: dict[str, str | None] = {}
    element_sets = {frozenset(f.split("-")) for f in (d["chemsys"] for d in summary)}
    synthesis = []
    for r in recipes:
        if not _target_element_sets(r) & element_sets:  # cannot share a formula with a served material
            continue
        doc = synthesis_doc(r, cache)
        if formulas.intersection(doc["targets_formula_s"]):
            synthesis.append(doc)
    served = set(rows["material_id"])
    robocrys = [d for d in json.loads(ROBOCRYS_FIXTURE.read_text())["docs"] if d["material_id"] in served]
    return MPContent(summary=summary, synthesis=synthesis, robocrys=robocrys, table=rows)


# ------------------------------------------------------------------------------------------- server


class QueryError(Exception):
    """A request the real API would refuse with HTTP 400."""


@dataclass
class Request:
    route: str
    path: str
    params: dict[str, list[str]]
    api_key: str | None


#: Special "statuses" for :meth:`LoopbackMP.fail`: drop the connection without answering; send the real
#: answer's headers and only half of its body, then close; accept the request and never answer.
DROP = 0
TRUNCATE = -1
HANG = -2
#: A hanging request gives up by itself after this long (so no test thread outlives its test by much).
HANG_LIMIT_S = 30.0


@dataclass
class Failure:
    route: str
    status: int  # an HTTP status, or DROP / TRUNCATE / HANG
    first: int  # 1-based number of the first request to that route that fails
    count: int | None  # how many fail (None: all from ``first`` on)
    body: bytes | None = None  # the body to send (default: a JSON {"detail": ...})
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)  # extra headers, e.g. {"Retry-After": "3600"}

    def hits(self, n: int) -> bool:
        return n >= self.first and (self.count is None or n < self.first + self.count)


@dataclass
class LoopbackMP:
    """A Materials Project–shaped HTTP server on 127.0.0.1 in a background thread."""

    content: MPContent
    api_key: str = TEST_API_KEY
    requests: list[Request] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._release = threading.Event()  # set to end the requests that HANG

    # -- lifecycle
    def start(self) -> LoopbackMP:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms delayed-ACK stall)

            def do_GET(self) -> None:  # http.server's naming
                server._handle(self)

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                return

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._release.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/"

    # -- test controls
    def fail(
        self,
        route: str,
        status: int,
        first: int = 1,
        count: int | None = 1,
        *,
        body: str | bytes | None = None,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Make requests ``first``..``first+count-1`` to ``route`` fail with ``status``.

        ``status`` is an HTTP status (sent with ``body``, default a JSON ``{"detail": ...}``, ``content_type``
        and ``headers``; a 200 with an HTML ``body`` is a proxy's page), or :data:`DROP`, :data:`TRUNCATE` or
        :data:`HANG`."""
        if route not in ROUTES.values():
            raise ValueError(f"unknown route {route!r}")
        blob = body.encode() if isinstance(body, str) else body
        with self._lock:
            self.failures.append(Failure(route, status, first, count, blob, content_type, dict(headers or {})))

    def heal(self) -> None:
        """Remove every injected failure, and end the requests that hang."""
        with self._lock:
            self.failures.clear()
            self._release.set()
            self._release = threading.Event()

    def count(self, route: str) -> int:
        """How many requests reached ``route`` so far."""
        with self._lock:
            return sum(r.route == route for r in self.requests)

    def routed(self, route: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.route == route]

    def reset_log(self) -> None:
        """Forget the requests so far (injected failures then count requests from here on)."""
        with self._lock:
            self.requests.clear()

    # -- handling
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        route = ROUTES.get(parts.path, "other")
        params = parse_qs(parts.query, keep_blank_values=True)
        with self._lock:
            self.requests.append(Request(route, parts.path, params, h.headers.get("x-api-key")))
            n = sum(r.route == route for r in self.requests)
            failure = next((f for f in self.failures if f.route == route and f.hits(n)), None)
        if failure is not None and failure.status == HANG:
            healed = self._release.wait(HANG_LIMIT_S) and self._httpd is not None
            # healed: the late answer after all; stopped or too long: close without a word
            failure = None if healed else Failure(route, DROP, 1, None)
        if failure is not None and failure.status == DROP:
            h.close_connection = True
            h.connection.close()
            return
        if failure is not None and failure.status != TRUNCATE:
            body = failure.body
            if body is None:
                body = json.dumps({"detail": f"injected failure (HTTP {failure.status})"}).encode()
            return self._send_bytes(h, failure.status, body, failure.content_type, failure.headers)
        status, answer = self._answer(h, route, params)
        if failure is not None:  # TRUNCATE: announce the whole answer, send half of it, hang up
            blob = json.dumps(answer).encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(blob)))
            h.end_headers()
            h.wfile.write(blob[: len(blob) // 2])
            h.wfile.flush()
            h.close_connection = True
            h.connection.close()
            return
        self._send(h, status, answer)

    def _answer(self, h: BaseHTTPRequestHandler, route: str, params: dict[str, list[str]]) -> tuple[int, dict[str, Any]]:
        """The status and JSON body the API gives for a request."""
        if route == "other":
            return 404, {"detail": "Not Found"}
        if route == "heartbeat":
            return 200, self._heartbeat()
        if h.headers.get("x-api-key") != self.api_key:
            return 401, {"message": "Invalid authentication credentials"}
        try:
            handler: Callable[[dict[str, list[str]]], dict[str, Any]] = getattr(self, f"_{route}")
            return 200, handler(params)
        except QueryError as exc:
            return 400, {"detail": str(exc)}

    @classmethod
    def _send(cls, h: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        cls._send_bytes(h, status, json.dumps(body).encode(), "application/json", {})

    @staticmethod
    def _send_bytes(h: BaseHTTPRequestHandler, status: int, blob: bytes, content_type: str,
                    headers: dict[str, str]) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(blob)))
        for name, value in headers.items():
            h.send_header(name, value)
        h.end_headers()
        h.wfile.write(blob)

    @staticmethod
    def _heartbeat() -> dict[str, Any]:
        from emmet.core import __version__ as emmet_version
        from pymatgen.core import __version__ as pmg_version

        return {
            "status": "OK",
            "time": datetime.now(timezone.utc).isoformat(),
            "version": emmet_version,
            "pymatgen": pmg_version,
            "db_version": DB_VERSION,
            "suffix": "",
            "access_controlled_batch_ids": [],
        }

    # summary ----------------------------------------------------------------------------------
    def _summary(self, params: dict[str, list[str]]) -> dict[str, Any]:
        q = _single(params, SUMMARY_PARAMS | _PAGING | _FIELDS)
        docs = [{**d, **self.overrides.get(d["material_id"], {})} for d in self.content.summary]
        if "material_ids" in q:
            ids = {x.strip() for x in q["material_ids"].split(",")}
            docs = [d for d in docs if d["material_id"] in ids]
        if "elements" in q:
            want = set(_elements(q["elements"]))
            docs = [d for d in docs if want.issubset(d["elements"])]
        if "exclude_elements" in q:
            drop = set(_elements(q["exclude_elements"]))
            docs = [d for d in docs if not drop.intersection(d["elements"])]
        if "chemsys" in q:
            systems = {"-".join(sorted(_elements(c.replace("-", ",")))) for c in q["chemsys"].split(",")}
            docs = [d for d in docs if d["chemsys"] in systems]
        if "formula" in q:
            formulas = {_reduced_or_400(f) for f in q["formula"].split(",")}
            docs = [d for d in docs if d["formula_pretty"] in formulas]
        for key in ("nsites", "energy_above_hull", "band_gap"):
            lo, hi = _number(q, f"{key}_min"), _number(q, f"{key}_max")
            if lo is not None:
                docs = [d for d in docs if d[key] is not None and d[key] >= lo]
            if hi is not None:
                docs = [d for d in docs if d[key] is not None and d[key] <= hi]
        for key in ("is_stable", "deprecated"):
            value = _boolean(q, key)
            if value is not None:
                docs = [d for d in docs if d[key] == value]
        return _page(q, docs, default_fields=["material_id"])

    # synthesis --------------------------------------------------------------------------------
    def _synthesis(self, params: dict[str, list[str]]) -> dict[str, Any]:
        allowed = {"keywords", "synthesis_type", "target_formula", "precursor_formula", "operations", "_skip", "_limit"}
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise QueryError(f"the loopback server does not emulate synthesis parameters {unknown}")
        docs = self.content.synthesis
        if params.get("target_formula"):
            formula = _reduced_or_400(params["target_formula"][-1])
            docs = [d for d in docs if formula in d["targets_formula_s"]]
        if params.get("precursor_formula"):
            formula = _reduced_or_400(params["precursor_formula"][-1])
            docs = [d for d in docs if formula in d["precursors_formula_s"]]
        if params.get("synthesis_type"):
            types = set(params["synthesis_type"])
            docs = [d for d in docs if d["synthesis_type"] in types]
        if params.get("operations"):
            ops = set(params["operations"])
            docs = [d for d in docs if ops.issubset({o.get("type") for o in d.get("operations") or []})]
        if params.get("keywords"):
            words = [w.strip().lower() for w in params["keywords"][-1].split(",") if w.strip()]
            docs = [d for d in docs if all(w in (d.get("paragraph_string") or "").lower() for w in words)]
        skip = int(params.get("_skip", ["0"])[-1])
        limit = int(params.get("_limit", ["10"])[-1])
        page = []
        for d in docs[skip : skip + limit]:
            out = {k: d[k] for k in SYNTHESIS_PROJECTION if k in d}
            if isinstance(out.get("paragraph_string"), str):
                out["paragraph_string"] = cut_paragraph(out["paragraph_string"])
            page.append(out)
        return {"data": page, "meta": _meta(len(docs))}

    # robocrys ---------------------------------------------------------------------------------
    def _robocrys(self, params: dict[str, list[str]]) -> dict[str, Any]:
        q = _single(params, {"material_ids"} | _PAGING | _FIELDS)
        docs = self.content.robocrys
        if "material_ids" in q:
            ids = {x.strip() for x in q["material_ids"].split(",")}
            docs = [d for d in docs if d["material_id"] in ids]
        return _page(q, docs, default_fields=["material_id", "last_updated"])


SUMMARY_PARAMS = {
    "material_ids", "elements", "exclude_elements", "chemsys", "formula", "nsites_min", "nsites_max",
    "is_stable", "deprecated", "energy_above_hull_min", "energy_above_hull_max", "band_gap_min", "band_gap_max",
}
_PAGING = {"_skip", "_limit", "_page", "_per_page"}
_FIELDS = {"_fields", "_all_fields"}


def _single(params: dict[str, list[str]], allowed: set[str]) -> dict[str, str]:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise QueryError(f"the loopback server does not emulate query parameters {unknown}")
    return {k: v[-1] for k, v in params.items()}


def _elements(text: str) -> list[str]:
    from pymatgen.core import Element

    try:
        return [str(Element(e.strip())) for e in text.split(",") if e.strip()]
    except ValueError:
        raise QueryError("Please provide a comma-seperated list of elements") from None


def _reduced_or_400(formula: str) -> str:
    from cmma_cli.sources.recipes import reduced_formula

    red = reduced_formula(formula)
    if red is None:
        raise QueryError(f"invalid formula {formula!r}")
    return red


def _number(q: dict[str, str], key: str) -> float | None:
    if key not in q:
        return None
    try:
        return float(q[key])
    except ValueError:
        raise QueryError(f"{key} must be a number") from None


def _boolean(q: dict[str, str], key: str) -> bool | None:
    if key not in q:
        return None
    value = q[key].strip().lower()
    if value not in {"true", "false", "1", "0"}:
        raise QueryError(f"{key} must be a boolean")
    return value in {"true", "1"}


def _page(q: dict[str, str], docs: list[dict[str, Any]], default_fields: list[str]) -> dict[str, Any]:
    """Paging and sparse fields as emmet-api's PaginationQuery and SparseFieldsQuery do them."""
    if "_page" in q:
        per_page = int(q.get("_per_page", "100"))
        if per_page > MAX_LIMIT:
            raise QueryError(f"Requested more data per query than allowed by this endpoint. The max limit is {MAX_LIMIT} entries")
        skip, limit = (int(q["_page"]) - 1) * per_page, per_page
    else:
        skip, limit = int(q.get("_skip", "0")), int(q.get("_limit", "100"))
        if limit > MAX_LIMIT:
            raise QueryError(f"Requested more data per query than allowed by this endpoint. The max limit is {MAX_LIMIT} entries")
    if skip < 0 or limit < 0:
        raise QueryError("Cannot request negative _skip or _limit values")
    if _boolean(q, "_all_fields"):
        fields = None
    else:
        fields = [f for f in q.get("_fields", "").split(",") if f] or default_fields
    page = docs[skip : skip + limit]
    if fields is not None:
        page = [{k: d[k] for k in fields if k in d} for d in page]
    return {"data": page, "meta": _meta(len(docs))}


def _meta(total: int) -> dict[str, Any]:
    return {
        "api_version": "loopback",
        "time_stamp": datetime.now(timezone.utc).isoformat(),
        "total_doc": total,
        "max_limit": MAX_LIMIT,
    }


def cut_paragraph(text: str, limit: int = 100) -> str:
    """Cut a paragraph to ``limit`` characters at a word boundary, as the synthesis endpoint does."""
    if len(text) <= limit:
        return text
    text = text[:limit]
    trailing = re.search(r"(?<![\w\d])[\w\d]{,15}$", text)
    return text[: trailing.start()] + "..." if trailing is not None else text
