"""``cmma retrieve``: cross-modal search in the embeddings of a trained run.

A query is what a registered modality takes as one (:attr:`~cmma_cli.modalities.base.Modality.query_option`:
a typed text, a CIF, a measured XRD pattern, an image), or a material already embedded (its stored
vector). It is read by its modality as a new input is (:meth:`~cmma_cli.modalities.base.Modality.read_query`),
encoded by the run's own encoder (``--from``: the modality's, or another it can go through, as a CIF
through its computed pattern) and searched, by cosine similarity, in one of the run's indexes (``--to``:
the first registered modality's by default, unified, or another table). Results carry the processed properties
(formula, crystal system, band gap, formation energy, energy above hull) and may be filtered by them
(``--filter "band_gap>1"``). What ``cmma embed --input`` embedded is searched with ``--to inputs/NAME`` (its
default table) or ``--to inputs/NAME/TABLE``: the folder ``embeddings/<run>/inputs/NAME/``, whose
``materials.parquet`` gives the results' properties.

:class:`Retriever` loads the indexes and the model once, so a program (or the benchmark) can ask many
queries; ``cmma retrieve`` asks one. Timings are kept apart: loading, encoding the query, searching.
"""

from __future__ import annotations

import difflib
import json
import math
import operator
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cmma_cli.config import RetrieveConfig
from cmma_cli.errors import CMMAError
from cmma_cli.console import console, esc
from cmma_cli.workspace import MANIFEST, Workspace, manifest_hash, manifest_problem, read_manifest, require_stage

#: The query kind of an embedded material (its stored vector): ``--material ID``.
MATERIAL = "material"
UNIFIED = "unified"
#: ``--to inputs/NAME[/TABLE]``: the embeddings ``cmma embed --input`` wrote to ``embeddings/<run>/inputs/NAME/``.
INPUTS = "inputs"


def next_query_hint(modalities: list[str] | tuple[str, ...]) -> str:
    """A ``cmma retrieve`` command a run with ``modalities`` can answer (a text query only when it has text)."""
    from cmma_cli.modalities import get_modality

    for kind, name in query_options().items():
        m = get_modality(name)
        if any(source in modalities for source in m.query_sources()):
            example = f'"{m.query_example.removesuffix(" in quotes")}"' if m.query_positional else (m.query_example or f"--{kind} FILE")
            return f"cmma retrieve {example}"
    return f"cmma retrieve --{MATERIAL} ID"


def targets() -> tuple[str, ...]:
    """The tables a query can be searched against: every table ``cmma embed`` may write."""
    from cmma_cli.embeddings import tables

    return tables()


def _either(names) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    names = list(names)
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def query_options() -> dict[str, str]:
    """``{query kind: modality}``: each registered modality's query option (the positional one first)."""
    from cmma_cli.modalities import REGISTRY

    found = [m for m in REGISTRY.values() if m.query_option]
    return {m.query_option: m.name for m in sorted(found, key=lambda m: not m.query_positional)}


def sources() -> dict[str, tuple[str, ...]]:
    """What each kind of query can be encoded as (first: the default)."""
    from cmma_cli.modalities import REGISTRY, get_modality

    out = {kind: get_modality(name).query_sources() for kind, name in query_options().items()}
    out[MATERIAL] = (*REGISTRY, UNIFIED)
    return out


def _examples(flags: bool = False) -> list[str]:
    """How each query is given: ``a text query in quotes``, ``--structure FILE.cif``, ... (``flags``: just the
    option names, ``text``, ``--structure``, ...), the embedded material last."""
    from cmma_cli.modalities import get_modality

    out = []
    for kind, name in query_options().items():
        m = get_modality(name)
        out.append((kind if m.query_positional else f"--{kind}") if flags else (m.query_example or f"--{kind} FILE"))
    return [*out, f"--{MATERIAL}" if flags else f"--{MATERIAL} ID"]



#: A measured pattern query (``--pattern``) that covers less than this share of the processed 2-theta grid gets a
#: warning with the share: the rest of its grid is zeros, and the hits still look normal.
MIN_PATTERN_COVERAGE = 0.5
#: The query option of a measured pattern, and the processed manifest's record of the grid it is put on.
PATTERN_QUERY, PATTERN_GRID = "pattern", "xrd_grid"


