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
from cmma_cli.config import (EmbedConfig, EvaluateConfig, FetchConfig, IdentifyConfig, PreprocessConfig, RecommendConfig,
                             RetrieveConfig, TrainConfig)
from cmma_cli.errors import CMMAError, write_error
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
        except (CMMAError, OSError) as exc:
            from rich.markup import escape  # "[train] epochs ..." is text, not a markup tag

            if not isinstance(exc, CMMAError):  # a full disk / read-only file system outside the workspace's writers
                exc = write_error(exc, permission=False)
                if exc is None:
                    raise

            console.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


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
@with_config(FetchConfig, "fetch", skip=("paths",))
def fetch(
    paths: Annotated[
        Optional[list[Path]],
        typer.Argument(help="Local inputs (--source local): CSV/Parquet tables with a CIF column, folders of .cif "
                            "files, JSON/JSON-lines recipe files.", show_default=False),
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option("--api-key", envvar="MP_API_KEY", help="Materials Project API key (a secret: never recorded).",
                     show_default=False),
    ] = None,
    force: ForceOpt = False,
    workspace: WorkspaceOpt = None,
    *,
    cfg: FetchConfig,
) -> None:
    """Fetch raw materials data into [bold]<workspace>/raw/[/]: structures with properties, synthesis recipes and
    structure descriptions.

    With no key and no PATHS this uses the built-in sample (real structures shipped with pymatgen). Examples:

      cmma fetch                                    # built-in sample, no network

      MP_API_KEY=... cmma fetch --elements Li,O --max-sites 20 --limit 5000

      cmma fetch --source local structures.csv recipes.json.xz
    """
    from dataclasses import replace

    from cmma_cli.fetch import run_fetch
    from cmma_cli.workspace import Workspace

    if paths:
        cfg = replace(cfg, paths=[str(p) for p in paths])
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
    from cmma_cli import api
    from cmma_cli.workspace import Workspace

    api.train(Workspace.resolve(workspace), cfg, run=run, resume=resume, gpus=gpus, force=force)


