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


@app.command()
@_friendly
@with_config(TrainConfig, "train")
def train(
    run: Annotated[Optional[str], typer.Option("--run", "--run-name", help="Run name: runs/<run>/ (default: a "
                                                    "timestamp; with --resume latest, the newest run). Under torchrun "
                                                    "use --run-name.", show_default=False)] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue a run: 'latest' or a checkpoint file.",
                                                  show_default=False)] = None,
    gpus: Annotated[Optional[int], typer.Option(help="Ranks on this machine: N GPUs with DDP (N CPU processes on "
                                                     "gloo when there is no GPU); 0 forces the CPU (default: one "
                                                     "GPU if present, else the CPU).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Start the run over, deleting its checkpoints and metrics.")] = False,
    workspace: WorkspaceOpt = None,
    *,
    cfg: TrainConfig,
) -> None:
    """Train the modality encoders on [bold]processed/[/] with a CLIP-style contrastive loss into
    [bold]runs/<run>/[/] (checkpoints, metrics.csv, TensorBoard events).

    Examples:

      cmma train --epochs 30 --run first

      cmma train --modalities structure,text --pairs anchor:structure --embed-dim 128

      cmma train --gpus 4                       # DDP on 4 GPUs (several machines: torchrun -m cmma_cli train)

      cmma train --resume latest
    """
    from cmma_cli.train import run_train
    from cmma_cli.workspace import Workspace

    run_train(Workspace.resolve(workspace), cfg, run=run, resume=resume, gpus=gpus, force=force)


@app.command()
@_friendly
@with_config(EvaluateConfig, "evaluate")
def evaluate(
    ablation: Annotated[Optional[str], typer.Option(help="Run an ablation instead of the report: temperature | dim | "
                                                         "modalities | missing | encoder | loss.",
                                                    show_default=False)] = None,
    explain: Annotated[Optional[str], typer.Option(help="Explain one material: what drives the similarity of its "
                                                        "structure to its text and XRD embeddings.",
                                                   show_default=False)] = None,
    force: ForceOpt = False,
    workspace: WorkspaceOpt = None,
    *,
    cfg: EvaluateConfig,
) -> None:
    """Judge a run's embeddings on the test split into [bold]reports/<run>/[/]: property probes, cross-modal
    retrieval, synthesis match, baselines, latent-space maps and attributions (report.md, metrics.json,
    figures/).

    Examples:

      cmma evaluate                                  # the newest embedded run

      cmma evaluate --sections probes,retrieval

      cmma evaluate --explain "aflow:AB_cF8_225_a_b:NaCl"

      cmma evaluate --ablation temperature
    """
    from cmma_cli.workspace import Workspace

    ws = Workspace.resolve(workspace)
    if explain and ablation:
        raise CMMAError("Give either --explain or --ablation, not both.")
    if explain:
        from cmma_cli.evaluate.explain import run_explain

        run_explain(ws, cfg, explain)
    elif ablation:
        from cmma_cli.evaluate.ablations import run_ablation

        run_ablation(ws, cfg, ablation, force=force)
    else:
        from cmma_cli.evaluate.pipeline import run_evaluate

        run_evaluate(ws, cfg, force=force)


