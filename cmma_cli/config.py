"""One dataclass per stage: every option a stage takes, with its default.

A stage's config is recorded in its manifest; an unchanged config over unchanged inputs means the
stage is up to date. ``--config file.toml`` files hold the same fields (a ``[train]`` table, ...).
Secrets (API keys) are never part of a config.

``PreprocessConfig`` and ``TrainConfig`` also hold one *section* per registered modality: the dataclass
its module declares (``Modality.preprocess_config`` / ``train_config``), read nested (``cfg.xrd.channels``)
and set flat, by the names the command line and TOML files use (``TrainConfig(xrd_channels=8)``,
``--xrd-channels 8``, ``xrd_channels = 8``). Field metadata may name ``choices`` (a tuple, or a function
returning one) and a ``check`` function; :func:`validate` applies both, with the one-sentence errors.
"""

from __future__ import annotations

import copy
import tomllib
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, Union

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import flat_name

#: Where ``cmma fetch`` reads raw data from.
FETCH_SOURCES = ("sample", "mp", "local")
#: The report sections of ``cmma evaluate``, in report order.
SECTIONS = ("probes", "retrieval", "synthesis", "latent", "baselines", "explain")


# ----------------------------------------------------------------------------------- modality sections


def _registry() -> dict[str, Any]:
    from cmma_cli.modalities import REGISTRY

    return REGISTRY


def section_types(stage_attr: str) -> dict[str, type]:
    """``{modality: its settings dataclass}`` for ``stage_attr`` (``train_config`` | ``preprocess_config``)."""
    return {name: getattr(m, stage_attr) for name, m in _registry().items() if getattr(m, stage_attr, None)}


def flat_fields(cls: type) -> dict[str, tuple[str | None, Any]]:
    """``{flat name: (modality or None, dataclass field)}`` of every setting of a stage config class."""
    sectioned = bool(getattr(cls, "_sections", ""))
    out: dict[str, tuple[str | None, Any]] = {f.name: (None, f) for f in fields(cls) if not (sectioned and f.name == "settings")}
    for modality, section in section_types(cls._sections).items() if sectioned else []:
        for f in fields(section):
            out[flat_name(modality, f)] = (modality, f)
    return out


def option_flag(cls: type, name: str) -> str:
    """The long command-line flag of setting ``name`` (flat name) of config class ``cls`` (``metadata["long"]``
    renames it, e.g. ``--from``)."""
    _, f = flat_fields(cls)[name]
    return f.metadata.get("long", "--" + name.replace("_", "-"))


def _copy_section(value: Any, section: type, modality: str) -> Any:
    if isinstance(value, section):
        return copy.deepcopy(value)
    if isinstance(value, dict):
        known = {f.name for f in fields(section)}
        return section(**{k: v for k, v in value.items() if k in known})
    raise CMMAError(f"The {modality} settings must be a {section.__name__} or a table, not {type(value).__name__}.")


def with_sections(stage_attr: str) -> Callable[[type], type]:
    """Make a dataclass stage config carry one section per registered modality (see the module docstring)."""

    def decorate(cls: type) -> type:
        cls._sections = stage_attr
        init = cls.__init__

        def __init__(self, *args, **kwargs):
            given = kwargs.pop("settings", None) or {}
            types_ = section_types(stage_attr)
            core = {f.name for f in fields(cls)}
            flat = {name: owner for name, owner in flat_fields(cls).items() if owner[0] is not None}
            routed: dict[str, dict[str, Any]] = {}
            for key in [k for k in kwargs if k not in core or k in types_]:
                value = kwargs[key]
                if key in types_ and (is_dataclass(value) or isinstance(value, dict)):
                    given = {**given, key: kwargs.pop(key)}
                elif key in flat:
                    modality, f = flat[key]
                    routed.setdefault(modality, {})[f.name] = kwargs.pop(key)
            init(self, *args, **kwargs)
            sections = {}
            for modality, section in types_.items():
                value = _copy_section(given[modality], section, modality) if modality in given else section()
                for name, v in routed.get(modality, {}).items():
                    setattr(value, name, v)
                sections[modality] = value
            self.settings = sections

        def __getattr__(self, name: str) -> Any:
            sections = self.__dict__.get("settings")
            if sections is not None and name in sections:
                return sections[name]
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

        cls.__init__ = __init__
        cls.__getattr__ = __getattr__
        return cls

    return decorate