@app.command()
@_friendly
@with_config(EvaluateConfig, "evaluate")
def evaluate(
    ablation: Annotated[Optional[str], typer.Option(help="Run an ablation instead of the report (the same as "
                                                         "`cmma ablate KIND`): temperature | dim | modalities | "
                                                         "missing | encoder | loss.",
                                                    show_default=False)] = None,
    explain: Annotated[Optional[str], typer.Option(help="Explain one material: what drives the similarity of each "
                                                        "of its explainable pairs of modalities (per atom, per word, "
                                                        "per 2θ region).",
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

      cmma ablate temperature                        # also: cmma evaluate --ablation temperature
    """
    from cmma_cli import api
    from cmma_cli.workspace import Workspace

    ws = Workspace.resolve(workspace)
    if explain and ablation:
        raise CMMAError("Give either --explain or --ablation, not both.")
    if explain:
        api.explain(ws, cfg, explain)
    elif ablation:  # the same as `cmma ablate KIND`
        from cmma_cli.evaluate.ablations import run_ablation

        run_ablation(ws, cfg, ablation, force=force)
    else:
        api.evaluate(ws, cfg, force=force)


@app.command()
@_friendly
@with_config(EvaluateConfig, "evaluate")
def ablate(
    kind: Annotated[str, typer.Argument(help="temperature | dim | modalities | missing | encoder | loss.",
                                        show_default=False)],
    force: Annotated[bool, typer.Option("--force", help="Retrain and re-embed every variant, even one that "
                                                        "finished with the same config.")] = False,
    workspace: WorkspaceOpt = None,
    *,
    cfg: EvaluateConfig,
) -> None:
    """What each design choice of an embedded run is worth, scored like the report into
    [bold]reports/<run>/ablation-KIND.md[/].

    Each variant of KIND is trained and embedded as run <run>-ablate-KIND-<variant>, then scored on the test
    split (ridge probes on the unified embeddings, retrieval). Kinds: temperature (learnable vs fixed), dim
    (--ablation-dims), modalities (every pair, and all), encoder (each modality's own variants), loss
    (contrastive, predict, both), missing (no training: the unified embedding without one modality).

    Examples:

      cmma ablate missing

      cmma ablate temperature --ablation-epochs 5 --run big
    """
    from cmma_cli.evaluate.ablations import run_ablation
    from cmma_cli.workspace import Workspace

    run_ablation(Workspace.resolve(workspace), cfg, kind, force=force)


# ------------------------------------------------------------------- embed and retrieve: from the registry


def _registry():
    from cmma_cli.modalities import REGISTRY

    return REGISTRY


def _input_help() -> str:
    """``embed --input``'s help: what each registered modality reads."""
    from cmma_cli.modalities.user_files import join_or

    kinds = join_or([m.input_help for m in _registry().values() if m.input_help])
    return f"Embed your own data instead of processed/ (repeatable): {kinds}."


_INPUT_HELP = _input_help()
_FIRST = next(iter(_registry()), "unified")
_MATERIAL_HELP = f"Query with an embedded material's stored vector (--from picks which; default {_FIRST})."


def _with_queries(fn: Callable) -> Callable:
    """Give ``cmma retrieve`` its queries from the registry: the positional query (a modality whose query is typed)
    and one ``--<option> FILE`` per modality that takes file queries, before ``--material``. The command gets
    them as ``queries`` (``{option: value or None}``)."""
    import inspect
    import typing

    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    own = [p.replace(annotation=hints.get(name, p.annotation)) for name, p in sig.parameters.items() if name != "queries"]
    takers = [m for m in _registry().values() if m.query_option]
    clash = [m.query_option for m in takers if m.query_option in sig.parameters]
    if clash:
        raise ValueError(f"query options {clash} clash with options of `cmma retrieve`")
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    arguments = [inspect.Parameter(m.query_option, kind, default=None, annotation=Annotated[Optional[str], typer.Argument(
        metavar="QUERY", help=m.query_help, show_default=False)]) for m in takers if m.query_positional][:1]
    options = [inspect.Parameter(m.query_option, kind, default=None, annotation=Annotated[
        Optional[Path] if m.query_is_file else Optional[str], typer.Option(
            f"--{m.query_option}", help=m.query_help, show_default=False)]) for m in takers if not m.query_positional]
    at = next((i for i, p in enumerate(own) if p.name == "material"), len(own))
    params = arguments + own[:at] + options + own[at:]
    names = [p.name for p in arguments + options]

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, queries={name: kwargs.pop(name, None) for name in names}, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    wrapper.__annotations__["return"] = hints.get("return", sig.return_annotation)
    return wrapper


@app.command()
@_friendly
@with_config(EmbedConfig, "embed")
def embed(
    inputs: Annotated[
        Optional[list[Path]],
        typer.Option("--input", "-i", help=_INPUT_HELP, show_default=False),
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for --input embeddings (default: "
                                                     "embeddings/<run>/inputs/<name of the first input>/).",
                                                show_default=False)] = None,
    force: ForceOpt = False,
    workspace: WorkspaceOpt = None,
    *,
    cfg: EmbedConfig,
) -> None:
    """Embed every processed material with a trained run into [bold]<workspace>/embeddings/<run>/[/]: one Parquet
    table per modality, a unified table, and a FAISS index beside each.

    Examples:

      cmma embed                                   # newest run, best.pt

      cmma embed --run big --checkpoint last --index ivf

      cmma embed --input my_cifs/ --input recipes.json    # your own data, no retraining
    """
    from cmma_cli.workspace import Workspace

    ws = Workspace.resolve(workspace)
    if inputs:
        from cmma_cli.embed_inputs import embed_inputs

        embed_inputs(ws, cfg, list(inputs), out=out)
    else:
        if out is not None:
            raise CMMAError("--out only applies to --input: the processed materials always go to embeddings/<run>/.")
        from cmma_cli import api

        api.embed(ws, cfg, force=force)


@app.command()
@_friendly
@with_config(RetrieveConfig, "retrieve")
@_with_queries
def retrieve(
    material: Annotated[Optional[str], typer.Option(help=_MATERIAL_HELP, show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable results on stdout.")] = False,
    workspace: WorkspaceOpt = None,
    *,
    queries: dict,
    cfg: RetrieveConfig,
) -> None:
    """Cross-modal search: the materials whose structure (or other view) best matches a text, a CIF, a pattern or
    an image (each registered modality's query).

    Examples:

      cmma retrieve "Solid-state synthesis from Li2CO3 and Co3O4 at 900 C" -k 5

      cmma retrieve --structure LiFePO4.cif --to text --json

      cmma retrieve --material mp-19017 --filter "band_gap>1"
    """
    from cmma_cli.retrieve import Query, run_retrieve
    from cmma_cli.workspace import Workspace

    q = Query(**queries, material=material)
    run_retrieve(Workspace.resolve(workspace), q, cfg, as_json=as_json)


@app.command()
@_friendly
@with_config(IdentifyConfig, "identify")
def identify(
    patterns: Annotated[list[Path], typer.Argument(help="Measured powder patterns: two-column text (.xy, .xye, .csv, "
                                                        ".dat, .txt), PANalytical .xrdml, or CIFs with _pd_meas_ data.",
                                                   show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable results on stdout.")] = False,
    workspace: WorkspaceOpt = None,
    *,
    cfg: IdentifyConfig,
) -> None:
    """Which known phases a measured powder XRD pattern contains: candidates from the workspace's materials (and
    --references CIFs) are recalled by pattern similarity (and a trained run's XRD encoder), then fitted with zero
    shift, lattice strain and peak width free; mixtures are decomposed phase by phase with weight fractions.

    Examples:

      cmma identify sample.xy --elements Li,Mn,Ti,O

      cmma identify scan.xrdml --references my_cifs/ --max-phases 2

      cmma identify pattern.xy --wavelength MoKa --json
    """
    from cmma_cli.identify.pipeline import run_identify
    from cmma_cli.workspace import Workspace

    run_identify(Workspace.resolve(workspace), list(patterns), cfg, as_json=as_json)


@app.command()
@_friendly
def serve(
    run: Annotated[Optional[str], typer.Option(help="Serve the embeddings of this run (default: the newest).",
                                               show_default=False)] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every "
                                           "interface, without any authentication).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 8000,
    threads: Annotated[int, typer.Option(help="CPU threads per query (1 answers fastest on a shared machine).",
                                         min=1)] = 1,
    device: Annotated[str, typer.Option(help="Where query encoders run: cpu | cuda[:N].")] = "cpu",
    warm: Annotated[bool, typer.Option("--warm/--lazy", help="Load every model a query needs before serving "
                                                             "(--lazy: on the first query that needs it).")] = True,
    workspace: WorkspaceOpt = None,
) -> None:
    """Serve a run over HTTP: JSON endpoints (/search, /encode, /identify, /materials/ID, /map, /health) and a search
    page with a map of the latent space at http://HOST:PORT/. The run is loaded once; queries answer warm.

    Examples:

      cmma serve                       # the newest run, http://127.0.0.1:8000/

      cmma serve --run demo --port 8765
    """
    from cmma_cli.serve import run_serve
    from cmma_cli.workspace import Workspace

    run_serve(Workspace.resolve(workspace), run, host=host, port=port, threads=threads, device=device, warm=warm)


@app.command()
@_friendly
@with_config(RecommendConfig, "recommend")
def recommend(
    target: Annotated[Optional[str], typer.Argument(help="What to make: a formula (LiFePO4), a CIF file, or a material "
                                                         "id of the workspace.", show_default=False)] = None,
    recipes: Annotated[Optional[Path], typer.Option("--recipes", help="Recipe file to recommend from (JSON / JSON lines, "
                                                    ".gz/.xz; default: the workspace's raw/recipes.parquet, else "
                                                    "raw/synthesis.parquet).", show_default=False)] = None,
    score: Annotated[Optional[Path], typer.Option("--score", help="Score this recipe (JSON: {\"precursors\": [...]} or "
                                                  "a recipe in the text-mined layout) for --target instead of "
                                                  "proposing.", show_default=False)] = None,
    target_opt: Annotated[Optional[str], typer.Option("--target", help="The target, with --score.",
                                                      show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable results on stdout.")] = False,
    workspace: WorkspaceOpt = None,
    *,
    cfg: RecommendConfig,
) -> None:
    """Precursor sets and conditions for a target, from the nearest known syntheses: the recipes whose targets are
    closest in composition propose their precursors, carried over by element substitution, with their DOI,
    reaction and heating steps as evidence.

    Examples:

      cmma recommend LiFePO4 --recipes solid-state_dataset_2019-12-03.json.xz

      cmma recommend mp-19017 -k 3 --json

      cmma recommend --score my_recipe.json --target LiCoO2
    """
    from cmma_cli.recommend import run_recommend
    from cmma_cli.workspace import Workspace

    run_recommend(Workspace.resolve(workspace), target_opt or target, cfg, recipes_file=recipes, score=score,
                  as_json=as_json)