@app.command()
@_friendly
def embed(
    run: Annotated[Optional[str], typer.Option(help="The trained run to embed with (default: the newest finished run).",
                                               show_default=False)] = None,
    checkpoint: Annotated[str, typer.Option(help="best | last | a .pt file.")] = "best",
    inputs: Annotated[
        Optional[list[Path]],
        typer.Option("--input", "-i", help="Embed your own data instead of processed/ (repeatable): CIF files or "
                                           "folders, a table with a CIF or text column, pattern files (.xy, .xye, "
                                           ".dat), images, text or JSON files.", show_default=False),
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for --input embeddings (default: "
                                                     "embeddings/<run>/inputs/<name of the first input>/).",
                                                show_default=False)] = None,
    index: Annotated[str, typer.Option(help="flat (exact inner product) | ivf (approximate, for millions).")] = "flat",
    nlist: Annotated[Optional[int], typer.Option(help="IVF cells (default: about 4 sqrt(n)).", min=1,
                                                 show_default=False)] = None,
    nprobe: Annotated[int, typer.Option(help="IVF cells searched per query.", min=1)] = 16,
    batch_size: Annotated[int, typer.Option(help="Materials per forward pass.", min=1)] = 256,
    device: Annotated[str, typer.Option(help="auto (the GPU when there is one) | cpu | cuda[:N].")] = "auto",
    workers: Annotated[Optional[int], typer.Option(help="Collate processes (default: 4 on GPU, 0 on CPU).", min=0,
                                                   show_default=False)] = None,
    force: ForceOpt = False,
    workspace: WorkspaceOpt = None,
) -> None:
    """Embed every processed material with a trained run into [bold]<workspace>/embeddings/<run>/[/]: one Parquet
    table per modality, a unified table, and a FAISS index beside each.

    Examples:

      cmma embed                                   # newest run, best.pt

      cmma embed --run big --checkpoint last --index ivf

      cmma embed --input my_cifs/ --input recipes.json    # your own data, no retraining
    """
    from cmma_cli.config import EmbedConfig
    from cmma_cli.workspace import Workspace

    cfg = EmbedConfig(run=run, checkpoint=checkpoint, index=index, nlist=nlist, nprobe=nprobe, batch_size=batch_size,
                      device=device, workers=workers)
    ws = Workspace.resolve(workspace)
    if inputs:
        from cmma_cli.embed_inputs import embed_inputs

        embed_inputs(ws, cfg, list(inputs), out=out)
    else:
        if out is not None:
            raise CMMAError("--out only applies to --input: the processed materials always go to embeddings/<run>/.")
        from cmma_cli.embed import run_embed

        run_embed(ws, cfg, force=force)


@app.command()
@_friendly
def retrieve(
    query: Annotated[Optional[str], typer.Argument(help="A synthesis procedure or a structure description, in quotes.",
                                                   show_default=False)] = None,
    from_: Annotated[Optional[str], typer.Option("--from", help="text | structure | xrd | image | unified "
                                                                "(default: what the query is).", show_default=False)] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="structure | text | xrd | image | synthesis | unified "
                                                           "(default: structure).", show_default=False)] = None,
    k: Annotated[int, typer.Option("-k", "--top", help="How many results.", min=1)] = 10,
    structure: Annotated[Optional[Path], typer.Option(help="Query with a CIF file.", show_default=False)] = None,
    material: Annotated[Optional[str], typer.Option(help="Query with an embedded material's stored vector (--from "
                                                         "picks which; default structure).", show_default=False)] = None,
    pattern: Annotated[Optional[Path], typer.Option(help="Query with a measured XRD pattern (2-theta, intensity).",
                                                    show_default=False)] = None,
    image: Annotated[Optional[Path], typer.Option(help="Query with an image (runs trained with images).",
                                                  show_default=False)] = None,
    filters: Annotated[Optional[list[str]], typer.Option("--filter", help="Property filter, repeatable: 'band_gap>1', "
                                                                          "'crystal_system==cubic'.",
                                                         show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable results on stdout.")] = False,
    run: Annotated[Optional[str], typer.Option(help="Search this run's embeddings (default: the newest).",
                                               show_default=False)] = None,
    device: Annotated[str, typer.Option(help="Where the query encoder runs.")] = "cpu",
    threads: Annotated[Optional[int], typer.Option(help="CPU threads for encoding and search (default: one per "
                                                        "core; 1 is fastest on a busy machine).", min=1,
                                                   show_default=False)] = None,
    workspace: WorkspaceOpt = None,
) -> None:
    """Cross-modal search: the materials whose structure (or other view) best matches a text, a CIF, a pattern or
    an image.

    Examples:

      cmma retrieve "Solid-state synthesis from Li2CO3 and Co3O4 at 900 C" -k 5

      cmma retrieve --structure LiFePO4.cif --to text --json

      cmma retrieve --material mp-19017 --filter "band_gap>1"
    """
    from cmma_cli.config import RetrieveConfig
    from cmma_cli.retrieve import Query, run_retrieve
    from cmma_cli.workspace import Workspace

    cfg = RetrieveConfig(run=run, source=from_, target=to, k=k, filters=list(filters or []), device=device,
                         threads=threads)
    q = Query(text=query, structure=structure, material=material, pattern=pattern, image=image)
    run_retrieve(Workspace.resolve(workspace), q, cfg, as_json=as_json)
