"""``cmma serve``: one run, loaded once, answering HTTP JSON, with a search page and a map of the latent space.

:mod:`~cmma_cli.serve.app` builds the FastAPI app around one :class:`~cmma_cli.session.Session` (the same code
as the Python API and ``cmma retrieve``); ``static/`` is the page (plain HTML, CSS and JavaScript: no build
step, nothing fetched from elsewhere). :func:`run_serve` is what the command runs.
"""

from __future__ import annotations

from cmma_cli.serve.app import create_app, run_serve

__all__ = ["create_app", "run_serve"]
