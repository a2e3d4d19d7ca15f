"""The HTTP API of ``cmma serve`` and the page it serves, around one warm :class:`~cmma_cli.session.Session`.

JSON endpoints (errors are ``{"error": sentence}`` with status 400, or 404 for an unknown material):

- ``GET /health``: the run, workspace, modalities, tables, material count, load seconds;
- ``GET /search?q=TEXT_OR_ID&to=&k=&filter=&from=`` and ``POST /search`` (JSON ``{"query", "to", "k", "filters",
  "from"}``, or a form with a ``file``: a CIF or a pattern): the ``cmma retrieve --json`` document;
- ``POST /encode``: JSON ``{"texts": [...]}``, ``{"structures": [CIF text, ...]}`` or ``{"patterns": [[[2θ, I],
  ...], ...]}``, or a form with ``file``s: ``{"dim", "vectors"}``;
- ``POST /identify``: a form with the pattern ``file`` and ``cmma identify``'s options (``elements=Ti,O``,
  ``max_phases``, ...): the ``cmma identify --json`` document of that pattern;
- ``GET /materials/{id}``: properties, structure summary, nearest neighbours per table, recipes;
- ``GET /map``: 2-D coordinates of every material (``cmma evaluate``'s map, else PCA) with key properties.

``/`` is the search page (``static/``). One lock serialises the session: queries are milliseconds once warm.
"""

import math
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from cmma_cli.errors import CMMAError

STATIC = Path(__file__).parent / "static"
#: The most bytes an uploaded file may have (a CIF or a pattern is kilobytes).
MAX_UPLOAD = 20 * 1024 * 1024


def _json_safe(value: Any) -> Any:
    """NaN and infinities as null, numpy values as plain ones (JSON has no NaN)."""
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_json_safe(v) for v in value.tolist()]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def _safe_name(name: str | None, default: str) -> str:
    """An uploaded file's name, reduced to a safe base name that keeps its suffix (modalities claim by suffix)."""
    base = Path(name or default).name
    base = re.sub(r"[^A-Za-z0-9._-]", "_", base).lstrip(".") or default
    return base[:120]


