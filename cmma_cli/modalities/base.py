"""What every modality provides, stage by stage. A modality is one module (or one small package) under
``modalities/`` plus one line in :data:`cmma_cli.modalities.REGISTRY`; no other module names it.

**Its settings.** ``preprocess_config`` and ``train_config`` are dataclasses (or None). Their fields become
options of ``cmma preprocess`` / ``cmma train`` and keys of a TOML ``--config`` file, named ``<modality>_<field>``
(``xrd_channels`` -> ``--xrd-channels``) unless the field's metadata names a flag (``field(metadata={"flag":
"cutoff"})``) and limited to ``metadata["choices"]`` (a tuple, or a function returning one) when given. The
help text is the field's trailing comment. Code reads them nested: ``cfg.xrd.channels``.

**preprocess** (``raw/`` -> ``processed/materials.parquet``):

1. :meth:`Modality.check` -- the preprocess settings, one sentence per mistake, before any data is read;
2. :meth:`Modality.gather` -- once, in the main process: what the modality needs per material from the
   raw tables or a user folder (texts, file paths), as ``{material_id: value}``; rejects go to ``ctx``;
3. :meth:`Modality.featurize` -- per material, in worker processes: the modality's processed columns from
   the parsed structure (or None) and what ``gather`` found for that material. ``fields`` lists the columns
   with their Arrow types; :meth:`Modality.tally` adds the modality's counts to the manifest.
4. :meth:`Modality.gather_recipes` -- what it finds in each synthesis recipe, which becomes a row of its own
   without a structure (``processed/recipes.parquet``; :mod:`cmma_cli.preprocess.recipes`): the recipe's text,
   its target's composition. ``featurize`` then runs on those rows as on materials.

**train** (the model):

1. :meth:`Modality.spec` -- the JSON-able facts needed to rebuild its encoder without the data (the
   XRD grid length, the text model, the graph cutoff); checkpoints store it.
2. :meth:`Modality.prepare` -- once per run: the table's columns as flat numpy arrays (plus
   ``present``, which rows have this modality), cheap to slice and to send to loader workers.
3. :meth:`Modality.collate` -- per batch: the inputs of the given rows (all of which have the
   modality), as tensors. It runs in data-loader workers, so it is numpy, not Python loops.
4. :meth:`Modality.encoder` builds the ``nn.Module`` that maps those inputs to one vector per row
   (``out_dim`` wide); the shared projection heads and normalisation live in :mod:`cmma_cli.model`.

**evaluate** (``cmma evaluate`` / ``cmma ablate``):

1. ``evaluate_config`` -- its evaluate settings (``cfg.xrd.region``), flat-named like the others;
2. :attr:`Modality.attribution` / :attr:`Modality.explain_anchor` -- whether and over what it explains a
   cross-modal similarity; :meth:`Modality.attribute` computes its side of one material's pair (torch code
   in a sibling ``explain`` module, imported lazily) and :meth:`Modality.attribution_text` words it;
3. :meth:`Modality.ablation_variants` -- what ``cmma ablate encoder`` varies in its training section.

**embed and retrieve** (a user's own files, ``cmma embed --input`` and ``cmma retrieve``):

1. :meth:`Modality.claim_input` -- which user files it reads (by suffix, or a table's columns);
   :meth:`Modality.read_inputs` / :meth:`Modality.read_query` turn them into processed-like rows
   (:class:`UserInputs`). A modality whose files are whole materials (:attr:`Modality.whole_materials`:
   CIFs) gives structures instead, which every modality featurizes exactly as ``cmma preprocess`` does,
   with the other modalities' files named like them as their linked inputs (:meth:`Modality.link_inputs`);
2. :meth:`Modality.embed_processed` -- the embeddings tables ``cmma embed`` writes for it (its own, plus
   :attr:`Modality.embed_tables`); :meth:`Modality.embed_new` -- the vectors of a user's rows;
3. :attr:`Modality.query_option` -- its ``cmma retrieve --<option>`` (or the positional query) and
   :meth:`Modality.query_sources`, the encoders its query can go through.

Modules of a modality import torch and other heavy libraries inside functions (or from a sibling module
that only its ``encoder`` imports): the registry is read to build the command line, which must start fast.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pyarrow as pa

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.columns import column_array

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import torch
    from pymatgen.core import Structure

    from cmma_cli.encode import Encoder


@dataclass
class Context:
    """What ``spec`` and ``prepare`` may need beyond the table: the processed manifest and a cache folder."""

    processed_manifest: dict[str, Any]
    cache_dir: Path | None = None
    show_progress: bool = True


class Prepared:
    """A modality's data for every row of a table; ``present[i]`` says whether row ``i`` has it."""

    present: np.ndarray


