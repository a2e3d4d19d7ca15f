"""``cmma identify``: phase identification from measured powder patterns.

:mod:`~cmma_cli.identify.candidates` (what is searched), :mod:`~cmma_cli.identify.recall` (which candidates are
worth a fit), :mod:`~cmma_cli.identify.pipeline` (read, recall, fit, decompose), :mod:`~cmma_cli.identify.report`
(tables and JSON). The XRD physics (reading files, computing reflections, fitting profiles) lives in the xrd
modality: :mod:`cmma_cli.modalities.xrd`.
"""
