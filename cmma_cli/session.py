"""The Python API for notebooks: one trained run, loaded once, with the code the commands use.

::

    import cmma_cli

    s = cmma_cli.load("data/demo", run="demo")          # the newest run with embeddings when run is None
    s.search("Rock salt structure: sodium bonded to six chlorine atoms", k=5)      # a DataFrame
    s.search(structure, to="unified")                   # a pymatgen Structure, a CIF path, a pattern file,
    s.search("mp-149", filter="band_gap>1")             # ... a material id, or a vector
    X = s.encode(structures=["LiFePO4.cif", structure]) # (n, d) numpy array, rows L2-normalised
    s.embeddings("unified")                             # DataFrame: material_id, ..., embedding
    s.identify("scan.xy", elements=["Ti", "O"])         # cmma identify's answer for one pattern

A :class:`Session` wraps a :class:`~cmma_cli.retrieve.Retriever` (indexes, ids, properties and, on first need,
the run's :class:`~cmma_cli.encode.Encoder`) and, for :meth:`Session.identify`, an
:class:`~cmma_cli.identify.pipeline.Identifier` per set of options. ``cmma serve`` answers over HTTP with one
Session. Nothing heavy is imported until it is needed: a material-id search never imports torch, a structure or
pattern query never imports the text model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import numpy as np
import pandas as pd

from cmma_cli.errors import CMMAError

if TYPE_CHECKING:  # pragma: no cover
    from cmma_cli.identify.pipeline import Identification
    from cmma_cli.modalities.base import UserInputs
    from cmma_cli.workspace import Workspace

#: ``encode()``'s keywords and the query option (``cmma retrieve --<option>``) of the modality each one feeds.
def _encode_kinds() -> dict[str, str]:
    from cmma_cli.modalities import REGISTRY

    return {f"{m.query_option}s": m.query_option for m in REGISTRY.values() if m.query_option}


ENCODE_KINDS = _encode_kinds()  # a keyword per query option: structures=, texts=, patterns=, ...
#: The map of the latent space ``cmma evaluate`` writes beside its figures (``material_id``, ``method``, ``x``, ``y``).
MAP_FILE = "maps.parquet"


def load(workspace: str | Path | None = None, run: str | None = None, device: str = "cpu",
         threads: int | None = None) -> "Session":
    """A :class:`Session` on run ``run`` (None: the newest with embeddings) of ``workspace`` (None: ``-w``'s
    default, ``$CMMA_WORKSPACE`` else ``./data``)."""
    from cmma_cli.workspace import Workspace

    return Session(Workspace.resolve(None if workspace is None else Path(workspace)), run, device, threads)


class Session:
    """One run's embeddings and encoders, loaded once, for many queries (see the module's example)."""

    def __init__(self, ws: "Workspace", run: str | None = None, device: str = "cpu", threads: int | None = None):
        from cmma_cli.retrieve import Retriever

        self.ws = ws
        self.retriever: Retriever = Retriever(ws, run, device, threads)
        self.run: str = self.retriever.run
        self._identifiers: dict[tuple, Any] = {}
        self._map: pd.DataFrame | None = None
        self._recipes: pd.DataFrame | None = None
        self._structures: pd.DataFrame | None = None

    def __repr__(self) -> str:
        return (f"<cmma Session run={self.run!r} workspace={str(self.ws.root)!r} modalities={self.modalities} "
                f"tables={self.tables}>")

    # ------------------------------------------------------------------------------------------ facts

    @property
    def modalities(self) -> list[str]:
        """The modalities the run was trained with."""
        return list(self.retriever.modalities)

    @property
    def tables(self) -> list[str]:
        """The embeddings tables that have an index (what ``to=`` takes)."""
        return list(self.retriever.tables)

    def properties(self) -> pd.DataFrame:
        """The processed scalar columns (formula, symmetry, properties), indexed by material id."""
        return self.retriever.properties()

    def embeddings(self, table: str = "unified") -> pd.DataFrame:
        """One embeddings table as a DataFrame: its id columns and ``embedding`` (a row of the ``(n, d)`` float32
        matrix, which :meth:`vectors` gives whole)."""
        ids, vectors = self.vectors(table)
        frame = self.retriever.ids(table).reset_index(drop=True)
        frame["embedding"] = list(vectors)
        return frame

    def vectors(self, table: str = "unified") -> tuple[pd.Index, np.ndarray]:
        """``(material ids, (n, d) float32 vectors)`` of one embeddings table."""
        if table not in self.retriever.tables:
            raise CMMAError(f"Run {self.run!r} has no {table} embeddings: pick one of {', '.join(self.tables)}.")
        return self.retriever.vectors(table)

    # ----------------------------------------------------------------------------------------- encode

    def encode(self, structures: Any = None, texts: Any = None, patterns: Any = None, compositions: Any = None,
               source: str | None = None, **others: Any) -> np.ndarray | dict[str, np.ndarray]:
        """Embeddings of new inputs in the run's shared space, one L2-normalised row per input, in order.

        ``structures``: pymatgen ``Structure``s, CIF paths (``str`` or ``Path``) or CIF text; ``texts``: strings;
        ``patterns``: pattern files (any format ``cmma retrieve --pattern`` reads), ``(n, 2)`` arrays of 2-theta
        and intensity (read like a file: background removed, put on the run's grid), or 1-D arrays already on
        the run's 2-theta grid; ``compositions`` (also ``formulas``): formulas (``"LiFePO4"``), pymatgen
        ``Composition``s or ``{element: amount}`` dicts, for a run trained with the composition modality. Any other
        modality's query option works the same way (``images=...``). One item or a list of them. ``source``: the
        encoder they go through (a structure may go through ``xrd``, as its computed pattern); default each
        kind's own. With one keyword the answer is an ``(n, d)`` array; with several, ``{keyword: array}``.
        """
        if compositions is not None:
            others.setdefault("formulas", compositions)
        unknown = sorted(set(others) - set(ENCODE_KINDS))
        if unknown:
            raise CMMAError(f"encode() takes {', '.join(sorted({*ENCODE_KINDS, 'compositions'}))}=, not {unknown[0]}=.")
        given = {k: v for k, v in (("structures", structures), ("texts", texts), ("patterns", patterns),
                                   *others.items()) if v is not None}
        if not given:
            raise CMMAError("Nothing to encode: pass structures=..., texts=..., patterns=... or compositions=....")
        out = {k: self._encode_kind(k, _as_list(k, v), source) for k, v in given.items()}
        return next(iter(out.values())) if len(out) == 1 else out

    def _modality_of(self, keyword: str) -> str:
        from cmma_cli.retrieve import query_options

        option = ENCODE_KINDS[keyword]
        found = query_options().get(option)
        if found is None:
            raise CMMAError(f"No registered modality takes {keyword}.")
        return found

    def _encode_kind(self, keyword: str, items: list[Any], source: str | None) -> np.ndarray:
        from cmma_cli.modalities import get_modality

        name = self._modality_of(keyword)
        reader = get_modality(name)
        source = source or reader.query_sources()[0]
        if source not in reader.query_sources():
            raise CMMAError(f"{keyword} are encoded as {' or '.join(reader.query_sources())}, not {source}.")
        encoder = self.retriever.encoder()
        encoder.require(source, self.run)
        if not items:
            return np.zeros((0, encoder.dim), np.float32)
        got = _merge([self._read(keyword, name, item, str(i)) for i, item in enumerate(items)])
        self.retriever.warm(source)  # the query-time model (the frozen backbone, the sentence model)
        table, rejects = encoder.rows(reader, got, wanted=[source])
        target = get_modality(source)
        usable = all(c in table.column_names for c in target.columns) and \
            any(table.column(c).null_count < table.num_rows for c in target.columns)
        rows, vectors = target.embed_new(encoder, table) if usable else (np.zeros(0, np.int64), None)
        ids = [str(m) for m in table.column("material_id").to_pylist()]
        position = {ids[int(r)]: j for j, r in enumerate(rows)}
        missing = [i for i in range(len(items)) if str(i) not in position]
        if missing:
            reasons = [r["reason"] for r in [*got.rejects, *rejects]]
            i = missing[0]
            raise CMMAError(reader.unusable_query(_label(items[i]), reasons[0] if reasons else
                                                  f"it gives no {source} input"))
        return np.stack([vectors[position[str(i)]] for i in range(len(items))]).astype(np.float32)

    def _read(self, keyword: str, modality: str, item: Any, rid: str) -> "UserInputs":
        """One input as the modality's query row (id ``rid``), read by the modality as a query file is."""
        from cmma_cli.modalities import get_modality
        from cmma_cli.modalities.base import UserInputs

        reader = get_modality(modality)
        settings = self.retriever.encoder().settings(modality)
        if keyword == "structures" and not isinstance(item, (str, Path)) and hasattr(item, "to_json"):
            got = UserInputs(ids=[rid], structures=[item.to_json()])
        elif keyword == "structures" and isinstance(item, str) and "_cell_length_a" in item:
            from cmma_cli.sources.structures import parse_cif

            try:
                got = UserInputs(ids=[rid], structures=[parse_cif(item).to_json()])
            except ValueError as exc:
                raise CMMAError(f"Could not read the CIF text ({exc}): pass a valid CIF.") from None
        elif keyword == "patterns" and isinstance(item, np.ndarray):
            got = self._pattern_array(reader, settings, item, rid)
        elif keyword == "texts" or (isinstance(item, str) and not reader.query_is_file):
            got = reader.read_query(str(item), settings)
        elif not reader.query_is_file and isinstance(item, dict):  # {element: amount}
            got = reader.read_query("".join(f"{el}{amount}" for el, amount in item.items()), settings)
        elif not reader.query_is_file and hasattr(item, "formula"):  # a pymatgen Composition
            got = reader.read_query(str(item.formula).replace(" ", ""), settings)
        elif isinstance(item, (str, Path)):
            got = reader.read_query(Path(item).expanduser(), settings)
        else:
            raise CMMAError(f"Cannot encode a {type(item).__name__} as {keyword}: see help(Session.encode).")
        got.ids = [rid] * len(got.ids)
        return got

    def _pattern_array(self, reader, settings, array: np.ndarray, rid: str) -> "UserInputs":
        from cmma_cli.modalities.base import UserInputs
        from cmma_cli.retrieve import PATTERN_GRID
        from cmma_cli.workspace import read_manifest

        array = np.asarray(array, dtype=np.float64)
        grid = (read_manifest(self.ws.processed) or {}).get(PATTERN_GRID) or {}
        if array.ndim == 2 and array.shape[1] == 2:  # 2-theta and intensity: read like a measured file
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{rid}.xy"
                np.savetxt(path, array)
                return reader.read_query(path, settings)
        if array.ndim == 1 and grid and array.size == int(grid.get("size", -1)):
            peak = float(np.nanmax(array)) if array.size else 0.0
            if not np.isfinite(peak) or peak <= 0:
                raise CMMAError("The pattern array is flat or not finite: pass a pattern with peaks.")
            # the processed columns of a pattern: intensities on the grid, max 1, and where it came from
            return UserInputs(ids=[rid], values={reader.fields[0].name: [(array / peak).astype(np.float32)],
                                                 reader.fields[1].name: ["measured"]})
        size = f"{int(grid['size'])} values on the {grid['two_theta_min']}-{grid['two_theta_max']} degree grid" \
            if grid else "the run's grid"
        raise CMMAError(f"A pattern array is either (n, 2) 2-theta and intensity or 1-D with {size}, not shape "
                        f"{array.shape}.")

    # ----------------------------------------------------------------------------------------- search

    def warm(self) -> float:
        """Load now what queries would load on first need (every index, id table and property, the encoders and
        their query-time models, the map), so the first answer is as fast as the next; returns the seconds."""
        import time

        from cmma_cli.modalities import get_modality
        from cmma_cli.retrieve import query_options

        started = time.perf_counter()
        for table in self.tables:
            self.retriever.index(table)
            self.retriever.ids(table)
            self.retriever.vectors(table)
        self.properties()
        self._structure_columns()
        sources = {s for name in query_options().values() for s in get_modality(name).query_sources()}
        if any(s in self.modalities for s in sources):
            for source in [m for m in self.modalities if m in sources]:
                self.retriever.warm(source)
        self.map()
        return time.perf_counter() - started

    def search(self, query: Any, to: str | None = None, k: int = 10, filter: str | Iterable[str] | None = None,
               source: str | None = None) -> pd.DataFrame:
        """The ``k`` nearest entries of table ``to`` (default: the first modality's, as ``cmma retrieve``) to
        ``query``: a text, a pymatgen ``Structure``, a path to a CIF or a pattern file, a material id (its stored
        vector), a pattern array (see :meth:`encode`) or a vector of the run's width. ``filter``: ``"band_gap>1"``
        or a list of them; ``source``: the encoder the query goes through (``cmma retrieve --from``).

        The DataFrame has ``rank``, ``score`` (cosine), the ids and the key properties; ``.attrs`` holds the query,
        ``from``, ``to``, the timings in ms and any warnings.
        """
        rows, attrs = self._search(query, to, k, filter, source)
        return _frame(rows, attrs)

    def search_json(self, query: Any, to: str | None = None, k: int = 10,
                    filter: str | Iterable[str] | None = None, source: str | None = None) -> dict[str, Any]:
        """:meth:`search` as the ``cmma retrieve --json`` document: ``query``, ``from``, ``to``, ``k``, ``filters``,
        ``timing_ms``, ``results`` (a list of rows), ``warnings``."""
        rows, attrs = self._search(query, to, k, filter, source)
        return {**attrs, "results": rows}

    def _search(self, query: Any, to: str | None, k: int, filter: str | Iterable[str] | None,
                source: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        from cmma_cli.retrieve import MATERIAL, Filter, Query

        filters = [filter] if isinstance(filter, str) else list(filter or [])
        kind, value = self.classify(query)
        if kind in ("vector", "structure_object", "pattern_array"):
            import time

            parsed = [Filter.parse(f) for f in filters]
            keyword = {"structure_object": "structures", "pattern_array": "patterns"}.get(kind)
            as_query = Query(**{ENCODE_KINDS[keyword]: "(object)"}) if keyword else Query(material="(vector)")
            chosen, target = self.retriever.resolve(as_query, source if keyword else None, to)
            chosen = chosen if keyword else "vector"
            started = time.perf_counter()
            vector = self._vector(value) if kind == "vector" else self._encode_kind(keyword, [value], chosen)[0]
            encoded = time.perf_counter()
            rows = self.retriever.search(vector, target, k, parsed)
            done = time.perf_counter()
            return rows, {"query": {"kind": kind.split("_")[0], "value": _label(value)}, "from": chosen,
                          "to": target, "k": k, "filters": filters, "warnings": [],
                          "timing_ms": {"encode": round((encoded - started) * 1000, 3),
                                        "search": round((done - encoded) * 1000, 3)}}
        result = self.retriever.query(Query(**{kind: value}) if kind != MATERIAL else Query(material=value),
                                      source, to, k, filters)
        return result.rows, {"query": result.query, "from": result.source, "to": result.target, "k": k,
                             "filters": result.filters, "warnings": result.warnings, "timing_ms": result.timing_ms,
                             "index_size": result.index_size}

    def classify(self, query: Any) -> tuple[str, Any]:
        """What kind of query ``query`` is: ``(kind, value)`` with kind a ``cmma retrieve`` query option
        (``text``, ``structure``, ``pattern``, ...), ``material``, or for in-memory objects ``vector``,
        ``structure_object``, ``pattern_array``."""
        from cmma_cli.retrieve import MATERIAL, query_options

        options = query_options()
        positional = next(iter(options), None)
        if isinstance(query, np.ndarray) or (isinstance(query, (list, tuple)) and query and
                                              all(isinstance(v, (int, float)) for v in query)):
            array = np.asarray(query)
            dim = self.retriever.manifest.get("dim")
            if array.ndim == 1 and dim and array.size == int(dim):
                return "vector", array
            return "pattern_array", array
        if not isinstance(query, (str, Path)) and hasattr(query, "to_json"):
            return "structure_object", query
        if isinstance(query, Path) or (isinstance(query, str) and "\n" not in query and len(query) < 4096
                                       and Path(query).expanduser().is_file()):
            from cmma_cli.embed_inputs import collect_inputs

            path = Path(query).expanduser()
            found = [m for m, files in collect_inputs([path]).files.items() if files]
            for option, name in options.items():
                if found and name == found[0]:
                    return option, path
            raise CMMAError(f"Cannot search with {path}: give a CIF, a pattern file or a text.")
        text = str(query)
        if text.strip() and self._is_material(text.strip()):
            return MATERIAL, text.strip()
        if positional is None or options[positional] not in self.modalities:
            raise CMMAError(f"{text!r} is no material id of run {self.run!r}, and the run reads no typed queries.")
        return positional, text

    def _is_material(self, text: str) -> bool:
        if " " in text or len(text) > 200:
            return False
        for table in self.retriever.tables:
            ids = self.retriever.ids(table)
            if "material_id" in ids and (ids["material_id"].astype(str) == text).any():
                return True
        return False

    def _vector(self, value: np.ndarray) -> np.ndarray:
        vector = np.asarray(value, dtype=np.float32).reshape(-1)
        norm = float(np.linalg.norm(vector))
        if not np.isfinite(norm) or norm == 0:
            raise CMMAError("The query vector is zero or not finite.")
        return vector / norm

    # -------------------------------------------------------------------------------------- materials

    def material(self, material_id: str, k: int = 5) -> dict[str, Any]:
        """One material: its properties, structure summary, which tables hold it, its ``k`` nearest neighbours in
        each of them (its own stored vector searched in the same table) and its recipes."""
        from cmma_cli.embeddings import extra_tables
        from cmma_cli.retrieve import _clean

        props = self.properties()
        if material_id not in props.index:
            import difflib

            close = difflib.get_close_matches(material_id, list(props.index.astype(str)), n=3)
            raise CMMAError(f"Unknown material id {material_id!r}" + (f" (close: {', '.join(close)})" if close else "")
                            + ".")
        row = {k_: _clean(v) for k_, v in props.loc[material_id].items()}
        neighbours: dict[str, list[dict[str, Any]]] = {}
        held = []
        for table in self.retriever.tables:
            if table in extra_tables():
                continue
            ids, vectors = self.retriever.vectors(table)
            at = ids.get_indexer([material_id])[0]
            if at < 0:
                continue
            held.append(table)
            hits = self.retriever.search(vectors[at], table, k + 1)
            neighbours[table] = [h for h in hits if h["material_id"] != material_id][:k]
        return {"material_id": material_id, "properties": row, "cell": self.structure_summary(material_id),
                "tables": held, "neighbours": neighbours, "recipes": self.recipes(material_id)}

    def structure_summary(self, material_id: str) -> dict[str, Any] | None:
        """Lattice parameters, volume and sites (element, fractional coordinates) from ``processed/``."""
        frame = self._structure_columns()
        if frame is None or material_id not in frame.index:
            return None
        r = frame.loc[material_id]
        if r.get("lattice") is None or r.get("atomic_numbers") is None:
            return None
        from pymatgen.core.periodic_table import Element

        m = np.asarray(r["lattice"], dtype=float).reshape(3, 3)
        lengths = np.linalg.norm(m, axis=1)

        def angle(i: int, j: int) -> float:
            return float(np.degrees(np.arccos(np.clip(m[i] @ m[j] / (lengths[i] * lengths[j]), -1, 1))))

        z = [int(v) for v in r["atomic_numbers"]]
        frac = np.asarray(r["frac_coords"], dtype=float).reshape(-1, 3) if r.get("frac_coords") is not None else None
        sites = [{"element": Element.from_Z(zi).symbol,
                  "frac": None if frac is None else [round(float(c), 4) for c in frac[i]]} for i, zi in enumerate(z)]
        return {"a": round(float(lengths[0]), 4), "b": round(float(lengths[1]), 4), "c": round(float(lengths[2]), 4),
                "alpha": round(angle(1, 2), 2), "beta": round(angle(0, 2), 2), "gamma": round(angle(0, 1), 2),
                "volume": round(float(abs(np.linalg.det(m))), 3), "nsites": len(z), "sites": sites[:200]}

    def _structure_columns(self) -> pd.DataFrame | None:
        if self._structures is None:
            import pyarrow.parquet as pq

            path = self.ws.processed / "materials.parquet"
            wanted = ["material_id", "lattice", "frac_coords", "atomic_numbers", "synthesis_texts", "recipe_ids"]
            have = [c for c in wanted if c in pq.ParquetFile(path).schema_arrow.names]
            frame = pq.read_table(path, columns=have).to_pandas()
            frame["material_id"] = frame["material_id"].astype(str)
            self._structures = frame.drop_duplicates("material_id").set_index("material_id")
        return self._structures

    def recipes(self, material_id: str) -> list[dict[str, Any]]:
        """The material's synthesis recipes: ``raw/synthesis.parquet``'s rows (DOI, reaction, precursors, the
        procedure), else the procedure texts ``processed/`` keeps."""
        from cmma_cli.retrieve import _clean

        if self._recipes is None:
            path = self.ws.raw / "synthesis.parquet"
            self._recipes = pd.read_parquet(path) if path.is_file() else pd.DataFrame(columns=["material_id"])
            if "material_id" in self._recipes:
                self._recipes["material_id"] = self._recipes["material_id"].astype(str)
        found = self._recipes[self._recipes["material_id"] == material_id] if "material_id" in self._recipes else []
        keep = ["recipe_id", "doi", "synthesis_type", "target_formula", "reaction_string", "precursors",
                "paragraph_string"]
        out = [{c: _jsonable(r.get(c)) for c in keep if c in r} for r in
               (found.to_dict("records") if len(found) else [])]
        if out:
            return out
        frame = self._structure_columns()
        if frame is None or material_id not in frame.index or "synthesis_texts" not in frame:
            return []
        texts = frame.loc[material_id, "synthesis_texts"]
        ids = frame.loc[material_id, "recipe_ids"] if "recipe_ids" in frame else None
        texts = [] if texts is None else list(texts)
        ids = list(ids) if ids is not None else [None] * len(texts)
        return [{"recipe_id": _clean(i), "paragraph_string": str(t)} for i, t in zip(ids, texts)]

    # -------------------------------------------------------------------------------------------- map

    def map(self) -> pd.DataFrame:
        """2-D coordinates of every material's unified embedding: the map ``cmma evaluate`` wrote to
        ``reports/<run>/`` when there is one (UMAP / t-SNE), else a PCA projection made here. Columns:
        ``material_id``, ``x``, ``y``, ``method`` and the key properties."""
        if self._map is None:
            from cmma_cli.retrieve import KEY_PROPERTIES, UNIFIED

            found = self._stored_map()
            if found is None:
                table = UNIFIED if UNIFIED in self.tables else self.tables[0]
                ids, vectors = self.vectors(table)
                found = pd.DataFrame({"material_id": [str(m) for m in ids]})
                xy = _pca2(vectors)
                found["x"], found["y"], found["method"] = xy[:, 0], xy[:, 1], "pca"
            props = self.properties()
            numeric = [c for c in props.columns if pd.api.types.is_numeric_dtype(props[c])
                       and not pd.api.types.is_bool_dtype(props[c])]
            wanted = [c for c in dict.fromkeys([*KEY_PROPERTIES, *numeric]) if c in props.columns]
            joined = props.reindex(found["material_id"])[wanted].reset_index(drop=True)
            self._map = pd.concat([found.reset_index(drop=True), joined], axis=1)
        return self._map

    def _stored_map(self) -> pd.DataFrame | None:
        """The 2-D map ``cmma evaluate`` computed (``reports/<run>/figures/maps.parquet``: UMAP first), if any."""
        path = self.ws.reports_dir(self.run) / "figures" / MAP_FILE
        if not path.is_file():
            return None
        try:
            frame = pd.read_parquet(path, columns=["material_id", "method", "x", "y"])
        except Exception:  # noqa: BLE001 - a damaged map is replaced by PCA, not an error
            return None
        methods = [m for m in ("umap", "tsne") if m in set(frame["method"])] or list(frame["method"].unique()[:1])
        frame = frame[frame["method"] == methods[0]] if methods else frame
        frame["material_id"] = frame["material_id"].astype(str)
        return frame[["material_id", "x", "y", "method"]].reset_index(drop=True)

    # --------------------------------------------------------------------------------------- identify

    def identify(self, pattern: Any, **options: Any) -> "Identification":
        """``cmma identify`` for one pattern (a file, or an ``(n, 2)`` array of 2-theta and intensity); ``options``
        are :class:`~cmma_cli.config.IdentifyConfig`'s fields (``elements=["Ti", "O"]``, ``max_phases=2``,
        ``references=[...]``, ``wavelength="CuKa"``, ...; ``run`` defaults to this session's). The candidates
        are loaded once per set of options."""
        from dataclasses import fields

        from cmma_cli.config import IdentifyConfig
        from cmma_cli.identify.pipeline import Identifier

        known = {f.name for f in fields(IdentifyConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise CMMAError(f"identify() got unknown options {', '.join(unknown)}: it takes {', '.join(sorted(known))}.")
        for key in ("elements", "references"):
            if isinstance(options.get(key), (str, Path)):
                options[key] = [str(options[key])]
        options.setdefault("run", self.run)
        key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
        if key not in self._identifiers:
            self._identifiers[key] = Identifier(self.ws, IdentifyConfig(**options))
        identifier = self._identifiers[key]
        if isinstance(pattern, np.ndarray):
            array = np.asarray(pattern, dtype=float)
            if array.ndim != 2 or array.shape[1] != 2:
                raise CMMAError(f"identify() takes a pattern file or an (n, 2) array of 2-theta and intensity, not "
                                f"shape {array.shape}.")
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "pattern.xy"
                np.savetxt(path, array)
                return identifier.identify(path)
        return identifier.identify(Path(pattern).expanduser())


# ------------------------------------------------------------------------------------------- helpers


def _as_list(keyword: str, value: Any) -> list[Any]:
    """One input or a list of them (a 1-D / (n, 2) array is one pattern; a list of arrays, several)."""
    if isinstance(value, (str, Path, np.ndarray)) or hasattr(value, "to_json"):
        return [value]
    try:
        return list(value)
    except TypeError:
        raise CMMAError(f"{keyword}= takes one input or a list of them, not a {type(value).__name__}.") from None


def _merge(parts: list["UserInputs"]) -> "UserInputs":
    """Several one-row reads as one table's worth (values, structures and rejects side by side)."""
    from cmma_cli.modalities.base import UserInputs

    out = UserInputs()
    keys = list(dict.fromkeys(k for p in parts for k in p.values))
    has_structures = any(p.structures is not None for p in parts)
    out.structures = [] if has_structures else None
    for p in parts:
        n = len(p.ids)
        out.ids += p.ids
        for key in keys:
            out.values.setdefault(key, []).extend(p.values.get(key, [None] * n))
        if has_structures:
            out.structures += p.structures if p.structures is not None else [None] * n
        out.rejects += p.rejects
        out.materials += p.materials
    return out


def _label(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array{tuple(value.shape)}"
    if hasattr(value, "composition") and not isinstance(value, (str, Path)):
        return f"Structure {value.composition.reduced_formula}"
    text = str(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _jsonable(value: Any) -> Any:
    from cmma_cli.retrieve import _clean

    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return _clean(value)


def _frame(rows: list[dict[str, Any]], attrs: dict[str, Any]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame.attrs.update(attrs)
    return frame


def _pca2(vectors: np.ndarray) -> np.ndarray:
    """The first two principal components of ``vectors`` (zeros for fewer than two rows)."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.shape[0] < 2:
        return np.zeros((x.shape[0], 2))
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    xy = x @ vt[:2].T
    if xy.shape[1] < 2:
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    return xy