def pattern_coverage(path: Any, grid: dict[str, Any]) -> tuple[float, float, float] | None:
    """``(share of the grid covered, first, last 2-theta)`` of the pattern file at ``path`` on ``grid`` (the
    processed manifest's ``two_theta_min`` / ``two_theta_max``); None when either cannot be read."""
    from pathlib import Path

    from cmma_cli.modalities.xrd.patterns import read_two_columns

    try:
        lo, hi = float(grid["two_theta_min"]), float(grid["two_theta_max"])
        x, _ = read_two_columns(Path(path))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if not x.size or not hi > lo:
        return None
    covered = max(0.0, min(float(x.max()), hi) - max(float(x.min()), lo))
    return covered / (hi - lo), float(x.min()), float(x.max())


#: The processed properties shown with every result (where the data has them).
KEY_PROPERTIES = ("formula", "crystal_system", "spacegroup_symbol", "band_gap", "formation_energy_per_atom",
                  "energy_above_hull")
_OPS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, "==": operator.eq, "=": operator.eq,
        ">": operator.gt, "<": operator.lt}
_FILTER = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|!=|==|=|>|<)\s*(.+?)\s*$")


class Query:
    """One query: exactly one of the registered modalities' queries (``Query(text=...)``,
    ``Query(structure=path)``, ``Query(pattern=path)``, ``Query(image=path)``: their
    :attr:`~cmma_cli.modalities.base.Modality.query_option`) or an embedded material id (``Query(material=ID)``).
    A positional argument is the positional query (the typed text)."""

    def __init__(self, *args: Any, **given: Any):
        kinds = [*query_options(), MATERIAL]
        if args:
            if len(args) > 1 or not kinds[:-1] or kinds[0] in given:
                raise TypeError(f"Query() takes at most one positional query, then keywords among {', '.join(kinds)}")
            given[kinds[0]] = args[0]
        unknown = [k for k in given if k not in kinds]
        if unknown:
            raise TypeError(f"Query() got unknown queries {', '.join(unknown)}: the queries are {', '.join(kinds)}")
        self.given = {k: given.get(k) for k in kinds}

    def __getattr__(self, name: str) -> Any:
        given = self.__dict__.get("given", {})
        if name in given:
            return given[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __repr__(self) -> str:
        return "Query(" + ", ".join(f"{k}={v!r}" for k, v in self.given.items() if v not in (None, "")) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Query) and self.given == other.given

    @property
    def kind(self) -> str:
        given = [k for k, v in self.given.items() if v not in (None, "")]
        if not given:
            examples = _examples()
            raise CMMAError(f"Nothing to search for: give {examples[0]}, or {', '.join(examples[1:-1])} or {examples[-1]}."
                            if len(examples) > 2 else f"Nothing to search for: give {' or '.join(examples)}.")
        if len(given) > 1:
            raise CMMAError(f"Give one query at a time, not {' and '.join(given)}.")
        return given[0]

    @property
    def value(self) -> Any:
        """What was given for the query's kind."""
        return self.given[self.kind]

    def describe(self) -> dict[str, Any]:
        """The query as JSON: its kind and value."""
        return {"kind": self.kind, "value": str(self.value)}


@dataclass
class Filter:
    """A property filter such as ``band_gap>1`` or ``crystal_system==cubic``."""

    column: str
    op: str
    value: Any

    @classmethod
    def parse(cls, text: str) -> "Filter":
        match = _FILTER.match(text)
        if not match:
            raise CMMAError(f"Cannot read the filter {text!r}: write PROPERTY OP VALUE with OP one of "
                            f"{' '.join(_OPS)}, e.g. --filter 'band_gap>1' or --filter 'crystal_system==cubic'.")
        column, op, raw = match.groups()
        raw = raw.strip("'\"")
        value: Any = raw
        if raw.lower() in ("true", "false"):
            value = raw.lower() == "true"
        else:
            try:
                value = float(raw)
            except ValueError:
                pass
        return cls(column, op, value)

    def mask(self, frame: pd.DataFrame) -> np.ndarray:
        """Which rows of ``frame`` pass (a missing value never does)."""
        if self.column not in frame:
            known = ", ".join(c for c in frame.columns if c != "material_id")
            raise CMMAError(f"Unknown property {self.column!r} in --filter: the processed data has {known}.")
        column = frame[self.column]
        numeric = pd.api.types.is_numeric_dtype(column) and not pd.api.types.is_bool_dtype(column)
        if numeric and not isinstance(self.value, float):
            raise CMMAError(f"{self.column} is numeric: compare it with a number, e.g. --filter '{self.column}>1'.")
        if not numeric and isinstance(self.value, float):
            raise CMMAError(f"{self.column} is not numeric: compare it with a word, e.g. --filter '{self.column}==...'.")
        if isinstance(self.value, str) and self.op not in ("=", "==", "!="):
            raise CMMAError(f"{self.column} holds words: filter it with == or !=, not {self.op}.")
        if isinstance(self.value, str):
            column = column.astype("string").str.lower()
            value: Any = self.value.lower()
        else:
            value = self.value
        result = _OPS[self.op](column, value)
        return result.fillna(False).to_numpy(dtype=bool) & column.notna().to_numpy()

    def __str__(self) -> str:
        return f"{self.column}{self.op}{self.value}"