def as_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict (what manifests record): core fields, then one table per modality section."""
    sectioned = bool(getattr(type(config), "_sections", ""))
    out = {f.name: copy.deepcopy(getattr(config, f.name)) for f in fields(config) if not (sectioned and f.name == "settings")}
    for name, section in (config.settings if sectioned else {}).items():
        out[name] = asdict(section)
    return out


def flat_dict(config: Any) -> dict[str, Any]:
    """``{flat name: value}`` of every setting: what a TOML ``--config`` table and the command line take."""
    out = {}
    for name, (modality, f) in flat_fields(type(config)).items():
        out[name] = copy.deepcopy(getattr(config if modality is None else config.settings[modality], f.name))
    return out


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """A config of ``cls`` from what :func:`as_dict` wrote (or an older flat layout); unknown keys are ignored."""
    known = flat_fields(cls)
    sections = section_types(getattr(cls, "_sections", "")) if getattr(cls, "_sections", "") else {}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key in sections and isinstance(value, dict):
            values[key] = value
        elif key in known:
            values[key] = value
    return cls(**values)


# ------------------------------------------------------------------------------------------ TOML files


def load_toml_section(path: Path, section: str, cls: type) -> dict[str, Any]:
    """The ``[section]`` table of a TOML config file as flat settings, checked against what ``cls`` takes.

    Modality settings may be flat keys (``xrd_channels = 8``) or a nested table (``[train.xrd]``, ``channels = 8``).
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CMMAError(f"Config file {path} does not exist: check the path given to --config.") from None
    except tomllib.TOMLDecodeError as exc:
        raise CMMAError(f"Config file {path} is not valid TOML ({exc}): fix it or leave out --config.") from None
    table = dict(data.get(section, {}))
    sections = section_types(getattr(cls, "_sections", "")) if getattr(cls, "_sections", "") else {}
    for modality, kind in sections.items():
        nested = table.get(modality)
        if isinstance(nested, dict):
            table.pop(modality)
            names = {f.name: flat_name(modality, f) for f in fields(kind)}
            unknown = sorted(set(nested) - set(names))
            if unknown:
                raise CMMAError(f"Config file {path} has unknown [{section}.{modality}] keys {unknown}: the known "
                                f"keys are {sorted(names)}.")
            table.update({names[k]: v for k, v in nested.items()})
    known = flat_fields(cls)
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise CMMAError(f"Config file {path} has unknown [{section}] keys {unknown}: the known keys are {sorted(known)}.")
    return {key: coerce(cls, key, value, f"Config file {path}: [{section}] {key}") for key, value in table.items()}


# ---------------------------------------------------------------------------------------- types, checks


def base_type(annotation: Any) -> tuple[Any, bool, bool]:
    """(the non-None type, whether it is a list, whether None is allowed) of an annotation."""
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        inner, is_list, _ = base_type(args[0])
        return inner, is_list, True
    if origin is list:
        return typing.get_args(annotation)[0], True, False
    return annotation, False, False


def setting_type(cls: type, name: str) -> Any:
    """The type annotation of setting ``name`` (flat name) of config class ``cls``."""
    modality, f = flat_fields(cls)[name]
    owner = cls if modality is None else section_types(cls._sections)[modality]
    return typing.get_type_hints(owner)[f.name]


_KIND = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}
_KINDS = {bool: "true/false values", int: "whole numbers", float: "numbers", str: "strings"}


def coerce(cls: type, name: str, value: Any, where: str) -> Any:
    """``value`` as setting ``name`` of ``cls`` takes it (comma-separated strings become lists), or one sentence
    (``where`` says whose value it is: ``--epochs``, or a config file's key)."""
    base, is_list, optional = base_type(setting_type(cls, name))
    if value is None:
        if optional:
            return None
        raise CMMAError(f"{where} must be {_KIND.get(base, base.__name__)}, not empty.")
    if is_list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
            try:
                return [base(v) for v in value]
            except ValueError:
                raise CMMAError(f"{where} takes comma-separated {_KINDS.get(base, base.__name__)}, not "
                                f"{','.join(value)!r}.") from None
        if not isinstance(value, list):
            raise CMMAError(f"{where} must be a list of {_KINDS.get(base, base.__name__)}, not {value!r}.")
        return [_one(base, v, where) for v in value]
    return _one(base, value, where)


def _one(base: Any, value: Any, where: str) -> Any:
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, int) and not isinstance(value, bool) if base is int else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, str) if base is str else True)
    if not ok:
        raise CMMAError(f"{where} must be {_KIND.get(base, getattr(base, '__name__', str(base)))}, not {value!r}.")
    return float(value) if base is float else value


