"""The ``cmma`` command line: one thin command per stage (its options, then one call).

Every command takes ``--workspace/-w`` (else ``$CMMA_WORKSPACE``, else ``./data``). A
:class:`~cmma_cli.errors.CMMAError` is printed as one sentence, without a traceback, with exit status 2.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from cmma_cli import __version__
from cmma_cli.console import console
from cmma_cli.config import EmbedConfig, EvaluateConfig, PreprocessConfig, RetrieveConfig, TrainConfig
from cmma_cli.errors import CMMAError
from cmma_cli.options import with_config

app = typer.Typer(
    name="cmma",
    help=(
        "Contrastive multi-modal alignment of materials: learn one embedding space for crystal structures, "
        "synthesis/description text and XRD patterns.\n\n"
        "Pipeline: fetch -> preprocess -> train -> embed -> evaluate -> retrieve. Stages talk through Parquet "
        "files in a workspace (-w, else $CMMA_WORKSPACE, else ./data)."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)

WorkspaceOpt = Annotated[
    Optional[Path],
    typer.Option("--workspace", "-w", help="Workspace folder (default: $CMMA_WORKSPACE, else ./data).",
                 show_default=False),
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if its inputs and config are unchanged.")]


def _friendly(fn: Callable) -> Callable:
    """Print a CMMAError as one sentence and exit 2, instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CMMAError as exc:
            console.print(f"[bold red]Error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _split(values: Optional[list[str]]) -> list[str]:
    """``--elements Li,Fe --elements O`` -> ``["Li", "Fe", "O"]``."""
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cmma {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """cmma: multi-modal materials embeddings."""


@app.command()
@_friendly
def fetch(
    paths: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Local inputs (--source local): CSV/Parquet tables with a CIF column, folders of .cif "
                            "files, JSON/JSON-lines recipe files.", show_default=False),
    ] = None,
    source: Annotated[
        Optional[str],
        typer.Option("--source", "-s", help="sample | mp | local (default: local if PATHS are given, mp if an API "
                                            "key is set, else the built-in sample).", show_default=False),
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option("--api-key", envvar="MP_API_KEY", help="Materials Project API key.", show_default=False),
    ] = None,
    endpoint: Annotated[Optional[str], typer.Option(help="Materials Project API endpoint URL.")] = None,
    elements: Annotated[
        Optional[list[str]], typer.Option("--elements", "-e", help="Keep materials containing all of these elements, "
                                                                   "e.g. Li,Fe,O.", show_default=False)
    ] = None,
    chemsys: Annotated[Optional[str], typer.Option(help="Keep exactly this chemical system, e.g. Li-Fe-O.")] = None,
    max_sites: Annotated[Optional[int], typer.Option(help="At most this many sites per structure.", min=1)] = None,
    stable_only: Annotated[bool, typer.Option("--stable-only", help="Only materials on the convex hull.")] = False,
    limit: Annotated[Optional[int], typer.Option(help="At most this many materials.", min=1)] = None,
    synthesis: Annotated[bool, typer.Option(help="Fetch / link synthesis recipes.")] = True,
    descriptions: Annotated[bool, typer.Option(help="Fetch Robocrystallographer descriptions (mp).")] = True,
    chunk_size: Annotated[int, typer.Option(help="Materials per request (mp); the unit of resumption.", min=1)] = 500,
    force: ForceOpt = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """Fetch raw materials data into [bold]<workspace>/raw/[/]: structures with properties, synthesis recipes and
    structure descriptions.

    With no key and no PATHS this uses the built-in sample (real structures shipped with pymatgen). Examples:

      cmma fetch                                    # built-in sample, no network

      MP_API_KEY=... cmma fetch --elements Li,O --max-sites 20 --limit 5000

      cmma fetch --source local structures.csv recipes.json.xz
    """
    from cmma_cli.config import FetchConfig
    from cmma_cli.fetch import run_fetch
    from cmma_cli.workspace import Workspace

    if source is None:
        if paths:
            source = "local"
        elif api_key:
            source = "mp"
        else:
            source = "sample"
            console.print("Using the built-in sample (real structures shipped with pymatgen, no network). To fetch "
                          "from the Materials Project, set MP_API_KEY or pass --api-key.", highlight=False)
    if paths and source != "local":
        raise CMMAError(f"PATHS are only read with --source local (you gave --source {source}): drop them or use --source local.")
    cfg = FetchConfig(
        source=source, paths=[str(p) for p in paths or []], elements=_split(elements), chemsys=chemsys,
        max_sites=max_sites, stable_only=stable_only, limit=limit, synthesis=synthesis,
        descriptions=descriptions, endpoint=endpoint, chunk_size=chunk_size,
    )
    run_fetch(Workspace.resolve(workspace), cfg, api_key=api_key, force=force)


def _not_yet(stage: str, issue_hint: str) -> None:
    raise CMMAError(f"`cmma {stage}` is not available yet in cmma {__version__}: {issue_hint}")


@app.command()
@_friendly
@with_config(PreprocessConfig, "preprocess")
def preprocess(force: ForceOpt = False, workspace: WorkspaceOpt = None, *, cfg: PreprocessConfig) -> None:
    """Turn [bold]raw/[/] into [bold]processed/[/]: crystal graphs, clean synthesis texts, XRD patterns and
    train/val/test splits grouped by composition.

    Example: cmma preprocess --cutoff 6 --two-theta-step 0.1 --xrd-dir measured_patterns/
    """
    from cmma_cli.preprocess.pipeline import run_preprocess
    from cmma_cli.workspace import Workspace

    run_preprocess(Workspace.resolve(workspace), cfg, force=force)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def train() -> None:
    """(Not available yet) Train the modality encoders with a contrastive loss."""
    _not_yet("train", "only `cmma fetch` works so far.")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def embed() -> None:
    """(Not available yet) Export embeddings and build search indexes."""
    _not_yet("embed", "only `cmma fetch` works so far.")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def evaluate() -> None:
    """(Not available yet) Property probes, retrieval metrics, baselines and the report."""
    _not_yet("evaluate", "only `cmma fetch` works so far.")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@_friendly
def retrieve() -> None:
    """(Not available yet) Cross-modal search: find materials matching a text, structure or pattern."""
    _not_yet("retrieve", "only `cmma fetch` works so far.")