@dataclass
class GatherContext:
    """What :meth:`Modality.gather` may read: the raw folder, the material ids, and a list for reject rows."""

    raw_dir: Path
    material_ids: set[str]
    rejects: list[dict[str, str]] = field(default_factory=list)  # {"source", "item", "reason"}


@dataclass
class Item:
    """One material on its way through :meth:`Modality.featurize` (in a worker process).

    ``structure`` is None when the raw row has none that parses; a modality that finds the structure
    unusable for every structure-derived view (overlapping atoms, say) records why and sets it to None, so
    modalities after it in the registry see None too.
    """

    material_id: str
    structure: "Structure | None"
    linked: dict[str, Any]  # {modality: what its gather() found for this material}
    rejects: list[tuple[str, str, str]] = field(default_factory=list)  # (source, item, reason)

    def reject(self, source: str, item: str, reason: str) -> None:
        self.rejects.append((source, item, reason))


# ---- embed and retrieve


@dataclass
class UserInputs:
    """A modality's share of a user's own files (``cmma embed --input``) or one query (``cmma retrieve``), as
    processed-like rows: what :meth:`Modality.read_inputs` and :meth:`Modality.read_query` return.

    Either ``values`` holds the modality's own processed columns, one value per row, or (a modality whose
    files are whole materials) ``structures`` holds each row's structure JSON, from which every modality's
    columns are computed by :func:`cmma_cli.preprocess.featurize.featurize`; ``linked`` then holds what the
    other modalities' :meth:`Modality.link_inputs` found for those materials (a measured pattern ``a.xy``
    beside ``a.cif``), in the form their ``gather`` gives it: ``{modality: {material_id: value}}``.
    """

    ids: list[str] = field(default_factory=list)  # one per usable input
    values: dict[str, list[Any]] = field(default_factory=dict)  # {processed column: one value per row}
    structures: list[Any] | None = None  # whole materials: one structure JSON per row
    linked: dict[str, dict[str, Any]] = field(default_factory=dict)  # {modality: {material_id: linked input}}
    materials: list[dict[str, Any]] = field(default_factory=list)  # a row per input for materials.parquet (material_id, kind, file, ...)
    rejects: list[dict[str, str]] = field(default_factory=list)  # {"source", "item", "reason"}

    def table(self, fields_: tuple[pa.Field, ...]) -> pa.Table:
        """``material_id`` and the columns ``fields_`` describe (null where ``values`` lacks one)."""
        columns: dict[str, Any] = {"material_id": pa.array(self.ids, pa.string())}
        for f in fields_:
            columns[f.name] = column_array(self.values.get(f.name, [None] * len(self.ids)), f)
        return pa.table(columns)


# ------------------------------------------------------------------------------------------ evaluate


@dataclass
class ExplainContext:
    """What :meth:`Modality.attribute` may read beside its inputs: the material's processed row and settings."""

    row: pa.Table  # the material's processed row (one row: material_id, formula and the run's modality columns)
    spec: dict[str, Any]  # this modality's encoder spec (from the checkpoint)
    settings: Any  # this modality's evaluate section (``cfg.<name>``), or None when it declares none
    processed_manifest: dict[str, Any]  # the processed manifest (grids and other facts preprocess recorded)
    partner: str = ""  # the other modality of the pair
    top: int = 8  # how many of the strongest items to list