def _choices(f) -> tuple | None:
    choices = f.metadata.get("choices")
    return tuple(choices()) if callable(choices) else choices


def validate(config: Any) -> Any:
    """Check every setting with ``choices`` or a ``check`` in its metadata; one sentence for the first bad one.

    Every stage calls it before it reads any data (and the command line when the command starts).
    """
    cls = type(config)
    for name, (modality, f) in flat_fields(cls).items():
        value = getattr(config if modality is None else config.settings[modality], f.name)
        flag = option_flag(cls, name)
        choices = _choices(f)
        if choices is not None and value is not None:
            items = value if isinstance(value, list) else [value]
            bad = [v for v in items if v not in choices]
            if bad or (isinstance(value, list) and not value and f.metadata.get("verb")):
                verb = f.metadata.get("verb", "be one of")
                shown = ",".join(map(str, value)) if isinstance(value, list) else repr(value)
                raise CMMAError(f"{flag} must {verb} {', '.join(map(str, choices))}, not {shown or 'nothing'}.")
        check = f.metadata.get("check")
        if check is not None and value is not None:
            check(value)
    return config


@dataclass
class FetchConfig:
    """``cmma fetch``: where raw data comes from and which materials to take."""

    source: str | None = field(default=None, metadata={"choices": FETCH_SOURCES, "short": "-s"})  # sample | mp | local (None: local if paths are given, mp if an API key is set, else the built-in sample)
    paths: list[str] = field(default_factory=list)  # local files / folders (source=local)
    elements: list[str] = field(default_factory=list, metadata={"short": "-e"})  # materials containing all of these elements, e.g. Li,Fe,O
    chemsys: str | None = None  # e.g. "Li-Fe-O": exactly this chemical system
    max_sites: int | None = field(default=None, metadata={"min": 1})  # at most this many sites per structure
    stable_only: bool = False  # only materials on the convex hull
    limit: int | None = field(default=None, metadata={"min": 1})  # at most this many materials
    synthesis: bool = True  # also fetch / link synthesis recipes
    descriptions: bool = True  # also fetch robocrys descriptions (mp)
    endpoint: str | None = None  # Materials Project API endpoint (default: the public one)
    chunk_size: int = field(default=500, metadata={"min": 1})  # materials per request (mp); the unit of resumption


@with_sections("preprocess_config")
@dataclass
class PreprocessConfig:
    """``cmma preprocess``: how raw data becomes each modality's columns, and the splits.

    The modality settings (graph cutoff, XRD grid, user folders of measured patterns or images) are the
    sections each modality declares; these are the stage's own.
    """

    max_sites: int | None = 1000  # structures with more sites are rejected, before any work on them (None: no cap)
    max_volume: float | None = 50_000.0  # structures whose cell is larger (cubic Angstrom) are rejected, before any work on them (None: no cap)
    max_reflections: int | None = 200_000  # structures whose computed XRD pattern would need more reflections (about 4.2 (2 sin(theta_max) / wavelength)^3 V) are rejected (None: no cap)
    split_by: str = field(default="composition", metadata={"choices": ("composition", "chemsys")})  # group splits by reduced composition, or by chemical system: chemsys
    val_fraction: float = 0.1  # share of materials in the validation split
    test_fraction: float = 0.1  # share of materials in the test split
    seed: int = 0  # seed of the split assignment
    workers: int | None = None  # worker processes (None: all cores, 1 per 200 materials at most); same output
    chunk_size: int = 1024  # materials read, featurized and written per step; does not change the output
    settings: dict[str, Any] = field(default_factory=dict, repr=False)  # one section per modality (with_sections)


def _default_modalities() -> list[str]:
    return [name for name, m in _registry().items() if m.default]