def create_app(session, load_seconds: float | None = None):
    """The FastAPI app answering for ``session`` (a :class:`~cmma_cli.session.Session`)."""
    from fastapi import FastAPI, HTTPException, Query, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    from cmma_cli import __version__

    app = FastAPI(title="cmma", version=__version__, docs_url="/docs", redoc_url=None)
    lock = threading.Lock()

    @app.exception_handler(CMMAError)
    async def _cmma_error(_request, exc: CMMAError):
        status = 404 if str(exc).startswith("Unknown material id") else 400
        return JSONResponse({"error": str(exc)}, status_code=status)

    def answer(fn, *args, **kwargs) -> JSONResponse:
        started = time.perf_counter()
        with lock:
            out = fn(*args, **kwargs)
        out = _json_safe(out)
        if isinstance(out, dict):
            out.setdefault("timing_ms", {})
            if isinstance(out["timing_ms"], dict):
                out["timing_ms"]["server"] = round((time.perf_counter() - started) * 1000, 3)
        return JSONResponse(out)

    async def uploads(request: Request) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
        """A form's fields and files, or a JSON body's fields (no files)."""
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data") or kind.startswith("application/x-www-form-urlencoded"):
            form = await request.form()
            fields: dict[str, Any] = {}
            files = []
            for key, value in form.multi_items():
                if hasattr(value, "read"):
                    data = await value.read()
                    if len(data) > MAX_UPLOAD:
                        raise CMMAError(f"The file {value.filename} is over {MAX_UPLOAD // 2**20} MiB.")
                    if data:
                        files.append((_safe_name(value.filename, "upload.dat"), data))
                elif value != "":
                    fields.setdefault(key, []).append(value)
            return {k: v[0] if len(v) == 1 else v for k, v in fields.items()}, files
        try:
            body = await request.json()
        except ValueError:
            raise CMMAError("Send a JSON object or a form (multipart/form-data) with a file.") from None
        if not isinstance(body, dict):
            raise CMMAError("Send a JSON object.")
        return body, []

    def with_files(files: list[tuple[str, bytes]], fn):
        """Run ``fn(paths)`` with the uploaded files written to a temporary folder under their own names."""
        with tempfile.TemporaryDirectory(prefix="cmma-serve-") as tmp:
            paths = []
            for i, (name, data) in enumerate(files):
                folder = Path(tmp) / str(i)
                folder.mkdir()
                path = folder / name
                path.write_bytes(data)
                paths.append(path)
            return fn(paths)

    def as_list(value: Any) -> list[str]:
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return [str(v) for v in value]

    def as_k(value: Any, default: int = 10) -> int:
        try:
            return int(value) if value not in (None, "") else default
        except (TypeError, ValueError):
            raise CMMAError(f"k must be a whole number, not {value!r}.") from None

    # ------------------------------------------------------------------------------------------ pages

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # ------------------------------------------------------------------------------------------- JSON

    @app.get("/health")
    def health():
        props = session.properties()
        return _json_safe({"status": "ok", "version": __version__, "run": session.run,
                           "workspace": str(session.ws.root), "modalities": session.modalities,
                           "tables": session.tables, "materials": int(len(props)),
                           "load_seconds": None if load_seconds is None else round(load_seconds, 3)})

    @app.get("/search")
    def search_get(request: Request, q: str, to: str | None = None, k: int = 10,
                   filter: list[str] = Query(default=[]), source: str | None = None):
        source = source or request.query_params.get("from")
        return answer(session.search_json, q, to=to or None, k=k, filter=filter or [], source=source or None)

    @app.post("/search")
    async def search_post(request: Request):
        fields, files = await uploads(request)
        options = {"to": fields.get("to") or None, "k": as_k(fields.get("k")),
                   "filter": as_list(fields.get("filters") or fields.get("filter")),
                   "source": fields.get("from") or fields.get("source") or None}
        if files:
            def run(paths):
                out = session.search_json(paths[0], **options)
                out["query"]["value"] = files[0][0]  # the upload's name, not the temporary path
                return out

            return with_files(files[:1], lambda paths: answer(run, paths))
        query = fields.get("query", fields.get("q"))
        if query is None or query == "":
            raise CMMAError("Nothing to search for: send a query (a text or a material id) or a file (a CIF or a "
                            "pattern).")
        if isinstance(query, list) and query and all(isinstance(v, (int, float)) for v in query):
            import numpy as np

            query = np.asarray(query, dtype=np.float32)
        elif not isinstance(query, str):
            raise CMMAError("query must be a text, a material id or a vector (a list of numbers).")
        elif Path(query).expanduser().exists():
            raise CMMAError("The server reads no paths of its own disk: upload the file instead.")
        return answer(session.search_json, query, **options)

    @app.post("/encode")
    async def encode(request: Request):
        import numpy as np

        fields, files = await uploads(request)
        source = fields.get("from") or fields.get("source") or None

        def vectors(**given):
            out = session.encode(**given, source=source)
            return {"dim": int(out.shape[1]), "count": int(out.shape[0]), "vectors": out.round(6).tolist()}

        if files:
            kind = fields.get("kind")

            def run(paths):
                chosen = kind or _kind_of(session, paths[0])
                return answer(vectors, **{chosen: paths})

            return with_files(files, run)
        given = {k: fields[k] for k in ("texts", "structures", "patterns") if fields.get(k) is not None}
        if len(given) != 1:
            raise CMMAError("Send one of texts, structures (CIF texts) or patterns ([[2θ, intensity], ...] each).")
        (kind, items), = given.items()
        items = [items] if isinstance(items, str) else list(items)
        if kind == "patterns":
            items = [np.asarray(p, dtype=np.float64) for p in items]
        elif not all(isinstance(v, str) for v in items):
            raise CMMAError(f"{kind} must be strings.")
        elif kind == "structures" and not all("_cell_length_a" in v for v in items):
            raise CMMAError("structures must be CIF texts (upload files as a form instead).")
        return answer(vectors, **{kind: items})

    @app.post("/identify")
    async def identify(request: Request):
        from dataclasses import fields as dc_fields

        from cmma_cli.config import IdentifyConfig

        form, files = await uploads(request)
        if not files:
            raise CMMAError("Upload the pattern as the form's file (two-column text, .xrdml or a powder CIF).")
        known = {f.name: f for f in dc_fields(IdentifyConfig)}
        options: dict[str, Any] = {}
        for key, value in form.items():
            if key not in known or key == "references":  # no paths of the server's disk
                continue
            default = getattr(IdentifyConfig(), key)
            if isinstance(default, list):
                options[key] = [e.strip() for v in as_list(value) for e in v.split(",") if e.strip()]
            elif isinstance(default, bool):
                options[key] = str(value).lower() in ("1", "true", "yes", "on")
            elif isinstance(default, int):
                options[key] = as_k(value)
            elif isinstance(default, float):
                options[key] = float(value)
            else:
                options[key] = str(value)
        def run(paths):
            out = session.identify(paths[0], **options).to_dict()
            out["path"] = files[0][0]  # the upload's name, not the temporary path
            return out

        return with_files(files[:1], lambda paths: answer(run, paths))

    @app.get("/materials/{material_id:path}")
    def material(material_id: str, k: int = 5):
        if k < 1 or k > 100:
            raise HTTPException(400, "k must be between 1 and 100")
        return answer(session.material, material_id, k=k)

    @app.get("/map")
    def latent_map():
        with lock:
            frame = session.map()
        columns = [c for c in frame.columns if c not in ("material_id", "x", "y", "method")]
        return JSONResponse(_json_safe({
            "method": str(frame["method"].iloc[0]) if len(frame) else None,
            "columns": columns,
            "numeric": [c for c in columns if frame[c].dtype.kind in "fiu"],
            "points": [{"material_id": r["material_id"], "x": r["x"], "y": r["y"],
                        **{c: r[c] for c in columns}} for r in frame.to_dict("records")],
        }))

    return app


def _kind_of(session, path: Path) -> str:
    """``structures`` or ``patterns``: what an uploaded file is, by the modality that claims it."""
    from cmma_cli.retrieve import query_options
    from cmma_cli.session import ENCODE_KINDS

    kind, _ = session.classify(path)
    options = {opt: keyword for keyword, opt in ENCODE_KINDS.items()}
    if kind in options and kind in query_options():
        return options[kind]
    raise CMMAError(f"Cannot encode the file {path.name}: upload a CIF or a pattern file.")


def run_serve(ws, run: str | None = None, host: str = "127.0.0.1", port: int = 8000, threads: int | None = 1,
              device: str = "cpu", warm: bool = True) -> None:
    """What ``cmma serve`` does: load the run (and, with ``warm``, every model a query needs), then serve."""
    import uvicorn

    from cmma_cli.console import console, esc
    from cmma_cli.session import Session

    started = time.perf_counter()
    session = Session(ws, run, device=device, threads=threads)
    if warm:
        session.warm()
    seconds = time.perf_counter() - started
    app = create_app(session, seconds)
    shown = f"[{host}]" if ":" in host else host
    console.print(f"Serving run {esc(session.run)} of {esc(str(ws.root))} at http://{shown}:{port}/ (loaded in "
                  f"{seconds:.1f} s; Ctrl+C stops)", highlight=False, soft_wrap=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