@dataclass
class Attribution:
    """One modality's side of an explained pair of one material.

    ``fields`` (JSON-able) join the pair's record in ``metrics.json`` and the explain JSON; ``plot(ax)``
    draws them on a matplotlib axis for the pair's figure (None: no panel).
    """

    fields: dict[str, Any]
    plot: Callable[[Any], None] | None = None


def flat_name(modality: str, f: Any) -> str:
    """The flat name (command-line flag with underscores, TOML key, config keyword) of field ``f`` of a
    modality's settings: ``<modality>_<field>``, unless the field's metadata names a ``flag``."""
    return f.metadata.get("flag", f"{modality}_{f.name}")


class Modality(ABC):
    """Base class of a modality; instances are registered in :mod:`cmma_cli.modalities`."""

    name: str = ""
    columns: tuple[str, ...] = ()  # the processed columns its encoder reads
    fields: tuple[pa.Field, ...] = ()  # every processed column preprocess writes for it, with its Arrow type
    train_config: type | None = None  # dataclass of its training settings (cfg.<name>)
    preprocess_config: type | None = None  # dataclass of its preprocess settings (cfg.<name>)
    evaluate_config: type | None = None  # dataclass of its evaluate settings (cfg.<name>)
    derived_keys: frozenset[str] = frozenset()  # spec entries measured on the data, not grounds to refuse a resume
    default: bool = False  # trained when ``--modalities`` is not given

    # ------------------------------------------------------------------------------------ preprocess

    #: A user folder of ``<material_id>.<suffix>`` files it reads in preprocess (measured patterns, images):
    #: the preprocess setting that names the folder (None: no folder), the suffixes, and the reject source.
    folder_setting: str | None = None
    folder_suffixes: tuple[str, ...] = ()
    folder_source: str = ""

    def check(self, cfg: Any) -> None:
        """Refuse bad preprocess settings (``cfg`` is this modality's section) with one sentence each; by
        default, a user folder that does not exist."""
        folder = self.folders(cfg).get(self.folder_setting or "")
        if folder and not Path(folder).expanduser().is_dir():
            raise CMMAError(f"The folder {folder} given to {self.folder_flag()} does not exist: pass a folder of "
                            "<material_id> files.")

    def folder_flag(self) -> str:
        """The command-line flag of its folder setting (``--xrd-dir``)."""
        f = next(f for f in dataclass_fields(self.preprocess_config) if f.name == self.folder_setting)
        return "--" + flat_name(self.name, f).replace("_", "-")

    def folder_files(self, cfg: Any, ctx: GatherContext) -> dict[str, Path]:
        """``{material_id: file}`` in its user folder (files named like no material, or of another type, are rejects)."""
        folder = self.folders(cfg).get(self.folder_setting or "")
        if not folder:
            return {}
        from cmma_cli.preprocess.inputs import scan_keyed_folder

        found, bad = scan_keyed_folder(Path(folder).expanduser().resolve(), self.folder_suffixes, ctx.material_ids,
                                       self.folder_source or self.name, self.folder_flag())
        ctx.rejects.extend(bad)
        return found

    def gather(self, cfg: Any, ctx: GatherContext) -> dict[str, Any]:
        """``{material_id: value}`` that :meth:`featurize` needs, read once from ``raw/`` or a user folder;
        by default the paths of its user folder's files."""
        return {mid: str(path) for mid, path in self.folder_files(cfg, ctx).items()}

    def featurize(self, item: Item, cfg: Any) -> dict[str, Any]:
        """This modality's processed columns of one material (``{column: value or None}``)."""
        return {}

    def gather_recipes(self, cfg: Any, recipes: "pd.DataFrame") -> dict[str, Any]:
        """``{recipe_id: value}`` that :meth:`featurize` needs for a recipe row (a synthesis recipe kept as its own
        row, with no structure: ``processed/recipes.parquet``), read from ``raw/recipes.parquet``'s rows
        ``recipes`` (:func:`~cmma_cli.preprocess.recipes.raw_recipes`: ``record`` parsed to a dict, ``target_fractions``
        the target's nominal composition or None); none by default."""
        return {}

    def counts(self) -> dict[str, str]:
        """What the preprocess summary and manifest count: ``{label: column that is non-null}``."""
        return {self.name: self.columns[0]} if self.columns else {}

    def tally(self, table: pa.Table) -> dict[str, int]:
        """Counts of a processed chunk this modality adds to the manifest (summed over chunks)."""
        return {}

    def notes(self, counts: dict[str, dict[str, int]]) -> list[str]:
        """Sentences for the preprocess summary, given every modality's summed :meth:`tally`."""
        return []

    def facts(self, cfg: Any) -> dict[str, Any]:
        """Top-level manifest entries this modality's preprocess settings imply (e.g. the XRD grid)."""
        return {}

    def folders(self, cfg: Any) -> dict[str, str | None]:
        """User folders among the preprocess settings (``{setting: path}``): fingerprinted, so a changed folder reruns."""
        return {self.folder_setting: getattr(cfg, self.folder_setting)} if self.folder_setting else {}

    # ----------------------------------------------------------------------------------------- train

    @abstractmethod
    def spec(self, cfg: Any, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        """The facts its encoder is built from (JSON-able); ``cfg`` is this modality's training section and
        ``table`` the training table, when there is one."""

    def spec_columns(self) -> tuple[str, ...]:
        """The processed columns :meth:`spec` measures on the training table (none by default)."""
        return ()

    @abstractmethod
    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> Prepared:
        """This modality's data for every row of ``table``."""

    @abstractmethod
    def collate(self, data: Prepared, rows: np.ndarray, rng: np.random.Generator | None) -> dict[str, "torch.Tensor"]:
        """Inputs of ``rows`` (which all have the modality); ``rng`` is None for deterministic evaluation."""

    @abstractmethod
    def encoder(self, spec: dict[str, Any]) -> "torch.nn.Module":
        """A fresh encoder with an ``out_dim`` attribute, mapping collated inputs to ``(rows, out_dim)``."""

    def learning_rate(self, cfg: Any) -> float | None:
        """Its encoder's own learning rate (None: the run's ``lr``)."""
        return None

    def loading_spec(self, spec: dict[str, Any]) -> dict[str, Any]:
        """``spec`` as used to rebuild the encoder for loading a checkpoint (no pretrained download needed)."""
        return spec

    def ablation_variants(self, cfg: Any) -> list[tuple[str, dict[str, Any]]]:
        """``cmma ablate encoder`` variants: ``(label, {setting: value})`` changes of this modality's section."""
        return []

    # ---- embed and retrieve

    #: How a user's own query of this modality is given: ``cmma retrieve --<query_option> FILE`` and
    #: ``Query(<query_option>=...)``; None: it cannot be a query.
    query_option: str | None = None
    #: The query is the command's positional argument (a typed text), not an option.
    query_positional: bool = False
    #: Its query option takes a file (``--pattern FILE.xy``); False: a typed value (``--formula LiFePO4``).
    query_is_file: bool = True
    query_help: str = ""  # the help text of its query option (or argument)
    query_example: str = ""  # how the sentences that list the queries show it, e.g. "--structure FILE.cif"
    #: What ``cmma embed --input`` reads as this modality, in words (for its help and error sentences).
    input_help: str = ""
    #: A user table this modality reads: (what the column holds, the accepted column names).
    input_columns: tuple[str, tuple[str, ...]] | None = None
    #: Its user files are whole materials (a structure each, with an id and properties): every modality's
    #: columns are computed from them, as preprocess computes them from ``raw/``.
    whole_materials: bool = False
    #: Its ``featurize`` computes its columns from the structure alone, so a whole material gives this view too.
    from_structure: bool = False
    #: Embeddings tables ``cmma embed`` writes for it besides ``<name>.parquet``: ``{table: its row id column}``.
    embed_tables: dict[str, str] = {}

    def claim_input(self, path: Path) -> int:
        """Whether ``cmma embed --input`` reads the user file ``path`` as this modality: 0 no, 1 as a fallback
        (any prose ``.txt`` is a text), 2 yes. The highest claim wins; a tie goes to the first registered."""
        return 0

    def read_inputs(self, paths: list[Path], cfg: Any) -> UserInputs:
        """The user files it claimed as rows; ``cfg`` is its preprocess section as recorded in ``processed/``
        (so a file becomes what preprocess would make of it). Files that cannot be used are rejects."""
        raise NotImplementedError(f"the {self.name} modality reads no user files")

    def link_inputs(self, paths: list[Path], material_ids: set[str]) -> dict[str, tuple[Path, Any]]:
        """Those of its user files that belong to whole materials given beside them (``a.xy`` beside ``a.cif``):
        ``{material_id: (file, what gather() would find for it)}``. They become that material's, not rows of their own."""
        return {}

    def read_query(self, value: Any, cfg: Any) -> UserInputs:
        """One ``cmma retrieve`` query (a file path, or the typed text) as one row, or one sentence saying why not."""
        raise NotImplementedError(f"the {self.name} modality takes no queries")

    def unusable_query(self, value: Any, reason: str) -> str:
        """The sentence for a query that was read but yields no vector (a structure that makes no graph)."""
        return f"The {self.name} query {value} cannot be used ({reason})."

    def query_sources(self) -> tuple[str, ...]:
        """The encoders its query (or input) can go through, its own first: a whole material also gives every
        view computed from the structure alone (:attr:`from_structure`)."""
        if not self.whole_materials:
            return (self.name,)
        from cmma_cli.modalities import REGISTRY

        return (self.name, *(m.name for m in REGISTRY.values() if m is not self and m.from_structure))

    def embed_processed(self, encoder: "Encoder", table: pa.Table,
                        advance: Callable[[int], Any] | None = None) -> dict[str, tuple[dict[str, pa.Array], np.ndarray]]:
        """The embeddings tables ``cmma embed`` writes for processed rows ``table`` (its :meth:`fields` and
        ``material_id``): ``{table: (columns, L2-normalised vectors)}``. Its own table (``<name>``: one row
        per material that has it, ``material_id`` first) goes into ``unified``; :attr:`embed_tables` are extra."""
        rows, vectors = encoder.embed_table(self.name, table, advance)
        ids = table.column("material_id").to_pylist()
        return {self.name: ({"material_id": pa.array([str(ids[r]) for r in rows], pa.string())}, vectors)}

    def embed_new(self, encoder: "Encoder", table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, vectors)``: the rows of a user's processed-like ``table`` that have it, and their vectors."""
        return encoder.embed_table(self.name, table)

    def warm_up(self, encoder: "Encoder") -> None:
        """Load, once, what encoding a query needs beyond the checkpoint (a sentence model), so that a query's
        encoding time is the encoding alone."""

    # ---- evaluate

    #: What its attributions are over, plural ("atoms", "words"); empty: it has none, so no pair with it is explained.
    attribution: str = ""
    #: It anchors the explained pairs: its similarity to each other modality with attributions is explained,
    #: both sides attributed (the structure, per atom).
    explain_anchor: bool = False

    def attribute(self, encoder: "torch.nn.Module", head: "torch.nn.Module", inputs: dict[str, "torch.Tensor"],
                  other: "torch.Tensor", ctx: ExplainContext) -> Attribution:
        """Its side of one material's explained pair: how its collated ``inputs`` (one material) drive the cosine
        similarity of its embedding (``head(encoder(inputs))``, normalised) with the unit vector ``other``."""
        raise NotImplementedError(f"the {self.name} modality has no attributions")

    def attribution_text(self, pair: dict[str, Any], markdown: bool = True) -> list[str]:
        """Its side of an explained ``pair`` record (the fields :meth:`attribute` added) in words: markdown
        paragraphs for the report, else indented terminal lines."""
        return []
