"""cmma: contrastive multi-modal alignment of materials.

One embedding space for a material's crystal structure, its synthesis and description text, and its
characterization patterns. The command-line stages (``cmma fetch`` ... ``cmma retrieve``) talk only
through Parquet artifacts in a workspace; see :mod:`cmma_cli.workspace`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cmma")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.1.0"

__all__ = ["__version__", "load", "Session"]


def __getattr__(name: str):
    """``cmma_cli.load`` and ``cmma_cli.Session`` (:mod:`cmma_cli.session`), imported on first use so that
    ``import cmma_cli`` stays light."""
    if name in ("load", "Session"):
        from cmma_cli import session

        return getattr(session, name)
    raise AttributeError(f"module 'cmma_cli' has no attribute {name!r}")
