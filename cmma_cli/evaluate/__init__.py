"""``cmma evaluate``: turn a run's embeddings into evidence, every number on the test split.

- :mod:`~cmma_cli.evaluate.metrics`: the metrics, pure numpy (regression, classification, ranking, purity);
- :mod:`~cmma_cli.evaluate.data`: what the stage reads (processed properties + splits, the embeddings);
- :mod:`~cmma_cli.evaluate.probes`: ridge / MLP / logistic probes on frozen embeddings;
- :mod:`~cmma_cli.evaluate.retrieval`, :mod:`~cmma_cli.evaluate.synthesis`: cross-modal retrieval, recipe match;
- :mod:`~cmma_cli.evaluate.baselines`: supervised single-modality and fusion models on the same split;
- :mod:`~cmma_cli.evaluate.latent`: UMAP / t-SNE maps, neighbourhood purity, interpolation;
- :mod:`~cmma_cli.evaluate.explain`: attributions of a material's pairs of modalities, from the modalities'
  hooks (per atom, per word, per 2-theta region, ...);
- :mod:`~cmma_cli.evaluate.ablations`: ``cmma ablate KIND`` variants, trained and embedded through
  :mod:`cmma_cli.api` (``api.train``, ``api.embed``);
- :mod:`~cmma_cli.evaluate.report`, :mod:`~cmma_cli.evaluate.pipeline`: report.md, metrics.json, the stage.

Entry points (imported from their modules, so ``metrics`` stays importable without torch):
``pipeline.run_evaluate(ws, cfg, force)``, ``explain.run_explain(ws, cfg, material_id)`` and
``ablations.run_ablation(ws, cfg, kind, force)``; :mod:`cmma_cli.api` (``evaluate``, ``explain``, ``ablate``)
is what the commands call.
"""