@dataclass
class Result:
    """A ranked answer: the rows (best first), what was asked and how long each part took."""

    run: str
    query: dict[str, Any]
    source: str
    target: str
    k: int
    filters: list[str]
    index_size: int
    rows: list[dict[str, Any]]
    timing_ms: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # what makes these hits less trustworthy than they look

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` document."""
        return {"run": self.run, "query": self.query, "from": self.source, "to": self.target, "k": self.k,
                "filters": self.filters, "index_size": self.index_size, "timing_ms": self.timing_ms,
                "results": self.rows, **({"warnings": self.warnings} if self.warnings else {})}


def not_a_workspace(ws: Workspace) -> str | None:
    """One sentence when ``ws`` is no cmma workspace at all (a mistyped ``-w``: a missing folder, or one holding
    files but none of a workspace's folders), else None (an empty folder is a workspace yet to fill)."""
    if not ws.root.exists():
        return (f"The workspace {ws.root} does not exist: check --workspace/-w (or $CMMA_WORKSPACE); a workspace is "
                "the folder `cmma fetch` filled.")
    if any(ws.root.iterdir()) and not any((ws.root / name).is_dir() for name in ("raw", "processed", "runs",
                                                                                "embeddings")):
        return (f"{ws.root} is not a cmma workspace (it has no raw/, processed/, runs/ or embeddings/ folder): check "
                "--workspace/-w (or $CMMA_WORKSPACE).")
    return None


def newest_embeddings(ws: Workspace) -> str:
    """The run whose embeddings were written last, or one sentence saying how to make some."""
    found = ws.finished("embed")
    if not found:
        wrong = not_a_workspace(ws)
        if wrong:
            raise CMMAError(wrong)
        raise CMMAError(f"There are no embeddings in {ws.root / 'embeddings'} yet: run `cmma embed` "
                        "(after `cmma train`) first.")
    return found[-1]


def _clean(value: Any) -> Any:
    """A JSON-safe scalar: NaN and NA become None, numpy scalars plain Python."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray):
        return [_clean(v) for v in value.tolist()]
    return value


class Retriever:
    """The embeddings of one run: indexes, id mappings and properties, and (on first need) its encoders."""

    def __init__(self, ws: Workspace, run: str | None = None, device: str = "cpu", threads: int | None = None):
        started = time.perf_counter()
        self._loading = 0  # nesting depth of timed loads: only the outermost one counts (no time counted twice)
        self.ws = ws
        self.run = run or newest_embeddings(ws)
        self.dir = ws.embeddings_dir(self.run)
        if read_manifest(self.dir) is None and manifest_problem(self.dir) is None:  # (a broken one: require_stage)
            wrong = not_a_workspace(ws)
            if wrong:
                raise CMMAError(wrong)
            others = sorted(ws.finished("embed"))
            hint = f" (runs with embeddings: {', '.join(others)})" if others else ""
            raise CMMAError(f"There are no embeddings for run {self.run!r} in {self.dir}{hint}: run "
                            f"`cmma embed --run {self.run}` first.")
        self.manifest = require_stage(self.dir, "embed")
        recorded = self.manifest.get("inputs", {}).get("preprocess")
        if recorded and (ws.processed / MANIFEST).is_file() and manifest_hash(ws.processed) != recorded:
            console.print(f"[yellow]processed/ changed after the embeddings of run {esc(self.run)} were made: properties "
                          f"may not match; run `cmma embed --run {esc(self.run)} --force`.[/]",
                          highlight=False, soft_wrap=True)
        self.modalities: list[str] = list(self.manifest["modalities"])
        self.tables = [t for t in targets() if (self.dir / f"{t}.parquet").is_file() and (self.dir / f"{t}.faiss").is_file()]
        if threads is not None and threads < 1:
            raise CMMAError(f"--threads must be at least 1, not {threads}.")
        self.device, self.threads = device, threads
        self._indexes: dict[str, Any] = {}
        self._ids: dict[str, pd.DataFrame] = {}
        self._vectors: dict[str, tuple[pd.Index, np.ndarray]] = {}
        self._properties: dict[str, pd.DataFrame] = {}  # {"": processed, "inputs/NAME": that folder's materials}
        self._encoder = None
        self._warm: set[str] = set()  # encoders whose query-time models are loaded
        self.load_seconds = time.perf_counter() - started

    # ------------------------------------------------------------------------------------ lazy parts

    def _timed(self):
        """A context that adds its time to :attr:`load_seconds`, unless an enclosing one already counts it."""
        from contextlib import contextmanager

        @contextmanager
        def timer():
            started = time.perf_counter()
            self._loading += 1
            try:
                yield
            finally:
                self._loading -= 1
                if self._loading == 0:
                    self.load_seconds += time.perf_counter() - started

        return timer()

    def inputs(self) -> list[str]:
        """The names of the finished ``cmma embed --input`` folders of this run (``--to inputs/NAME``)."""
        folder = self.dir / INPUTS
        return sorted(p.name for p in folder.glob("*/") if (p / MANIFEST).is_file()) if folder.is_dir() else []

    def folder(self, name: str) -> tuple[Any, str]:
        """``(folder, table)`` of a table name: the run's own tables, or ``inputs/NAME/TABLE``."""
        if name.startswith(INPUTS + "/"):
            _, group, table = name.split("/", 2)
            return self.dir / INPUTS / group, table
        return self.dir, name

    def index(self, name: str):
        """The FAISS index of table ``name`` (loaded once)."""
        if name not in self._indexes:
            from cmma_cli.index import load_index

            if self.threads:
                import faiss

                faiss.omp_set_num_threads(self.threads)
            try:
                folder, table = self.folder(name)
                self._indexes[name] = load_index(folder / f"{table}.faiss")
            except RuntimeError as exc:  # FAISS's answer to a damaged or foreign file
                raise CMMAError(f"{folder / f'{table}.faiss'} is not a readable index ({str(exc).splitlines()[0][:80]}): "
                                f"run `cmma embed --run {self.run} --force` to rebuild it.") from None
        return self._indexes[name]

    def ids(self, name: str) -> pd.DataFrame:
        """The id columns of table ``name``: row i describes row i of its index."""
        if name not in self._ids:
            from cmma_cli.evaluate.data import read_artifact

            folder, table = self.folder(name)
            path, rebuild = folder / f"{table}.parquet", f"cmma embed --run {self.run} --force"
            columns = [c for c in read_artifact(path, None, rebuild, schema_only=True) if c != "embedding"]
            self._ids[name] = read_artifact(path, columns if "material_id" in columns else ["material_id", *columns],
                                            rebuild)
        return self._ids[name]

    def vectors(self, name: str) -> tuple[pd.Index, np.ndarray]:
        """``(material ids, vectors)`` of table ``name``, for looking up a stored embedding."""
        if name not in self._vectors:
            from cmma_cli.embeddings import read_vectors

            path = self.dir / f"{name}.parquet"
            try:
                table, vectors = read_vectors(path, ["material_id"])
            except (pa.ArrowException, OSError, ValueError, KeyError, TypeError) as exc:
                raise CMMAError(f"{path} is not a readable embeddings table ({type(exc).__name__}): run "
                                f"`cmma embed --run {self.run} --force` to rebuild it.") from None
            self._vectors[name] = (pd.Index(table.column("material_id").to_pylist()), vectors)
        return self._vectors[name]

    def properties(self, target: str | None = None) -> pd.DataFrame:
        """The processed scalar columns (formula, symmetry, properties), one row per material id; for a target
        ``inputs/NAME/...``, those of the inputs' own ``materials.parquet``."""
        key = "/".join(target.split("/")[:2]) if target and target.startswith(INPUTS + "/") else ""
        if key not in self._properties:
            path = (self.dir / key if key else self.ws.processed) / "materials.parquet"
            if key and not path.is_file():
                return pd.DataFrame(index=pd.Index([], name="material_id"))

            if not path.is_file():
                raise CMMAError(f"{path} is missing, so results cannot show properties: run `cmma preprocess` first.")
            from cmma_cli.properties import non_property

            from cmma_cli.evaluate.data import read_artifact

            rebuild = "cmma preprocess --force"
            try:
                schema = pq.ParquetFile(path).schema_arrow
            except (pa.ArrowException, OSError) as exc:
                raise CMMAError(f"{path} is not a readable Parquet file ({type(exc).__name__}): run `{rebuild}` to "
                                "rebuild it.") from None
            skip = non_property() - {"material_id", "formula"}  # modality data and the raw structure and source
            columns = [f.name for f in schema if f.name not in skip and not (
                f.type.num_fields or str(f.type).startswith(("list", "large_list", "struct")))]
            frame = read_artifact(path, columns if "material_id" in columns else ["material_id", *columns], rebuild)
            frame["material_id"] = frame["material_id"].astype(str)
            self._properties[key] = frame.drop_duplicates("material_id").set_index("material_id")
        return self._properties[key]

    def encoder(self, modalities: list[str] | None = None):
        """The run's encoders, from the very checkpoint that made these embeddings: those of ``modalities`` (default:
        all) built and loaded, the others left for their first use (:meth:`~cmma_cli.encode.Encoder.need`), so one
        query builds only its own encoder (a pattern query never loads the structure backbone)."""
        if self._encoder is None:
            with self._timed():
                from cmma_cli.workspace import file_digest
                from cmma_cli.encode import Encoder

                facts = self.manifest["checkpoint"]
                path = self.ws.locate(facts["path"])
                again = f"run `cmma embed --run {self.run} --force` so the queries and the index come from one model"
                if not path.is_file():
                    raise CMMAError(f"The checkpoint {path} that made these embeddings is gone: {again}.")
                stat = path.stat()
                if (stat.st_size, stat.st_mtime_ns) != (facts.get("size"), facts.get("mtime_ns")) and \
                        file_digest(path) != facts["sha256"]:
                    raise CMMAError(f"The checkpoint {path} changed after `cmma embed` ran: {again}.")
                processed = require_stage(self.ws.processed, "preprocess")
                if self.threads:
                    import torch

                    torch.set_num_threads(self.threads)
                # no embeddings cache (a query's vector is not kept), but the traced frozen text model (fast path)
                self._encoder = Encoder(path, processed, cache_dir=None, device=self.device, show_progress=False,
                                        modalities=modalities, model_cache=self.ws.cache)
        wanted = self._encoder.modalities if modalities is None else list(modalities)
        if any(m not in self._encoder.model.encoders for m in wanted):
            with self._timed():
                self._encoder.need(wanted)
        return self._encoder

    def warm(self, source: str) -> None:
        """Load, once, what encoding through ``source`` needs beyond the checkpoint (e.g. the sentence model)."""
        if source not in self._warm:
            from cmma_cli.modalities import get_modality

            with self._timed():
                get_modality(source).warm_up(self.encoder([source]))
            self._warm.add(source)

    def prepare(self, kind: str, source: str, target: str) -> None:
        """Load, once, everything a query of this kind needs (counted as loading, not as encoding or search)."""
        ready = (target in self._indexes and target in self._ids
                 and (source in self._vectors if kind == MATERIAL else source in self._warm))
        if ready:
            return
        with self._timed():
            self.index(target)
            self.ids(target)
            self.properties(target)
            if kind == MATERIAL:
                self.vectors(source)
            else:
                self.warm(source)

    # ------------------------------------------------------------------------------------------ query

    def resolve(self, query: Query, source: str | None, target: str | None) -> tuple[str, str]:
        """The ``(from, to)`` of a query, checked against what this run has."""
        from cmma_cli.modalities import REGISTRY

        kind = query.kind
        allowed = sources()[kind]
        first = next(iter(REGISTRY), UNIFIED)  # the default table: the first registered modality's (the structure)
        default = first if first in self.tables else UNIFIED
        source = source or (allowed[0] if kind != MATERIAL else default)
        if source not in allowed:
            raise CMMAError(f"A {kind} query is encoded as {_either(allowed)}, not {source}: drop --from or "
                            f"pass the query that goes with it ({', '.join(_examples(flags=True))}).")
        if kind != MATERIAL and source not in self.modalities:
            raise CMMAError(f"Run {self.run!r} was not trained with the {source} modality (it has "
                            f"{', '.join(self.modalities)}): query from one of those, or train a run that includes "
                            f"{source} (cmma train --modalities ...).")
        target = target or default
        if target == INPUTS or target.startswith(INPUTS + "/"):
            return source, self.resolve_inputs(target)
        if target not in targets():
            raise CMMAError(f"--to must be one of {', '.join(targets())}, not {target!r}.")
        if target not in self.tables:
            trained = "" if target in self.modalities or target not in REGISTRY else \
                f" (run {self.run!r} was not trained with {target})"
            raise CMMAError(f"There is no {target} index for run {self.run!r}{trained}: pass --to one of "
                            f"{', '.join(self.tables)}.")
        return source, target

    def resolve_inputs(self, target: str) -> str:
        """``inputs/NAME[/TABLE]`` checked against what ``cmma embed --input`` wrote: ``inputs/NAME/TABLE``."""
        from cmma_cli.modalities import REGISTRY

        parts = target.split("/")
        found = self.inputs()
        listed = ", ".join(f"inputs/{n}" for n in found) or "none yet"
        make = f"`cmma embed --run {self.run} --input PATH` embeds your own files there"
        if len(parts) < 2 or not parts[1] or len(parts) > 3:
            raise CMMAError(f"--to {target!r}: write inputs/NAME or inputs/NAME/TABLE (this run's: {listed}); {make}.")
        name = parts[1]
        if name not in found:
            raise CMMAError(f"Run {self.run!r} has no embedded inputs named {name!r} in {self.dir / INPUTS} (it has: "
                            f"{listed}); {make}.")
        folder = self.dir / INPUTS / name
        have = [t for t in targets() if (folder / f"{t}.parquet").is_file() and (folder / f"{t}.faiss").is_file()]
        first = next(iter(REGISTRY), UNIFIED)
        table = parts[2] if len(parts) == 3 else (first if first in have else UNIFIED)
        if table not in have:
            raise CMMAError(f"inputs/{name} has no {table} index: pass --to inputs/{name}/ one of {', '.join(have)}.")
        return f"{INPUTS}/{name}/{table}"

    def stored_vector(self, material_id: str, source: str) -> np.ndarray:
        """The stored ``source`` embedding of an embedded material."""
        from cmma_cli.embeddings import extra_tables

        per_material = [t for t in self.tables if t not in extra_tables()]
        if source not in self.tables:
            raise CMMAError(f"Run {self.run!r} has no {source} embeddings: pass --from one of "
                            f"{', '.join(per_material)}.")
        ids, vectors = self.vectors(source)
        position = ids.get_indexer([material_id])[0]
        if position >= 0:
            return vectors[position]
        everywhere = self.ids(UNIFIED)["material_id"] if UNIFIED in self.tables else pd.Series([], dtype=str)
        if material_id in set(everywhere):
            has = [t for t in per_material if t != UNIFIED and material_id in set(self.ids(t)["material_id"])]
            raise CMMAError(f"Material {material_id!r} has no {source} embedding (it has {', '.join(has)}): pass "
                            f"--from {has[0] if has else UNIFIED}.")
        close = difflib.get_close_matches(material_id, list(everywhere), n=3)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise CMMAError(f"Unknown material id {material_id!r}: no material with that id was embedded in run "
                        f"{self.run!r}{hint}; check the id against processed/materials.parquet.")

    def encode(self, query: Query, source: str) -> np.ndarray:
        """The ``(d,)`` query vector in the shared space."""
        kind = query.kind
        if kind == MATERIAL:
            return self.stored_vector(str(query.value), source)
        return self.encoder([source]).embed_query(query_options()[kind], query.value, source)

    def allowed(self, target: str, filters: list[Filter]) -> np.ndarray | None:
        """Which rows of ``target`` pass every filter (None: no filters)."""
        if not filters:
            return None
        frame = self.properties(target).reindex(self.ids(target)["material_id"].astype(str))
        mask = np.ones(len(frame), dtype=bool)
        for f in filters:
            mask &= f.mask(frame.reset_index())
        return mask

    def search(self, vector: np.ndarray, target: str, k: int, filters: list[Filter] | None = None) -> list[dict[str, Any]]:
        """The ``k`` best rows of ``target`` for ``vector``, with their properties, best first."""
        from cmma_cli.index import search

        if k < 1:
            raise CMMAError(f"-k must be at least 1, not {k}.")
        mask = self.allowed(target, filters or [])
        index = self.index(target)
        if index.ntotal == 0 or (mask is not None and not mask.any()):
            return []
        scores, rows = search(index, vector[None, :], k, mask)
        keep = rows[0] >= 0
        hits = self.ids(target).iloc[rows[0][keep]].reset_index(drop=True)
        wanted = list(dict.fromkeys([*KEY_PROPERTIES, *(f.column for f in filters or [])]))
        props = self.properties(target)
        found = props.reindex(hits["material_id"].astype(str))[[c for c in wanted if c in props.columns]]
        found = found.reset_index(drop=True)
        out = []
        for rank, (score, ident, prop) in enumerate(zip(scores[0][keep], hits.to_dict("records"),
                                                        found.to_dict("records")), start=1):
            record = {key: _clean(value) for key, value in ident.items()}
            for key in wanted:
                record.setdefault(key, _clean(prop.get(key)))
            out.append({"rank": rank, "score": round(float(score), 6), **record})
        return out

    def query(self, query: Query, source: str | None = None, target: str | None = None, k: int = 10,
              filters: list[str] | None = None) -> Result:
        """Encode ``query`` and search: a :class:`Result` with separate load / encode / search timings."""
        parsed = [Filter.parse(f) for f in filters or []]
        source, target = self.resolve(query, source, target)
        self.prepare(query.kind, source, target)
        t0 = time.perf_counter()
        vector = self.encode(query, source)
        t1 = time.perf_counter()
        rows = self.search(vector, target, k, parsed)
        t2 = time.perf_counter()
        timing = {"load": round(self.load_seconds * 1000, 3), "encode": round((t1 - t0) * 1000, 3),
                  "search": round((t2 - t1) * 1000, 3)}
        return Result(self.run, query.describe(), source, target, k, [str(f) for f in parsed],
                      int(self.index(target).ntotal), rows, timing, self.query_warnings(query))

    def query_warnings(self, query: Query) -> list[str]:
        """Sentences about a query that make its hits less trustworthy: a measured pattern covering little of the grid."""
        if query.kind != PATTERN_QUERY:
            return []
        grid = (read_manifest(self.ws.processed) or {}).get(PATTERN_GRID)
        found = pattern_coverage(query.value, grid) if grid else None
        if found is None or found[0] >= MIN_PATTERN_COVERAGE:
            return []
        share, first, last = found
        return [f"The pattern {query.value} covers 2-theta {first:.1f}-{last:.1f} degrees, {share:.0%} of the "
                f"{float(grid['two_theta_min']):g}-{float(grid['two_theta_max']):g} degree grid the run compares it on "
                "(the rest is zeros): these hits rest on that part alone, so measure a wider range if you can."]


def search(ws: Workspace, query: Query, cfg: RetrieveConfig) -> Result:
    """One query of ``cmma retrieve``: load the run's embeddings, encode, search."""
    return Retriever(ws, cfg.run, cfg.device, cfg.threads).query(query, cfg.source, cfg.target, cfg.k, cfg.filters)


# ---------------------------------------------------------------------------------------------- output

_FORMATS = {"band_gap": ("band gap (eV)", "{:.2f}"), "formation_energy_per_atom": ("E_form (eV/atom)", "{:.3f}"),
            "energy_above_hull": ("E_hull (eV/atom)", "{:.3f}")}


def render(result: Result, width: int | None = None):
    """A rich table of the results: rank, id, formula, score, crystal system and the key properties.

    Ids never get cut: their column folds a long id onto more lines instead of an ellipsis. On a narrow
    terminal (``width``) the least important columns go first (extra properties, then the crystal system).
    """
    from rich.table import Table

    title = esc(f"{result.query['kind']} -> {result.target} ({result.index_size} vectors, run {result.run})"
                + (f", filters {' '.join(result.filters)}" if result.filters else ""))
    from cmma_cli.embeddings import extra_tables

    table_name = result.target.rsplit("/", 1)[-1]
    row_key = extra_tables().get(table_name)  # a table whose rows are not materials (recipes): their id first
    shown = [key for key in _FORMATS if any(r.get(key) is not None for r in result.rows)]
    extra = [Filter.parse(f).column for f in result.filters]
    extra = [c for c in dict.fromkeys(extra) if c not in _FORMATS and c not in KEY_PROPERTIES]
    # (header, cell of a row, justify, must keep); cells are the user's data: escaped, never markup
    columns: list[tuple[str, Any, str, bool]] = [("rank", lambda r: str(r["rank"]), "right", True)]
    if row_key:
        columns.append((row_key.removesuffix("_id"), lambda r: str(r.get(row_key)), "left", True))
    columns += [("material", lambda r: str(r["material_id"]), "left", True),
                ("formula", lambda r: str(r.get("formula") or ""), "left", True),
                ("score", lambda r: f"{r['score']:.4f}", "right", True),
                ("crystal system", lambda r: str(r.get("crystal_system") or ""), "left", False)]
    columns += [(_FORMATS[k][0], lambda r, k=k: _FORMATS[k][1].format(r[k]) if r.get(k) is not None else "", "right",
                 False) for k in shown]
    columns += [(k, lambda r, k=k: "" if r.get(k) is None else str(r[k]), "right", True) for k in extra]
    if table_name == UNIFIED:
        columns.append(("modalities", lambda r: ",".join(r.get("modalities") or []), "left", False))
    cells = [[fn(r) for _, fn, _, _ in columns] for r in result.rows]

    def needed(i: int) -> int:  # the column's widest cell (or header word), plus rich's padding and border
        return max([len(columns[i][0].split()[0] if columns[i][0] else "")] + [len(c[i]) for c in cells]) + 3

    keep = list(range(len(columns)))
    if width:  # drop what matters least until the ids fit unfolded: modalities, properties, crystal system
        droppable = [i for i in reversed(range(len(columns))) if not columns[i][3]]
        while droppable and sum(needed(i) for i in keep) + 1 > width:
            keep.remove(droppable.pop(0))
    table = Table(title=title, title_justify="left")
    for i in keep:
        header, _, justify, _ = columns[i]
        is_id = header in ("material", "formula") or (row_key and header == row_key.removesuffix("_id"))
        table.add_column(esc(header), justify=justify, overflow="fold", no_wrap=False,
                         min_width=min(needed(i) - 3, 40) if is_id else None)
    for row in cells:
        table.add_row(*(esc(row[i]) for i in keep))
    return table


def to_json(result: Result) -> str:
    """The ``--json`` output."""
    return json.dumps(result.to_dict(), indent=2)


def run_retrieve(ws: Workspace, query: Query, cfg: RetrieveConfig, as_json: bool = False) -> Result:
    """What ``cmma retrieve`` does: search, then print the table (or ``--json``) on stdout, timings on stderr."""
    import sys

    from rich.console import Console

    result = search(ws, query, cfg)
    for warning in result.warnings:
        console.print(f"[yellow]Warning:[/] {esc(warning)}", highlight=False, soft_wrap=True)
    if as_json:
        sys.stdout.write(to_json(result) + "\n")
        return result
    if not result.rows:
        if result.filters:
            message = (f"No {result.target} entry of run {result.run} passes the filters {' '.join(result.filters)}: "
                       "loosen them.")
        else:
            message = (f"The {result.target} index of run {result.run} is empty ({result.index_size} vectors), so "
                       f"nothing can match: run `cmma embed --run {result.run} --force` to rebuild it.")
        console.print(esc(message), highlight=False, soft_wrap=True)
        return result
    out = Console(width=None if sys.stdout.isatty() else 160)
    out.print(render(result, width=out.width))
    t = result.timing_ms
    console.print(f"encode {t['encode']:.1f} ms, search {t['search']:.1f} ms (loading {t['load'] / 1000:.1f} s)",
                  highlight=False, soft_wrap=True)
    return result
