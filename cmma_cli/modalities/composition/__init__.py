"""Composition: a material as its elements and their fractions, the hub every view can reach.

Every structure has a composition, and so does every synthesis recipe's target, every formula a user types and
every XRD reference. Aligning each view to composition (``cmma train --pairs anchor:composition``) lets the
40,000 text-mined recipes train although almost none of their targets has a structure in the workspace, and lets
synthesis <-> structure alignment emerge without a single paired example (ImageBind's binding idea).

``cmma preprocess`` stores each row's elements (indices into :data:`~cmma_cli.composition.ELEMENTS`, by atomic
number) and fractions (summing to one): from the structure where there is one, else from the raw formula, and for a
recipe row from its target (:func:`~cmma_cli.composition.material_fractions`: nominal values of variables where
the recipe gives them; targets it cannot resolve are counted and left out). The encoder
(:mod:`~cmma_cli.modalities.composition.encoder`) is a set model: self-attention over the elements, no positions,
pooled by fraction, so the order the elements are written in and the formula's scale never change the vector.
Its element vectors start at random, or from the mat2vec embeddings shipped in ``cmma_cli/data/element_embeddings``
(``composition_init = "matscholar"``); on the MP-20 hub benchmark neither start was measurably better.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Context, GatherContext, Item, Modality, Prepared, UserInputs
from cmma_cli.modalities.columns import csr, ragged_index

ELEMENTS_COLUMN, FRACTIONS_COLUMN = "composition_elements", "composition_fractions"
INITS = ("matscholar", "random")


@dataclass
class CompositionSettings:
    """The composition encoder (``cmma train``)."""

    dim: int = 128  # width of the element vectors inside the composition encoder
    layers: int = 2  # self-attention layers over a composition's elements
    heads: int = 4  # attention heads per layer
    out_dim: int = 256  # width of the composition encoder's output
    init: str = field(default="random", metadata={"choices": INITS})  # element vectors start at random, or from the shipped mat2vec embeddings: matscholar (neither measurably better on MP-20, benchmarks/hub.py)


@dataclass
class CompositionData(Prepared):
    present: np.ndarray
    elements: np.ndarray  # (total elements of all rows,) int64 index into ELEMENTS
    fractions: np.ndarray  # (total elements,) float32, summing to one per row
    offsets: np.ndarray  # (rows + 1,)


def fractions_of(structure) -> dict[str, float]:
    """A structure's element fractions (species and oxidation states reduced to elements)."""
    from cmma_cli.composition import normalise

    return normalise(structure.composition.get_el_amt_dict())


def encode_fractions(fractions: dict[str, float]) -> dict[str, np.ndarray]:
    """``{element: fraction}`` as the two processed columns (elements by atomic number)."""
    from cmma_cli.composition import INDEX, normalise

    fr = normalise(fractions)
    return {ELEMENTS_COLUMN: np.array([INDEX[el] for el in fr], dtype=np.int16),
            FRACTIONS_COLUMN: np.array(list(fr.values()), dtype=np.float32)}


