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
