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

Retries and time limits: the client's session (ours, mounted on mp-api's) retries each request three
times within a second on connection errors, read errors and HTTP 502/504, and waits at most
:data:`CONNECT_TIMEOUT_S` to connect and :data:`READ_TIMEOUT_S` for each read. On top of that, a step
that still fails with a connection error, a timeout, HTTP 429/5xx or a malformed answer (a 200 whose
body is not JSON: a proxy's HTML page, a cut-off body) is tried :data:`RETRY_ATTEMPTS` times in all,
waiting between attempts with exponential backoff from :data:`RETRY_BASE_DELAY_S` seconds, or as long
as the server's ``Retry-After`` asks; no wait is longer than :data:`MAX_WAIT_S`, and every wait is
printed. An attempt with no answer for :data:`REQUEST_DEADLINE_S` seconds is abandoned (a notice is
printed every :data:`NOTICE_EVERY_S` seconds while it waits), and a step that has had no good answer
for :data:`GIVE_UP_AFTER_S` seconds in all is given up: a server that never answers is given up
within about that long. Giving up stops the fetch with one sentence saying what was kept. Other
HTTP 4xx answers (a rejected key, an unsupported request) stop at once.
"""

from __future__ import annotations

import json
import math
import re
import threading
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
#: Seconds to wait for a connection, and for each read of an answer (the socket timeouts of every request).
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
#: An attempt that has had no answer for this many seconds is abandoned (and counts as a failed attempt).
REQUEST_DEADLINE_S = 60.0
#: A step (one chunk, one listing) that has had no good answer for this many seconds, over all its attempts and
#: waits, is given up: the bound on how long a server that never answers keeps the fetch waiting.
GIVE_UP_AFTER_S = 180.0
#: The longest wait between attempts, whatever the server's ``Retry-After`` asks for.
MAX_WAIT_S = 60.0
#: While an attempt waits for an answer, a line says so every this many seconds.
NOTICE_EVERY_S = 15.0
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
            job.watch(mpr.session)
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
        if isinstance(exc, json.JSONDecodeError):  # not JSON at all: a proxy's page, a body cut short
            raise _Transient(_malformed_detail(exc.doc)) from exc
        probe = _probe_heartbeat(endpoint)
        status = probe.status
        if status is None or status == 429 or status >= 500 or probe.looks_right or probe.malformed:
            # down, a proxy's page, or better now: retry
            detail = probe.malformed or (f"HTTP {status} on /heartbeat" if status else "no heartbeat")
            raise _Transient(detail, retry_after=probe.retry_after) from exc
        answer = f"returned HTTP {status}" if status != 200 else "is not the API's heartbeat"
        raise CMMAError(
            f"{public_url(endpoint)} does not answer like the Materials Project API (its /heartbeat {answer}): "
            "check --endpoint, or leave it out for the public API."
        ) from None


@dataclass
class _Probe:
    status: int | None  # None: no answer
    looks_right: bool  # the answer has the API's heartbeat fields
    malformed: str | None = None  # a 200 whose body is not JSON (why, in words)
    retry_after: float | None = None


def _probe_heartbeat(endpoint: str) -> _Probe:
    """What ``GET heartbeat`` answers, to explain a failed start."""
    try:
        response = requests.get(endpoint + "heartbeat", timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    except requests.RequestException:
        return _Probe(None, False)
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    try:
        body = response.json()
    except ValueError:
        malformed = _malformed_detail(response.text) if response.status_code == 200 else None
        return _Probe(response.status_code, False, malformed, retry_after)
    looks_right = isinstance(body, dict) and {"version", "db_version"} <= set(body)
    return _Probe(response.status_code, looks_right, None, retry_after)


def _malformed_detail(body: str | bytes | None) -> str:
    """Words for an answer that should have been JSON and is not."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    if text.lstrip()[:1] == "<":
        return "an HTML page instead of JSON, as a proxy or login page sends"
    return "a malformed answer (not JSON)" if text.strip() else "an empty answer"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds a ``Retry-After`` header asks for (a number of seconds or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        from datetime import datetime, timezone

        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - datetime.now(timezone.utc)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class _BoundedAdapter(requests.adapters.HTTPAdapter):
    """mp-api's retries (connection and read errors, HTTP 502/504) with our timeouts on every request.

    ``Retry-After`` is not honoured here (urllib3 would sleep as long as it says, in silence): HTTP 429 and
    503 come back to :meth:`_Job.retrying`, which waits at most :data:`MAX_WAIT_S` and says so."""

    def __init__(self, connect_s: float, read_s: float) -> None:
        from mp_api.client.core.settings import MAPI_CLIENT_SETTINGS
        from urllib3.util.retry import Retry

        n = MAPI_CLIENT_SETTINGS.MAX_RETRIES
        retry = Retry(total=n, connect=n, read=n, status_forcelist=[502, 504], respect_retry_after_header=False,
                      backoff_factor=MAPI_CLIENT_SETTINGS.BACKOFF_FACTOR)
        super().__init__(max_retries=retry)
        self.timeouts = (connect_s, read_s)

    def send(self, request: Any, stream: bool = False, timeout: Any = None, **kwargs: Any) -> Any:
        return super().send(request, stream=stream, timeout=self.timeouts, **kwargs)


class _Transient(Exception):
    """A failure worth retrying (connection, timeout, HTTP 429/5xx, a malformed answer)."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class _GaveUp(Exception):
    """Retries ran out."""

    def __init__(self, detail: str, attempts: int) -> None:
        super().__init__(detail)
        self.detail = detail
        self.attempts = attempts


_STATUS = re.compile(r"status code (\d{3})|too many (\d{3}) error responses")


def classify(exc: BaseException) -> tuple[str, str] | None:
    """(``transient`` | ``auth`` | ``refused``, short detail) for a client failure; ``None`` when it is not one."""
    from mp_api.client.core.exceptions import MPRestError

    if isinstance(exc, _Transient):
        return "transient", str(exc)
    if isinstance(exc, json.JSONDecodeError):  # a 200 whose body is not JSON (mp-api parses it with orjson)
        return "transient", _malformed_detail(exc.doc)
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
        ("IncompleteRead", "answer cut short"),
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
        self.answered = time.monotonic()  # when the server last gave a good answer (or the step began)
        self.retry_after: float | None = None  # what the last 429/503 asked for

    def watch(self, session: requests.Session) -> None:
        """Put our timeouts and retries on the client's session, and follow its answers."""
        adapter = _BoundedAdapter(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        session.hooks.setdefault("response", []).append(self._on_response)

    def _on_response(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        if response.status_code == 200 and "json" in response.headers.get("Content-Type", ""):
            self.answered = time.monotonic()
        elif response.status_code in (429, 503):
            self.retry_after = parse_retry_after(response.headers.get("Retry-After"))

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
        """``call()``, retried on transient failures: backoff or ``Retry-After`` waits (capped, each printed) and
        attempts abandoned after :data:`REQUEST_DEADLINE_S` s without an answer, within :data:`GIVE_UP_AFTER_S`."""
        self.answered = time.monotonic()
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            self.retry_after = None
            try:
                return self._attempt(call, attempt)
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
                asked = exc.retry_after if isinstance(exc, _Transient) and exc.retry_after is not None else self.retry_after
                wait = min(RETRY_BASE_DELAY_S * 2 ** (attempt - 1) if asked is None else asked, MAX_WAIT_S)
                silent = time.monotonic() - self.answered
                if attempt == RETRY_ATTEMPTS or silent + wait >= GIVE_UP_AFTER_S:
                    if asked is not None and asked > MAX_WAIT_S:
                        detail = f"{detail}, asking to wait {_seconds(asked)} s"
                    raise _GaveUp(detail, attempt) from None
                if asked is None:
                    then = f"retrying in {_seconds(wait)} s"
                else:
                    then = f"the server asked to wait {_seconds(asked)} s; waiting {_seconds(wait)} s"
                console.print(
                    f"[yellow]Materials Project request failed ({esc(detail)}); {then} "
                    f"(attempt {attempt + 1}/{RETRY_ATTEMPTS}).[/]",
                    highlight=False,
                )
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _attempt(self, call: Callable[[], T], attempt: int) -> T:
        """``call()`` in a worker thread, abandoned when the server gives no answer for too long.

        The thread (a daemon) is left to end by itself: its requests have socket timeouts, and nothing it
        returns is used. The main thread says every :data:`NOTICE_EVERY_S` seconds that it is waiting."""
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                outcome["value"] = call()
            except BaseException as exc:  # handed to the main thread
                outcome["error"] = exc

        started = time.monotonic()
        worker = threading.Thread(target=work, name="cmma-mp-request", daemon=True)
        worker.start()
        notices = 0  # notices printed for the present silence
        while True:
            now = time.monotonic()
            quiet = now - max(started, self.answered)  # this attempt's silence (a good answer ends it)
            left = min(REQUEST_DEADLINE_S - quiet, GIVE_UP_AFTER_S - (now - self.answered))
            if left <= 0:
                raise _Transient(f"no answer within {_seconds(quiet)} s")
            notices = min(notices, int(quiet // NOTICE_EVERY_S))
            until_notice = (notices + 1) * NOTICE_EVERY_S - quiet
            if until_notice <= 0:
                notices = int(quiet // NOTICE_EVERY_S)
                console.print(
                    f"[yellow]No answer from the Materials Project API at {esc(self.endpoint)} for "
                    f"{_seconds(quiet)} s; waiting up to {_seconds(REQUEST_DEADLINE_S)} s "
                    f"(attempt {attempt}/{RETRY_ATTEMPTS}).[/]",
                    highlight=False,
                )
                continue
            worker.join(min(left, until_notice))
            if not worker.is_alive():
                break
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

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
        where = f"The Materials Project API at {self.endpoint} kept failing ({stop.detail}, {stop.attempts} attempts)"
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


def _seconds(value: float) -> str:
    """Seconds for a message: whole above 10, else one decimal ("3600", "2.0", "0.5")."""
    return f"{value:.0f}" if value >= 10 else f"{value:.1f}"


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

