"""One dataclass per stage: every option a stage takes, with its default.

A stage's config is recorded in its manifest; an unchanged config over unchanged inputs means the
stage is up to date. ``--config file.toml`` files hold the same fields (a ``[train]`` table, ...).
Secrets (API keys) are never part of a config.
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from cmma_cli.errors import CMMAError


def as_dict(config: Any) -> dict[str, Any]:
    """A config as a plain dict (what manifests record)."""
    return asdict(config)


def load_toml_section(path: Path, section: str, cls: type) -> dict[str, Any]:
    """The ``[section]`` table of a TOML config file, checked against the fields of ``cls``."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CMMAError(f"Config file {path} does not exist: check the path given to --config.") from None
    except tomllib.TOMLDecodeError as exc:
        raise CMMAError(f"Config file {path} is not valid TOML ({exc}): fix it or leave out --config.") from None
    table = data.get(section, {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise CMMAError(
            f"Config file {path} has unknown [{section}] keys {unknown}: the known keys are {sorted(known)}."
        )
    return table


@dataclass
class FetchConfig:
    """``cmma fetch``: where raw data comes from and which materials to take."""

    source: str = "sample"  # sample | mp | local
    paths: list[str] = field(default_factory=list)  # local files / folders (source=local)
    elements: list[str] = field(default_factory=list)  # materials containing all of these elements (mp)
    chemsys: str | None = None  # e.g. "Li-Fe-O": exactly this chemical system (mp)
    max_sites: int | None = None  # at most this many sites per structure
    stable_only: bool = False  # only materials on the convex hull (mp)
    limit: int | None = None  # at most this many materials
    synthesis: bool = True  # also fetch / link synthesis recipes
    descriptions: bool = True  # also fetch robocrys descriptions (mp)
    endpoint: str | None = None  # Materials Project API endpoint (default: the public one)
    chunk_size: int = 500  # materials per request (mp); the unit of resumption


@dataclass
class PreprocessConfig:
    """``cmma preprocess``: how raw data becomes graphs, clean text, XRD patterns and splits."""

    cutoff: float = 5.0  # radius (Angstrom) of the periodic neighbour graph
    max_neighbors: int | None = None  # keep at most this many nearest neighbours per atom (ties kept)
    min_distance: float = 0.5  # atoms closer than this (Angstrom) overlap: the structure is rejected
    max_sites: int | None = None  # structures with more sites are rejected (None: no cap)
    xrd: bool = True  # compute a powder XRD pattern for every structure
    two_theta_min: float = 10.0  # start of the XRD 2-theta grid (degrees)
    two_theta_max: float = 90.0  # end of the XRD 2-theta grid (degrees)
    two_theta_step: float = 0.05  # XRD grid resolution (degrees); 10-90 at 0.05 gives 1601 points
    xrd_fwhm: float = 0.2  # Gaussian peak width (FWHM, degrees) used to broaden computed patterns
    wavelength: str = "CuKa"  # X-ray source for computed patterns (a pymatgen name, e.g. CuKa, MoKa)
    xrd_dir: str | None = None  # folder of measured patterns <material_id>.xy/.txt/.csv (2-theta, intensity)
    image_dir: str | None = None  # folder of images <material_id>.png/.jpg/.tif
    split_by: str = "composition"  # group splits by reduced composition, or by chemical system: chemsys
    val_fraction: float = 0.1  # share of materials in the validation split
    test_fraction: float = 0.1  # share of materials in the test split
    seed: int = 0  # seed of the split assignment
    workers: int | None = None  # worker processes (None: all cores, 1 per 200 materials at most); same output
    chunk_size: int = 1024  # materials read, featurized and written per step; does not change the output


@dataclass
class TrainConfig:
    """``cmma train``: which modalities to align, the model's sizes and the optimisation."""

    modalities: list[str] = field(default_factory=lambda: ["structure", "text", "xrd"])  # structure|text|xrd|image
    pairs: str = "all"  # modality pairs in the loss: all | anchor:<modality> | a-b,c-d
    in_modality_negatives: bool = False  # also contrast against other samples of the anchor's own modality
    objective: str = "contrastive"  # contrastive | predict (properties only, no alignment) | contrastive+predict
    predict_properties: list[str] = field(default_factory=list)  # properties the predict objective regresses (empty: every numeric one of processed/)
    predict_weight: float = 1.0  # weight of the property loss beside the contrastive one, for contrastive+predict
    epochs: int = 30  # passes over the train split
    batch_size: int = 128  # materials per process and step (negatives grow with the number of processes)
    lr: float = 1e-3  # peak AdamW learning rate (encoders other than text, heads, temperature)
    weight_decay: float = 0.2  # AdamW weight decay as in CLIP (matrices only: not biases, norms, the temperature)
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.01  # the cosine schedule ends at this fraction of the peak learning rate
    grad_clip: float = 1.0  # max global gradient norm (0: no clipping)
    modality_dropout: float = 0.0  # drop a present modality from a training sample with this probability
    embed_dim: int = 256  # dimension d of the shared embedding space
    proj_hidden: int = 512  # hidden width of the projection heads
    temperature: float = 0.07  # initial softmax temperature (logit scale 1/0.07, learnt, capped at 100)
    learn_temperature: bool = True  # learn the temperature (else keep the initial one)
    structure_encoder: str = "schnet"  # schnet | cgcnn | painn
    structure_hidden: int = 128  # width of the atom features (and of the structure encoder's output)
    structure_layers: int = 3  # message-passing layers
    num_rbf: int = 50  # Gaussian radial basis functions of the edge distances
    pooling: str = "mean"  # atoms -> material: mean | sum
    text_model: str = "all-MiniLM-L6-v2"  # the offline built-in, a Hugging Face id or a local folder
    text_tune: str = "frozen"  # frozen (embeddings cached) | full | top:K (fine-tune the top K layers)
    text_lr: float = 2e-5  # learning rate of the text model when it is fine-tuned
    text_max_length: int = 256  # tokens per text (longer texts are truncated)
    text_sources: list[str] = field(default_factory=lambda: ["description", "synthesis"])  # texts a material draws from
    xrd_channels: int = 32  # width of the first XRD convolution (doubles twice)
    xrd_out_dim: int = 256  # width of the XRD encoder's output
    xrd_augment: bool = True  # shift (up to 0.15 deg) and modulate training patterns as measurements differ
    image_model: str = "resnet18"  # any timm model name (image modality only)
    image_pretrained: bool = True  # start from timm's pretrained weights where they can be downloaded
    image_size: int = 224  # images are resized to this many pixels square
    best_metric: str = "val_loss"  # what picks best.pt: val_loss (lowest) | val_r1 (highest)
    seed: int = 0  # seeds the initialisation, batch order, text sampling, augmentation and dropout
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    workers: int | None = None  # data-loader processes per rank (None: 4 on GPU, 0 on CPU); does not change results

    @property
    def predicts(self) -> bool:
        """Whether the objective regresses properties (predict or contrastive+predict)."""
        return "predict" in self.objective.split("+")


@dataclass
class EmbedConfig:
    """``cmma embed``: which trained run and checkpoint embed the processed materials, and the index kind."""

    run: str | None = None  # the run to embed with (None: the newest finished run)
    checkpoint: str = "best"  # best | last | a .pt file
    index: str = "flat"  # flat (exact inner product) | ivf (approximate, for millions of materials)
    nlist: int | None = None  # IVF cells (None: about 4 sqrt(n), at least 39 vectors per cell)
    nprobe: int = 16  # IVF cells searched per query
    batch_size: int = 256  # materials per forward pass; does not change the output
    device: str = "auto"  # auto (the GPU when there is one) | cpu | cuda[:N]; does not change the output
    workers: int | None = None  # collate processes (None: 4 on GPU, 0 on CPU); does not change the output


@dataclass
class RetrieveConfig:
    """``cmma retrieve``: which embeddings to search, from which modality into which index, how many hits."""

    run: str | None = None  # search the embeddings of this run (None: the newest)
    source: str | None = None  # --from: text | structure | xrd | image | unified (None: what the query is)
    target: str | None = None  # --to: structure | text | xrd | image | synthesis | unified (None: structure, else unified)
    k: int = 10  # results to return
    filters: list[str] = field(default_factory=list)  # property filters, e.g. "band_gap>1", "crystal_system==cubic"
    device: str = "cpu"  # where query encoders run (one query: the CPU is as fast as a GPU)
    threads: int | None = None  # CPU threads for encoding and search (None: torch's and faiss's defaults)


@dataclass
class EvaluateConfig:
    """``cmma evaluate``: which run's embeddings to judge, which sections to run, and their settings."""

    run: str | None = None  # the embedded run to evaluate (None: the newest run with embeddings)
    sections: list[str] = field(default_factory=lambda: ["probes", "retrieval", "synthesis", "latent", "baselines", "explain"])  # report sections to run
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # K of Recall@K
    hull_threshold: float = 0.0  # stable when energy_above_hull <= this (eV/atom), where is_stable is absent
    gap_threshold: float = 0.0  # metal when band_gap <= this (eV), where is_metal is absent
    probe_hidden: int = 128  # hidden width of the MLP probes
    min_train: int = 10  # a probe needs at least this many train rows with the target...
    min_test: int = 5  # ...and this many test rows
    maps: list[str] = field(default_factory=lambda: ["umap", "tsne"])  # 2-D maps of the unified space: umap | tsne
    purity_k: int = 10  # neighbours in the neighbourhood-purity score
    interpolation_steps: int = 7  # points on the path between two materials' embeddings
    baseline_epochs: int = 40  # epochs of each supervised baseline model
    baseline_batch_size: int = 64  # materials per step of each supervised baseline
    baseline_lr: float = 1e-3  # AdamW learning rate of the supervised baselines
    baseline_properties: list[str] = field(default_factory=list)  # properties the baselines train on (empty: all probed; none: no property)
    baseline_tasks: list[str] = field(default_factory=list)  # classification tasks the baselines train on: stable, metal, crystal_system (empty: all probed; none: no task)
    explain_examples: int = 3  # test materials explained in the report
    xrd_region: float = 5.0  # width (degrees 2-theta) of the XRD attribution regions
    ablation_epochs: int | None = None  # epochs of each ablation training run (None: the evaluated run's)
    ablation_dims: list[int] = field(default_factory=lambda: [32, 128, 256])  # latent dimensions of --ablation dim
    seed: int = 0  # seeds the probes, the baselines and the maps
    device: str = "auto"  # where supervised baselines train (and ablation runs embed): auto | cpu | cuda[:N]
