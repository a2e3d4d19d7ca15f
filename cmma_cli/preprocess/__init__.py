"""``cmma preprocess``: raw tables -> one row per material with a column group per modality, and splits.

``<ws>/processed/materials.parquet`` (one row per material, nulls where a modality is missing):

- identity and properties, copied from ``raw/materials.parquet``: ``material_id``, ``formula``,
  ``elements``, ``nsites``, ``source`` and every property column (known and extra);
- structure (:mod:`~cmma_cli.preprocess.graphs`): ``atomic_numbers`` list<int16>, ``edge_src`` /
  ``edge_dst`` list<int32>, ``edge_dist`` list<float32> (Angstrom), ``edge_vec`` list<float32> (E x 3
  cartesian vectors ``r_dst + image - r_src``, flattened);
- text (:mod:`~cmma_cli.preprocess.text`): ``description`` str, ``synthesis_texts`` list<str> (one
  clean procedure per linked recipe) and ``recipe_ids`` list<str> in the same order;
- XRD (:mod:`~cmma_cli.preprocess.spectra`): ``xrd`` list<float32> of the grid's length (the manifest's
  ``xrd_grid``), ``xrd_source`` (``computed`` | ``measured``);
- image: ``image_path`` (absolute path of a user's image file).

``<ws>/processed/splits.parquet``: ``material_id``, ``split`` (train | val | test), ``group``
(:mod:`~cmma_cli.preprocess.splits`). ``<ws>/processed/rejects.parquet``: ``source``, ``item``,
``reason`` for every structure, pattern, image or recipe that could not be used.
"""

from cmma_cli.preprocess.pipeline import run_preprocess

__all__ = ["run_preprocess"]
