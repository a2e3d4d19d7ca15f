"""The Materials Project source (``cmma fetch --source mp``), through the official ``mp-api`` client.

What the client is asked for, and the HTTP requests it makes for it (mp-api 0.46):

1. ``MPRester(key, endpoint=...)`` calls ``GET {endpoint}heartbeat`` (the key is not sent): once for the
   emmet version check, and once for the database version (cached per endpoint for the life of the
   process). Nothing else: no MPContribs (that client is made only on
   ``mpr.contribs``), no ``~/.mprester.log.yaml`` (only with ``notify_db_version=True``), no dataset
   cache (``local_dataset_cache`` is written only by full-collection S3 downloads, which we never ask
   for; it points into the partial folder all the same).
2. The matching ids: ``materials.summary.search(<filters>, deprecated=False, fields=["material_id"])``
   -> ``GET materials/summary/?elements=..&chemsys=..&nsites_min=..&nsites_max=..&is_stable=..
   &deprecated=False&_fields=material_id&_limit=1000`` then ``&_skip=1000``, ... A query with no criterion
   and no ``num_chunks`` makes mp-api download the whole collection from S3 instead; ``deprecated=False``
   is always a criterion, and ``num_chunks`` is passed whenever there is a ``--limit``.
3. Summary documents, ``chunk_size`` ids at a time:
   ``GET materials/summary/?material_ids=mp-1,mp-2,..&_fields=<FIELDS>&_limit=<n>``.
4. Recipes: the synthesis endpoint takes one ``target_formula`` per query and at most 10 recipes a
   page, so one ``materials.synthesis.search(target_formula=F)`` per distinct reduced formula ->
   ``GET materials/synthesis/?target_formula=F&_limit=10[&_skip=10..]``. They are linked to materials
   by :func:`cmma_cli.sources.recipes.link_recipes` (by ``target.mp_id`` when the recipe names one of
   ours, else by reduced formula).
5. Descriptions: ``RobocrysRester.search`` is keyword text search only, so we use its
   ``search_docs(material_ids=...)`` -> ``GET materials/robocrys/?material_ids=..&_fields=material_id,
   description&_limit=<n>`` (the endpoint's material-id filter).

Every step keeps finished chunks under ``<partial_dir>/mp/`` as Parquet (written atomically) with a
small state file (a hash of what makes the chunk list, and the list itself), so re-running the same
command skips them and a changed config starts afresh.

Retries: mp-api's session already retries each request three times within a second (connection
errors, read errors, HTTP 429/502/504; honouring ``Retry-After``). On top of that, a chunk that still
fails with a connection error, a timeout or HTTP 429/5xx is retried :data:`RETRY_ATTEMPTS` times in
all with exponential backoff from :data:`RETRY_BASE_DELAY_S` seconds, for outages longer than a
second; then the fetch stops with one sentence saying what was kept. Other HTTP 4xx answers (a
rejected key, an unsupported request) stop at once.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
import requests

from cmma_cli.config import FetchConfig
from cmma_cli.console import console, esc, progress
from cmma_cli.errors import CMMAError
from cmma_cli.sources.recipes import link_recipes
from cmma_cli.sources.schema import RawData, conform_descriptions, conform_materials
from cmma_cli.sources.structures import material_record
from cmma_cli.workspace import config_hash, read_table, write_json, write_table

#: Summary fields we ask for (emmet-core ``SummaryDoc`` names).
FIELDS = [
    "material_id", "structure", "formula_pretty", "formation_energy_per_atom", "band_gap",
    "energy_above_hull", "is_stable", "is_metal", "density", "symmetry", "bulk_modulus", "shear_modulus",
]
#: The API's page limit (emmet-api PaginationQuery max_limit).
MAX_PAGE = 1000
#: The synthesis endpoint's page size (mp-api's default; the endpoint documents 10 as its limit).
SYNTHESIS_PAGE = 10
#: Formulas per resumable synthesis chunk (each formula is at least one request).
FORMULAS_PER_CHUNK = 20
#: Attempts per chunk for transient failures, and the first backoff delay (doubled each time).
RETRY_ATTEMPTS = 5
RETRY_BASE_DELAY_S = 2.0
KEY_LENGTH = 32
KEY_PAGE = "https://next-gen.materialsproject.org/api"

T = TypeVar("T")
#: Query parameters of an endpoint URL that are secrets, never written to a manifest, a log or the terminal.
SECRET_PARAMETERS = ("api_key", "apikey", "key", "token", "access_token", "password")


def public_url(url: str | None) -> str | None:
    """``url`` without credentials: no ``user:password@`` and no secret query parameter (``api_key=...``).

    Every endpoint that cmma records (the fetch manifest) or prints goes through this; the request itself uses
    the URL as given."""
    if not url:
        return url
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
    except ValueError:  # not a URL at all: keep nothing that could be a secret
        return "<unparsable URL>"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host + (f":{port}" if port is not None else "")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() not in SECRET_PARAMETERS]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query), parts.fragment))



# ------------------------------------------------------------------------------------------ entry


def fetch_materials_project(cfg: FetchConfig, api_key: str | None, partial_dir: Path) -> RawData:
    """Fetch materials matching ``cfg`` (with recipes and descriptions unless turned off) from the Materials Project.

    ``partial_dir`` keeps finished chunks between runs (under ``mp/``); the caller removes it once the
    raw tables are written.
    """
    key = check_api_key(api_key)
    check_filters(cfg)
    from mp_api.client.core.utils import validate_endpoint

    endpoint = validate_endpoint(cfg.endpoint)
    job = _Job(cfg, endpoint, partial_dir / "mp")
    try:
        with progress() as bar:
            job.bar = bar
            mpr = job.retrying(lambda: _connect(key, endpoint, job.partial))
            try:
                return job.run(mpr)
            finally:
                mpr.session.close()
    except _GaveUp as stop:
        raise CMMAError(job.give_up_sentence(stop)) from None


def check_api_key(api_key: str | None) -> str:
    """The key, stripped; or one sentence saying how to provide a valid one."""
    key = (api_key or "").strip()
    if not key:
        raise CMMAError(
            "No Materials Project API key: set the MP_API_KEY environment variable or pass --api-key "
            f"(get a key at {KEY_PAGE})."
        )
    if len(key) != KEY_LENGTH:
        legacy = " (legacy 16-character keys no longer work)" if len(key) == 16 else ""
        raise CMMAError(
            f"The Materials Project API key has {len(key)} characters but keys have {KEY_LENGTH}{legacy}: "
            f"copy your key from {KEY_PAGE} into MP_API_KEY or --api-key."
        )
    return key


def check_filters(cfg: FetchConfig) -> None:
    """Element symbols in ``--elements`` / ``--chemsys`` must be real elements (checked before any request)."""
    from pymatgen.core import Element

    for option, symbols in (("--elements", cfg.elements), ("--chemsys", (cfg.chemsys or "").split("-"))):
        for symbol in (s.strip() for s in symbols):
            if symbol and not Element.is_valid_symbol(symbol):
                raise CMMAError(
                    f"{symbol!r} in {option} is not an element symbol: use symbols such as Li,Fe,O "
                    "(--elements) or Li-Fe-O (--chemsys)."
                )


# ------------------------------------------------------------------------------------------ client


def _connect(key: str, endpoint: str, partial: Path) -> Any:
    """An ``MPRester`` on ``endpoint`` (its start-up requests the heartbeat)."""
    from mp_api.client import MPRester

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return MPRester(
                key,
                endpoint=endpoint,
                use_document_model=False,  # plain dicts: the recipe layout stays as the API sends it
                mute_progress_bars=True,  # ours is the rich bar
                notify_db_version=False,
                local_dataset_cache=partial / "mp_datasets",
            )
    except (KeyError, TypeError, ValueError) as exc:  # the heartbeat answered, but not like the API
        status, looks_right = _probe_heartbeat(endpoint)
        if status is None or status == 429 or status >= 500 or looks_right:  # down, or better now: retry
            raise _Transient(f"HTTP {status} on /heartbeat" if status else "no heartbeat") from exc
        answer = f"returned HTTP {status}" if status != 200 else "is not the API's heartbeat"
        raise CMMAError(
            f"{public_url(endpoint)} does not answer like the Materials Project API (its /heartbeat {answer}): "
            "check --endpoint, or leave it out for the public API."
        ) from None


def _probe_heartbeat(endpoint: str) -> tuple[int | None, bool]:
    """(HTTP status or None, whether the answer has the API's heartbeat fields), to explain a failed start."""
    try:
        response = requests.get(endpoint + "heartbeat", timeout=20)
    except requests.RequestException:
        return None, False
    try:
        body = response.json()
    except ValueError:
        return response.status_code, False
    return response.status_code, isinstance(body, dict) and {"version", "db_version"} <= set(body)


class _Transient(Exception):
    """A failure worth retrying (connection, timeout, HTTP 429/5xx)."""


class _GaveUp(Exception):
    """Retries ran out."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


_STATUS = re.compile(r"status code (\d{3})|too many (\d{3}) error responses")


def classify(exc: BaseException) -> tuple[str, str] | None:
    """(``transient`` | ``auth`` | ``refused``, short detail) for a client failure; ``None`` when it is not one."""
    from mp_api.client.core.exceptions import MPRestError

    if isinstance(exc, _Transient):
        return "transient", str(exc)
    if not isinstance(exc, (MPRestError, requests.RequestException)):
        return None
    text = str(exc)
    match = _STATUS.search(text)
    if match:
        code = int(match.group(1) or match.group(2))
        if code in (401, 403):
            return "auth", f"HTTP {code}"
        if code == 429 or code >= 500:
            return "transient", f"HTTP {code}"
        message = text.split("with message:", 1)[-1].strip().splitlines()
        return "refused", f"HTTP {code}: {message[0][:200] if message else ''}"
    if "does not support the request" in text:
        return "refused", "HTTP 400: the server does not support this request"
    cause = exc if isinstance(exc, requests.RequestException) else exc.__context__
    if isinstance(cause, requests.RequestException) or "Max retries exceeded" in text or "timed out" in text:
        return "transient", _connection_detail(text)
    return "refused", text.strip().splitlines()[0][:200] if text.strip() else type(exc).__name__


def _connection_detail(text: str) -> str:
    for needle, detail in (
        ("Connection refused", "connection refused"),
        ("Name or service not known", "unknown host"),
        ("Failed to resolve", "unknown host"),
        ("timed out", "timed out"),
        ("RemoteDisconnected", "connection closed by the server"),
        ("Connection aborted", "connection closed by the server"),
    ):
        if needle in text:
            return detail
    return "connection error"


# -------------------------------------------------------------------------------------------- job


@dataclass
class _Chunked:
    """Progress of one resumable step, for the give-up sentence."""

    name: str
    done: int = 0
    total: int = 0


class _Job:
    """One fetch: the steps, their partial files, retries and the sentences for stopping."""

    def __init__(self, cfg: FetchConfig, endpoint: str, partial: Path) -> None:
        self.cfg = cfg
        self.endpoint = public_url(endpoint)  # what messages show; the client keeps the URL as given
        self.partial = partial
        self.bar: Any = None
        self.step = _Chunked("connect")
        self.materials = _Chunked("materials")

    # -- the steps
    def run(self, mpr: Any) -> RawData:
        ids = self.list_ids(mpr)
        materials, rejects = self.fetch_materials(mpr, ids)
        raw = RawData(materials=materials, rejects=rejects)
        if self.cfg.synthesis and len(materials):
            raw.synthesis, counts, recipe_rejects = self.fetch_synthesis(mpr, materials)
            raw.rejects.extend(recipe_rejects)
            console.print(
                f"Recipes: {counts['recipes']:,} found, {counts['linked']:,} linked ({counts['links']:,} links); "
                f"{counts.get('variable_target', 0):,} target a variable composition and {counts['unlinked']:,} "
                "another material.",
                highlight=False,
            )
        if self.cfg.descriptions and len(materials):
            raw.descriptions = self.fetch_descriptions(mpr, list(materials["material_id"]))
        return raw

    def list_ids(self, mpr: Any) -> list[str]:
        """The ids matching the filters (kept in the state file, so a resumed run does not list them again)."""
        self.step = _Chunked("list")
        key = config_hash({**self.filters(), "limit": self.cfg.limit, "endpoint": self.endpoint,
                           "chunk_size": self.cfg.chunk_size, "fields": FIELDS})
        state_path = self.partial / "materials.json"
        state = _read_state(state_path)
        if state is not None and state.get("key") == key:
            return list(state["items"])
        _clear(self.partial, "materials")
        limit = self.cfg.limit
        page = min(limit or MAX_PAGE, MAX_PAGE)
        docs = self.retrying(
            lambda: mpr.materials.summary.search(
                **self.filters(), deprecated=False, fields=["material_id"], chunk_size=page,
                num_chunks=math.ceil(limit / page) if limit else None,
            )
        )
        ids = list(dict.fromkeys(str(d["material_id"]) for d in docs))[: limit or None]
        if not ids:
            raise CMMAError(
                f"The Materials Project filters matched no materials ({self.describe_filters()}): "
                "loosen or remove them."
            )
        write_json({"key": key, "items": ids}, state_path)
        return ids

    def fetch_materials(self, mpr: Any, ids: list[str]) -> tuple[pd.DataFrame, list[dict[str, str]]]:
        self.step = self.materials
        self.materials.total = len(ids)

        def fetch(chunk: Sequence[str]) -> pd.DataFrame:
            docs = mpr.materials.summary.search(
                material_ids=list(chunk), fields=FIELDS, chunk_size=min(len(chunk), MAX_PAGE),
                num_chunks=math.ceil(len(chunk) / MAX_PAGE),
            )
            return _material_frame(docs, chunk)

        frames = self.chunked("materials", ids, self.cfg.chunk_size, fetch, self.materials, "Materials")
        rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        kept = rows[rows["reject"].isna()].drop(columns=["reject"]) if len(rows) else rows
        rejects = [
            {"source": "mp", "item": str(r.material_id), "reason": str(r.reject)}
            for r in rows[rows["reject"].notna()].itertuples()
        ] if len(rows) else []
        if not len(kept):
            raise CMMAError(
                f"None of the {len(ids):,} materials from the Materials Project had a usable structure "
                f"(first: {rejects[0]['item']}, {rejects[0]['reason']}): try other filters."
            )
        materials, _ = conform_materials(kept)
        return materials, rejects

    def fetch_synthesis(self, mpr: Any, materials: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, int], list]:
        formulas = sorted(set(materials["formula"]))
        step = _Chunked("synthesis", total=len(formulas))
        self.step = step

        def fetch(chunk: Sequence[str]) -> pd.DataFrame:
            rows = []
            for formula in chunk:  # one formula per query: retried one by one
                records = self.retrying(
                    lambda f=formula: mpr.materials.synthesis.search(target_formula=f, chunk_size=SYNTHESIS_PAGE)
                )
                rows.extend({"formula": formula, "record": json.dumps(r, default=str)} for r in records)
            return pd.DataFrame(rows, columns=["formula", "record"])

        frames = self.chunked("synthesis", formulas, FORMULAS_PER_CHUNK, fetch, step, "Recipes", retry=False)
        records = [json.loads(r) for f in frames for r in f["record"]]
        return link_recipes(records, materials, source="mp")

    def fetch_descriptions(self, mpr: Any, ids: list[str]) -> pd.DataFrame:
        step = _Chunked("descriptions", total=len(ids))
        self.step = step

        def fetch(chunk: Sequence[str]) -> pd.DataFrame:
            docs = mpr.materials.robocrys.search_docs(
                material_ids=list(chunk), fields=["material_id", "description"],
                chunk_size=min(len(chunk), MAX_PAGE), num_chunks=math.ceil(len(chunk) / MAX_PAGE),
            )
            rows = [
                {"material_id": str(d["material_id"]), "description": d["description"], "source": "robocrys"}
                for d in docs
                if isinstance(d.get("description"), str) and d["description"].strip()
            ]
            return pd.DataFrame(rows, columns=["material_id", "description", "source"])

        frames = self.chunked("descriptions", ids, self.cfg.chunk_size, fetch, step, "Descriptions")
        found = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
        return conform_descriptions(found.drop_duplicates("material_id") if len(found) else found)

    # -- chunks and retries
    def chunked(
        self,
        name: str,
        items: list[str],
        size: int,
        fetch: Callable[[Sequence[str]], pd.DataFrame],
        step: _Chunked,
        label: str,
        retry: bool = True,
    ) -> list[pd.DataFrame]:
        """Run ``fetch`` over ``items`` in chunks of ``size``, reusing chunks a previous run finished."""
        key = config_hash({"items": items, "size": size, "endpoint": self.endpoint})
        state_path = self.partial / f"{name}-chunks.json"
        state = _read_state(state_path)
        if state is None or state.get("key") != key:
            _clear(self.partial, f"{name}-")
            write_json({"key": key, "size": size, "count": len(items)}, state_path)
        task = self.bar.add_task(label, total=len(items))
        frames = []
        for i, chunk in enumerate(_chunks(items, size)):
            path = self.partial / f"{name}-{i:05d}.parquet"
            if path.exists():
                frame = read_table(path)
            else:
                frame = self.retrying(lambda c=chunk: fetch(c)) if retry else fetch(chunk)
                write_table(frame, path)
            frames.append(frame)
            step.done += len(chunk)
            self.bar.advance(task, len(chunk))
        return frames

    def retrying(self, call: Callable[[], T]) -> T:
        """``call()``, retried with exponential backoff on transient failures."""
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                return call()
            except Exception as exc:
                kind = classify(exc)
                if kind is None:
                    raise
                what, detail = kind
                if what == "auth":
                    raise CMMAError(
                        f"The Materials Project at {self.endpoint} rejected the API key ({detail}): check "
                        f"MP_API_KEY / --api-key against your key at {KEY_PAGE}."
                    ) from None
                if what == "refused":
                    raise CMMAError(
                        f"The Materials Project API at {self.endpoint} refused the request ({detail}): "
                        "upgrade mp-api (pip install -U mp-api) or check --endpoint."
                    ) from None
                if attempt == RETRY_ATTEMPTS:
                    raise _GaveUp(detail) from None
                delay = RETRY_BASE_DELAY_S * 2 ** (attempt - 1)
                console.print(
                    f"[yellow]Materials Project request failed ({esc(detail)}); retrying in {delay:.1f} s "
                    f"({attempt}/{RETRY_ATTEMPTS - 1}).[/]",
                    highlight=False,
                )
                time.sleep(delay)
        raise AssertionError("unreachable")

    # -- sentences
    def filters(self) -> dict[str, Any]:
        """The summary-search criteria for the config's filters."""
        out: dict[str, Any] = {}
        if self.cfg.elements:
            out["elements"] = [e.strip() for e in self.cfg.elements]
        if self.cfg.chemsys:
            out["chemsys"] = "-".join(sorted(e.strip() for e in self.cfg.chemsys.split("-")))
        if self.cfg.max_sites:
            out["num_sites"] = (1, int(self.cfg.max_sites))
        if self.cfg.stable_only:
            out["is_stable"] = True
        return out

    def describe_filters(self) -> str:
        parts = []
        if self.cfg.elements:
            parts.append(f"--elements {','.join(self.cfg.elements)}")
        if self.cfg.chemsys:
            parts.append(f"--chemsys {self.cfg.chemsys}")
        if self.cfg.max_sites:
            parts.append(f"--max-sites {self.cfg.max_sites}")
        if self.cfg.stable_only:
            parts.append("--stable-only")
        return " ".join(parts) or "no filters"

    def give_up_sentence(self, stop: _GaveUp) -> str:
        where = f"The Materials Project API at {self.endpoint} kept failing ({stop.detail}, {RETRY_ATTEMPTS} attempts)"
        again = "re-run the same command to continue where it stopped"
        m = self.materials
        if self.step.name in ("connect", "list"):
            return f"{where}: check your network connection and --endpoint, then {again}."
        if self.step.name == "materials":
            return f"{where}: {m.done:,} of {m.total:,} materials were fetched and kept; {again}."
        extra = "--no-synthesis" if self.step.name == "synthesis" else "--no-descriptions"
        unit = "formulas" if self.step.name == "synthesis" else "materials"
        return (
            f"{where} while fetching {self.step.name}: all {m.total:,} materials and the {self.step.name} for "
            f"{self.step.done:,} of {self.step.total:,} {unit} were fetched and kept; {again} (or add {extra})."
        )


# -------------------------------------------------------------------------------------- documents


def _material_frame(docs: list[dict[str, Any]], asked: Sequence[str]) -> pd.DataFrame:
    """Raw materials rows for summary docs, with a ``reject`` reason (null when the row is good)."""
    from pymatgen.core import Structure

    rows = []
    seen = set()
    for doc in docs:
        mid = str(doc.get("material_id"))
        seen.add(mid)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                structure = Structure.from_dict(doc["structure"])
            if len(structure) == 0:
                raise ValueError("no sites")
        except Exception as exc:  # pymatgen raises many types for bad structures
            rows.append({"material_id": mid, "reject": f"unusable structure ({type(exc).__name__}: {exc})"[:200]})
            continue
        row = material_record(mid, structure, "mp", **summary_properties(doc))
        row["reject"] = None
        rows.append(row)
    for mid in asked:
        if mid not in seen:
            rows.append({"material_id": mid, "reject": "listed by the summary search but not returned by id"})
    return pd.DataFrame(rows)


def summary_properties(doc: dict[str, Any]) -> dict[str, Any]:
    """The raw-schema properties of one summary document (symmetry and moduli flattened)."""
    symmetry = doc.get("symmetry") or {}
    crystal_system = symmetry.get("crystal_system")
    return {
        "formation_energy_per_atom": doc.get("formation_energy_per_atom"),
        "band_gap": doc.get("band_gap"),
        "energy_above_hull": doc.get("energy_above_hull"),
        "is_stable": doc.get("is_stable"),
        "is_metal": doc.get("is_metal"),
        "density": doc.get("density"),
        # the API says "Cubic"; pymatgen (and so the other sources) says "cubic"
        "crystal_system": crystal_system.lower() if isinstance(crystal_system, str) else None,
        "spacegroup_number": symmetry.get("number"),
        "spacegroup_symbol": symmetry.get("symbol"),
        "bulk_modulus_vrh": (doc.get("bulk_modulus") or {}).get("vrh"),
        "shear_modulus_vrh": (doc.get("shear_modulus") or {}).get("vrh"),
    }


# ------------------------------------------------------------------------------------------ files


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _clear(folder: Path, prefix: str) -> None:
    """Remove a step's old chunk files (another config made them)."""
    if folder.exists():
        for f in folder.iterdir():
            if f.name.startswith(prefix) and f.is_file():
                f.unlink()

