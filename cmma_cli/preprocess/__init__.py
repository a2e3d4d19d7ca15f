"""``cmma preprocess``: raw tables -> one row per material with a column group per modality, and splits.

``<ws>/processed/materials.parquet`` (one row per material, nulls where a modality is missing):

- identity and properties, copied from ``raw/materials.parquet``: ``material_id``, ``formula``,
  ``elements``, ``nsites``, ``source`` and every property column (known and extra);
- then each registered modality's columns (:attr:`cmma_cli.modalities.base.Modality.fields`), computed
  by its ``featurize`` from the structure and from what its ``gather`` read (recipe texts, descriptions,
  a user's folder of measured patterns or images). The modules under :mod:`cmma_cli.modalities` document
  their columns.

``<ws>/processed/recipes.parquet``: every synthesis recipe as a row of its own, with no structure (its text and its
target's composition; :mod:`~cmma_cli.preprocess.recipes`), with its ``split``.

``<ws>/processed/splits.parquet``: ``material_id``, ``split`` (train | val | test), ``group``
(:mod:`~cmma_cli.preprocess.splits`). ``<ws>/processed/rejects.parquet``: ``source``, ``item``,
``reason`` for every structure, pattern, image or recipe that could not be used.
"""

from cmma_cli.preprocess.pipeline import run_preprocess

__all__ = ["run_preprocess"]