class CompositionModality(Modality):
    name = "composition"
    columns = (ELEMENTS_COLUMN, FRACTIONS_COLUMN)
    fields = (pa.field(ELEMENTS_COLUMN, pa.list_(pa.int16())), pa.field(FRACTIONS_COLUMN, pa.list_(pa.float32())))
    train_config = CompositionSettings

    # ------------------------------------------------------------------------------------ preprocess

    def gather(self, cfg: Any, ctx: GatherContext) -> dict[str, Any]:
        """``{material_id: formula}`` from ``raw/materials.parquet``: the composition of a material whose
        structure cannot be used."""
        import pyarrow.parquet as pq

        path = ctx.raw_dir / "materials.parquet"
        if not path.exists() or "formula" not in pq.ParquetFile(path).schema_arrow.names:
            return {}
        table = pq.read_table(path, columns=["material_id", "formula"])
        return {str(m): f for m, f in zip(table["material_id"].to_pylist(), table["formula"].to_pylist())
                if isinstance(f, str) and f.strip()}

    def gather_recipes(self, cfg: Any, recipes) -> dict[str, Any]:
        """``{recipe_id: {element: fraction}}``: each recipe target's nominal composition (none when it has
        variables without values, or element placeholders)."""
        return {str(rid): fr for rid, fr in zip(recipes["recipe_id"], recipes["target_fractions"]) if fr}

    def featurize(self, item: Item, cfg: Any) -> dict[str, Any]:
        from cmma_cli.composition import parse_formula

        if item.structure is not None:
            with contextlib.suppress(ValueError, KeyError):  # no positive amount: fall back to the formula below
                return encode_fractions(fractions_of(item.structure))
        linked = item.linked.get(self.name)
        if isinstance(linked, dict):
            return encode_fractions(linked)
        if isinstance(linked, str):
            try:
                return encode_fractions(parse_formula(linked))
            except CMMAError as exc:
                item.reject(self.name, item.material_id, str(exc))
        return {}

    # ----------------------------------------------------------------------------------------- train

    def spec(self, cfg: CompositionSettings, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        if cfg.init not in INITS:
            raise CMMAError(f"--composition-init must be one of {', '.join(INITS)}, not {cfg.init!r}.")
        if cfg.dim % cfg.heads:
            raise CMMAError(f"--composition-dim ({cfg.dim}) must be a multiple of --composition-heads ({cfg.heads}).")
        return {"dim": cfg.dim, "layers": cfg.layers, "heads": cfg.heads, "out_dim": cfg.out_dim, "init": cfg.init}

    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> CompositionData:
        if ELEMENTS_COLUMN not in table.column_names:
            raise CMMAError("The processed data has no composition columns (it was made by cmma before 0.6.0): run "
                            "`cmma preprocess --force`.")
        elements, offsets, valid = csr(table.column(ELEMENTS_COLUMN), np.int64)
        fractions, _, _ = csr(table.column(FRACTIONS_COLUMN), np.float32)
        present = valid & (np.diff(offsets) > 0)
        return CompositionData(present, elements, fractions, offsets)

    def collate(self, data: CompositionData, rows: np.ndarray, rng: np.random.Generator | None) -> dict:
        import torch

        index, counts = ragged_index(data.offsets, rows)
        width = int(counts.max()) if len(counts) else 1
        slot = np.arange(len(index)) - np.repeat(np.cumsum(counts) - counts, counts)
        row = np.repeat(np.arange(len(rows)), counts)
        elements = np.zeros((len(rows), width), dtype=np.int64)
        fractions = np.zeros((len(rows), width), dtype=np.float32)
        elements[row, slot] = data.elements[index]
        fractions[row, slot] = data.fractions[index]
        return {"elements": torch.from_numpy(elements), "fractions": torch.from_numpy(fractions)}

    def encoder(self, spec: dict[str, Any]):
        from cmma_cli.modalities.composition.encoder import CompositionEncoder

        return CompositionEncoder(spec)

    def ablation_variants(self, cfg: CompositionSettings) -> list[tuple[str, dict[str, Any]]]:
        return [("composition matscholar", {"init": "matscholar"}), ("composition random", {"init": "random"})]

    # ---- embed and retrieve

    query_option = "formula"
    query_help = "Query with a chemical formula (LiFePO4, Fe2(SO4)3, Li0.5Ca0.5MnO3)."
    query_example = "--formula LiFePO4"
    query_is_file = False
    from_structure = True  # a CIF's composition goes through the composition encoder

    def read_query(self, value, cfg) -> UserInputs:
        from cmma_cli.composition import parse_formula

        columns = encode_fractions(parse_formula(str(value)))
        return UserInputs(ids=[str(value).strip()], values={k: [v] for k, v in columns.items()})