@with_sections("train_config")
@dataclass
class TrainConfig:
    """``cmma train``: which modalities to align, the model's sizes and the optimisation.

    Each modality's encoder settings (``--structure-encoder``, ``--xrd-channels``, ...) are the section its
    module declares.
    """

    modalities: list[str] = field(default_factory=lambda: _default_modalities())  # modalities to align (default: the registered ones marked default)
    pairs: str = "all"  # modality pairs in the loss: all | anchor:<modality> | a-b,c-d
    in_modality_negatives: bool = False  # also contrast against other samples of the anchor's own modality
    recipes: bool = True  # also train on every synthesis recipe kept as a row of its own (processed/recipes.parquet: its text and target composition, no structure), in batches of recipes only
    objective: str = field(default="contrastive", metadata={"choices": ("contrastive", "predict", "contrastive+predict")})  # contrastive | predict (properties only, no alignment) | contrastive+predict
    predict_properties: list[str] = field(default_factory=list)  # properties the predict objective regresses (empty: every numeric one of processed/)
    predict_weight: float = 1.0  # weight of the property loss beside the contrastive one, for contrastive+predict
    epochs: int = 30  # passes over the train split
    batch_size: int = 128  # materials per process and step (negatives grow with the number of processes)
    accumulate: int = field(default=1, metadata={"min": 1})  # micro-batches of batch_size per step: the step's batch (and its in-batch negatives) is accumulate x batch_size per process, for the memory of one micro-batch (open_clip's accum_freq)
    lr: float = 1e-3  # peak AdamW learning rate (encoders without their own rate, heads, temperature)
    weight_decay: float = 0.2  # AdamW weight decay as in CLIP (matrices only: not biases, norms, the temperature)
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.01  # the cosine schedule ends at this fraction of the peak learning rate
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    modality_dropout: float = 0.0  # drop a present modality from a training sample with this probability
    embed_dim: int = 256  # dimension d of the shared embedding space
    proj_hidden: int = 512  # hidden width of the projection heads
    temperature: float = 0.07  # initial softmax temperature (logit scale 1/0.07, learnt, capped at 100)
    learn_temperature: bool = True  # learn the temperature (else keep the initial one)
    best_metric: str = field(default="val_loss", metadata={"choices": ("val_loss", "val_r1")})  # what picks best.pt: val_loss (lowest) | val_r1 (highest)
    seed: int = 0  # seeds the initialisation, batch order, text sampling, augmentation and dropout
    precision: str = field(default="auto", metadata={"choices": ("auto", "bf16", "fp32")})  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    workers: int | None = None  # data-loader processes per rank (None: 4 on GPU, 0 on CPU); does not change results
    keep_checkpoints: int = field(default=3, metadata={"min": 0})  # keep the newest N checkpoints/epoch-NNN.pt (0: keep all); best.pt and last.pt always stay
    projector: bool = True  # at the end, write the best model's val embeddings (at most 2,000 materials) to TensorBoard's embedding projector
    wandb: bool = False  # also log the per-epoch metrics to Weights & Biases (needs `pip install wandb`; offline without an API key)
    resume_any_data: bool = False  # with --resume: continue even though processed/ changed since the checkpoint (a new split can put materials it trained on into val/test)
    settings: dict[str, Any] = field(default_factory=dict, repr=False)  # one section per modality (with_sections)

    @property
    def predicts(self) -> bool:
        """Whether the objective regresses properties (predict or contrastive+predict)."""
        return "predict" in self.objective.split("+")


@dataclass
class EmbedConfig:
    """``cmma embed``: which trained run and checkpoint embed the processed materials, and the index kind."""

    run: str | None = None  # the run to embed with (None: the newest finished run)
    checkpoint: str = "best"  # best | last | a .pt file
    index: str = field(default="flat", metadata={"choices": ("flat", "ivf")})  # flat (exact inner product) | ivf (approximate, for millions of materials)
    nlist: int | None = field(default=None, metadata={"min": 1})  # IVF cells (None: about 4 sqrt(n), at least 39 vectors per cell)
    nprobe: int = field(default=16, metadata={"min": 1})  # IVF cells searched per query
    batch_size: int = field(default=256, metadata={"min": 1})  # materials per forward pass; does not change the output
    device: str = "auto"  # auto (the GPU when there is one) | cpu | cuda[:N]; does not change the output
    workers: int | None = field(default=None, metadata={"min": 0})  # collate processes (None: 4 on GPU, 0 on CPU); does not change the output


@dataclass
class RetrieveConfig:
    """``cmma retrieve``: which embeddings to search, from which modality into which index, how many hits."""

    run: str | None = None  # search the embeddings of this run (None: the newest)
    source: str | None = field(default=None, metadata={"long": "--from"})  # the modality that encodes the query, or unified (None: what the query is)
    target: str | None = field(default=None, metadata={"long": "--to"})  # the embeddings table to search: a modality, an extra table (synthesis), unified, or inputs/NAME (or inputs/NAME/TABLE) for what `cmma embed --input` wrote to embeddings/<run>/inputs/NAME/ (None: the first modality, else unified)
    k: int = field(default=10, metadata={"long": "--top", "short": "-k", "min": 1})  # results to return
    filters: list[str] = field(default_factory=list, metadata={"long": "--filter"})  # property filters, repeatable: "band_gap>1", "crystal_system==cubic"
    device: str = "cpu"  # where query encoders run (one query: the CPU is as fast as a GPU)
    threads: int | None = field(default=None, metadata={"min": 1})  # CPU threads for encoding and search (None: one per core; 1 is fastest on a busy machine)


#: Which recall proposes the candidates ``cmma identify`` fits (auto: both when a run has embeddings, else cosine).
RECALLS = ("auto", "both", "learned", "cosine")


@dataclass
class IdentifyConfig:
    """``cmma identify``: which phases a measured powder pattern holds, among a workspace's materials and references."""

    references: list[str] = field(default_factory=list)  # reference CIFs or folders of them, searched beside the workspace's materials
    elements: list[str] = field(default_factory=list)  # elements the sample may contain, e.g. Li,Mn,O: candidates with any other are left out
    chemsys: str | None = None  # the same as a chemical system, e.g. Li-Mn-O
    wavelength: str | None = None  # X-ray wavelength when the file states none: a name (CuKa, MoKa) or angstrom (None: the workspace's, CuKa by default)
    max_phases: int = field(default=3, metadata={"min": 1})  # the most phases a mixture is decomposed into
    min_gain: float = 0.15  # a further phase must lower the misfit by this fraction of what is left
    recall: str = field(default="auto", metadata={"choices": RECALLS})  # auto | both | learned | cosine: which ranking proposes candidates
    candidates: int = field(default=100, metadata={"min": 1})  # candidates the recall passes to the physics fit, per phase
    k: int = field(default=5, metadata={"long": "--top", "short": "-k", "min": 1})  # ranked candidates shown per phase
    run: str | None = None  # the trained run whose XRD encoder does the learned recall (None: the newest with embeddings)


@with_sections("evaluate_config")
@dataclass
class EvaluateConfig:
    """``cmma evaluate``: which run's embeddings to judge, which sections to run, and their settings."""

    run: str | None = None  # the embedded run to evaluate (None: the newest run with embeddings)
    sections: list[str] = field(default_factory=lambda: list(SECTIONS), metadata={"choices": SECTIONS, "verb": "name some of"})  # report sections to run
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # K of Recall@K
    hull_threshold: float = 0.0  # stable when energy_above_hull <= this (eV/atom), where is_stable is absent
    gap_threshold: float = 0.0  # metal when band_gap <= this (eV), where is_metal is absent
    probe_hidden: int = 128  # hidden width of the MLP probes
    min_train: int = 10  # a probe needs at least this many train rows with the target...
    min_test: int = 5  # ...and this many test rows
    maps: list[str] = field(default_factory=lambda: ["umap", "tsne"], metadata={"choices": ("umap", "tsne"), "verb": "name some of"})  # 2-D maps of the unified space: umap | tsne
    purity_k: int = 10  # neighbours in the neighbourhood-purity score
    interpolation_steps: int = 7  # points on the path between two materials' embeddings
    baseline_epochs: int = 40  # epochs of each supervised baseline model
    baseline_batch_size: int = 64  # materials per step of each supervised baseline
    baseline_lr: float = 1e-3  # AdamW learning rate of the supervised baselines
    baseline_properties: list[str] = field(default_factory=list)  # properties the baselines train on (empty: all probed; none: no property)
    baseline_tasks: list[str] = field(default_factory=list)  # classification tasks the baselines train on: stable, metal, crystal_system (empty: all probed; none: no task)
    explain_examples: int = 3  # test materials explained in the report
    ablation_epochs: int | None = None  # epochs of each ablation training run (None: the evaluated run's)
    ablation_dims: list[int] = field(default_factory=lambda: [32, 128, 256])  # latent dimensions of --ablation dim
    seed: int = 0  # seeds the probes, the baselines and the maps
    device: str = "auto"  # where supervised baselines train (and ablation runs embed): auto | cpu | cuda[:N]
    settings: dict[str, Any] = field(default_factory=dict, repr=False)  # one section per modality (with_sections)


@dataclass
class RecommendConfig:
    """``cmma recommend``: how many precursor sets to propose, from how many neighbouring recipes."""

    k: int = field(default=5, metadata={"long": "--top", "short": "-k", "min": 1})  # precursor sets to propose
    neighbours: int = field(default=40, metadata={"min": 1})  # nearest known recipes (by target composition) that vote
    evidence: int = field(default=3, metadata={"min": 0})  # source recipes shown per proposal
    element_embeddings: str | None = None  # JSON {element: vector} to compare compositions by (e.g. matminer's matscholar_els.json; None: element fractions)
