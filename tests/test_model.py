"""The model: structure-encoder invariances, the shared space, the temperature, checkpoints, text and XRD inputs."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pymatgen.util
import pytest
import torch
from pymatgen.core import Lattice, Structure

from cmma_cli.config import TrainConfig
from cmma_cli.errors import CMMAError
from cmma_cli.modalities import check_modalities, get_modality
from cmma_cli.modalities.base import Context
from cmma_cli.modalities.batches import MaterialSet
from cmma_cli.model import MAX_LOGIT_SCALE, build_model, load_model, model_spec, save_checkpoint, spec_mismatch
from cmma_cli.modalities.structure.graphs import build_graph

STRUCTURES = Path(pymatgen.util.__file__).parent / "structures"
CUTOFF = 5.0
#: A small model with a graph network trained from scratch (these tests are about the graph path; the pretrained
#: backbones, the default where installed, have their own tests in test_backbone.py).
SMALL = dict(embed_dim=32, proj_hidden=32, structure_encoder="schnet", structure_hidden=32, structure_layers=2,
             num_rbf=16, xrd_channels=8, xrd_out_dim=32)


def real(name: str) -> Structure:
    """A real structure that pymatgen ships (``LiFePO4``, ``Si``, ``SrTiO3``, ...)."""
    return Structure.from_file(STRUCTURES / f"{name}.json")


def structure_table(structures: list[Structure], ids: list[str] | None = None) -> pa.Table:
    """The processed structure columns for ``structures``, built by the preprocessing graph code."""
    graphs = [build_graph(s, cutoff=CUTOFF) for s in structures]
    return pa.table({
        "material_id": ids or [f"m{i}" for i in range(len(structures))],
        "atomic_numbers": pa.array([g.atomic_numbers.tolist() for g in graphs], pa.list_(pa.int16())),
        "edge_src": pa.array([g.edge_src.tolist() for g in graphs], pa.list_(pa.int32())),
        "edge_dst": pa.array([g.edge_dst.tolist() for g in graphs], pa.list_(pa.int32())),
        "edge_dist": pa.array([g.edge_dist.tolist() for g in graphs], pa.list_(pa.float32())),
        "edge_vec": pa.array([g.edge_vec.tolist() for g in graphs], pa.list_(pa.float32())),
    })


def structure_vectors(structures: list[Structure], architecture: str, pooling: str = "mean") -> torch.Tensor:
    """The structure encoder's material vectors (before the projection head), one row per structure."""
    torch.manual_seed(0)
    cfg = TrainConfig(modalities=["structure", "xrd"], **{**SMALL, "structure_encoder": architecture}, pooling=pooling)
    ctx = Context({"config": {"cutoff": CUTOFF}})
    modality = get_modality("structure")
    table = structure_table(structures)
    spec = modality.spec(cfg.structure, table, ctx)
    spec["avg_neighbors"] = 30.0  # fixed, so tables of different sizes get the same network
    encoder = modality.encoder(spec).double().eval()
    inputs = modality.collate(modality.prepare(table, spec, ctx), np.arange(len(structures)), None)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.no_grad():
        return encoder(inputs)


def rotation(seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


@pytest.mark.parametrize("architecture", ["schnet", "cgcnn", "painn"])
def test_structure_encoder_is_invariant_to_rotation_translation_and_site_order(architecture):
    base = real("LiFePO4")
    rot = rotation(1)
    rotated = Structure(Lattice(base.lattice.matrix @ rot.T), base.species, base.frac_coords)
    shifted = Structure(base.lattice, base.species, (base.frac_coords + [0.31, -0.17, 0.42]) % 1.0)
    order = np.random.default_rng(2).permutation(len(base))
    permuted = Structure(base.lattice, [base.species[i] for i in order], base.frac_coords[order])
    strained = Structure(Lattice(base.lattice.matrix * 1.04), base.species, base.frac_coords)
    other = real("NaFePO4")  # same structure type, Li -> Na

    out = structure_vectors([base, rotated, shifted, permuted, strained, other], architecture)
    scale = out[0].abs().max()
    for k, what in ((1, "rotation"), (2, "translation"), (3, "site order")):
        assert torch.allclose(out[k], out[0], atol=1e-9 * float(scale) + 1e-10), f"{architecture} changed under {what}"
    # and it is not blind: a 4 % strain or a Li -> Na substitution moves the vector
    assert (out[4] - out[0]).abs().max() > 1e-4 * scale
    assert (out[5] - out[0]).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("architecture", ["schnet", "painn"])
def test_mean_pooling_gives_a_supercell_the_vector_of_its_cell_and_sum_pooling_doubles_it(architecture):
    cell = real("SrTiO3")
    supercell = cell.copy()
    supercell.make_supercell([2, 1, 1])
    mean = structure_vectors([cell, supercell], architecture, "mean")
    total = structure_vectors([cell, supercell], architecture, "sum")
    assert torch.allclose(mean[1], mean[0], atol=1e-8)
    assert torch.allclose(total[1], 2 * total[0], atol=1e-8)


def test_graphs_are_collated_into_one_disjoint_batch():
    structures = [real("Si"), real("SrTiO3"), real("LiFePO4")]
    table = structure_table(structures)
    modality = get_modality("structure")
    cfg = TrainConfig(**SMALL)
    spec = modality.spec(cfg.structure, table, Context({"config": {"cutoff": CUTOFF}}))
    data = modality.prepare(table, spec, Context({}))
    batch = modality.collate(data, np.array([2, 0]), None)  # LiFePO4 then Si
    n_lfp, n_si = len(structures[2]), len(structures[0])
    assert batch["num_nodes"].tolist() == [n_lfp, n_si]
    assert batch["batch"].tolist() == [0] * n_lfp + [1] * n_si
    assert batch["z"][n_lfp:].tolist() == [14] * n_si
    receivers = batch["edge_index"][1]
    si_edges = receivers >= n_lfp  # Si's edges come second and point only at Si atoms
    assert (batch["edge_index"][0][si_edges] >= n_lfp).all() and (batch["edge_index"][0][~si_edges] < n_lfp).all()
    # Si: every atom has 4 neighbours at 2.35 A among its edges, and edge vectors match the distances
    assert np.isclose(batch["dist"][si_edges].min().item(), 2.35, atol=0.02)
    assert torch.allclose(batch["vec"].norm(dim=1), batch["dist"], atol=1e-4)
    assert spec["avg_neighbors"] == pytest.approx(sum(len(g) for g in table["edge_src"].to_pylist()) / sum(map(len, structures)), rel=1e-3)


def _model_spec(modalities=("structure", "xrd"), **overrides) -> dict:
    cfg = TrainConfig(modalities=list(modalities), **{**SMALL, **overrides})
    table = structure_table([real("Si"), real("SrTiO3")])
    return model_spec(cfg, table, Context({"config": {"cutoff": CUTOFF}, "xrd_grid": {"size": 401}}))


def test_projections_are_unit_vectors_in_the_shared_space_and_absent_rows_are_zero():
    torch.manual_seed(0)
    model = build_model(_model_spec()).eval()
    table = structure_table([real("Si"), real("SrTiO3"), real("LiFePO4")])
    data = get_modality("structure").prepare(table, model.spec["encoders"]["structure"], Context({}))
    masks = {"structure": torch.tensor([True, False, True]),
             "xrd": torch.tensor([True, True, False])}
    inputs = {"structure": get_modality("structure").collate(data, np.array([0, 2]), None),
              "xrd": {"pattern": torch.rand(2, 401)}}
    features, scale = model(inputs, masks)
    assert features["structure"].shape == (3, 32) and features["xrd"].shape == (3, 32)
    assert torch.allclose(features["structure"][[0, 2]].norm(dim=1), torch.ones(2), atol=1e-5)
    assert features["structure"][1].abs().sum() == 0 and features["xrd"][2].abs().sum() == 0
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_logit_scale_is_clamped_at_100_like_clip():
    model = build_model(_model_spec())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(500.0))
    assert model.scale().item() == pytest.approx(MAX_LOGIT_SCALE)
    model.clamp_logit_scale()
    assert model.logit_scale.exp().item() == pytest.approx(MAX_LOGIT_SCALE, rel=1e-5)


def test_xrd_encoder_sees_where_peaks_are():
    torch.manual_seed(0)
    spec = get_modality("xrd").spec(TrainConfig(**SMALL).xrd, None, Context({"xrd_grid": {"size": 1601}}))
    assert spec["length"] == 1601
    encoder = get_modality("xrd").encoder(spec).eval()
    grid = np.linspace(10, 90, 1601)
    peaks = lambda centres: torch.tensor(sum(np.exp(-0.5 * ((grid - c) / 0.1) ** 2) for c in centres), dtype=torch.float32)
    a, b, c = peaks([28.4, 47.3, 56.1]), peaks([28.4, 47.3, 56.1]), peaks([30.4, 49.3, 58.1])
    with torch.no_grad():
        out = encoder({"pattern": torch.stack([a, b, c])})
    assert out.shape == (3, 32)
    assert torch.allclose(out[0], out[1])
    assert (out[2] - out[0]).abs().max() > 1e-3


def test_a_checkpoint_rebuilds_the_same_model_without_the_data(tmp_path):
    torch.manual_seed(0)
    spec = _model_spec()
    model = build_model(spec).eval()
    path = save_checkpoint(tmp_path / "m.pt", {"spec": spec, "model": model.state_dict(), "epoch": 1})
    loaded, ckpt = load_model(path)
    pattern = {"pattern": torch.rand(4, 401)}
    assert torch.equal(loaded.embed("xrd", pattern), model.embed("xrd", pattern))
    assert ckpt["spec"]["encoders"]["xrd"]["length"] == 401 and ckpt["epoch"] == 1


def test_spec_mismatch_names_what_differs_and_ignores_measured_facts():
    a = _model_spec()
    b = _model_spec(embed_dim=64, structure_encoder="painn")
    c = _model_spec()
    c["encoders"]["structure"]["avg_neighbors"] = 99.0
    assert spec_mismatch(a, c) == []
    diffs = spec_mismatch(a, b)
    assert "embed_dim 32 -> 64" in diffs and "structure architecture schnet -> painn" in diffs
    assert spec_mismatch(a, _model_spec(("structure", "text"))) [0] == "modalities structure,xrd -> structure,text"


def test_modality_names_are_checked():
    assert check_modalities(["structure", " text", "structure"]) == ["structure", "text"]
    with pytest.raises(CMMAError, match="Unknown modality 'spectra'"):
        check_modalities(["structure", "spectra"])
    with pytest.raises(CMMAError, match="at least two"):
        check_modalities(["structure"])


# ----------------------------------------------------------------------------------------------- text


def text_table() -> pa.Table:
    return pa.table({
        "material_id": ["a", "b", "c"],
        "description": ["NaCl is Rock Salt structured and crystallizes in the cubic Fm-3m space group.", None,
                        "Si is diamond structured and crystallizes in the cubic Fd-3m space group."],
        "synthesis_texts": pa.array([["Na2CO3 and HCl were mixed and dried at 120 C."], None, None],
                                    pa.list_(pa.string())),
    })


def test_frozen_text_is_embedded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    import cmma_cli.modalities.text.encoder as text

    cfg = TrainConfig(**SMALL)
    ctx = Context({}, cache_dir=tmp_path, show_progress=False)
    modality = get_modality("text")
    spec = modality.spec(cfg.text, None, ctx)
    assert spec["dim"] == 384 and spec["tune"] == "frozen"
    data = modality.prepare(text_table(), spec, ctx)
    assert data.present.tolist() == [True, False, True]
    assert len(data.texts) == 3  # two descriptions and one synthesis text
    # the cached vectors are the sentence model's own embeddings
    direct = text.load_sentence_model(cfg.text.model).encode(data.texts, convert_to_numpy=True)
    assert np.allclose(data.embeddings, direct, atol=1e-5)
    # a second run never loads the model: everything comes from <cache>/text/
    monkeypatch.setattr(text, "load_sentence_model", lambda *a, **k: pytest.fail("the cache was not used"))
    again = modality.prepare(text_table(), spec, ctx)
    assert np.array_equal(again.embeddings, data.embeddings)
    assert len(list((tmp_path / "text").glob("*.parquet"))) == 1


def test_text_sampling_is_random_in_training_and_the_description_in_evaluation(tmp_path):
    modality = get_modality("text")
    ctx = Context({}, cache_dir=tmp_path, show_progress=False)
    data = modality.prepare(text_table(), modality.spec(TrainConfig(**SMALL).text, None, ctx), ctx)
    rows = np.zeros(64, dtype=np.int64)  # material "a", which has a description and a synthesis text
    evaluation = modality.collate(data, rows, None)["embedding"]
    assert torch.equal(evaluation, torch.from_numpy(data.embeddings[[0] * 64]))  # always the description
    training = modality.collate(data, rows, np.random.default_rng(0))["embedding"]
    picked = {int(torch.argmin((torch.from_numpy(data.embeddings) - v).abs().sum(1))) for v in training}
    assert picked == {0, 1}


def test_partial_fine_tuning_trains_only_the_top_layers():
    spec = get_modality("text").spec(TrainConfig(text_tune="top:2").text, None, Context({}))
    encoder = get_modality("text").encoder(spec)
    trainable = {n.split(".layer.")[1].split(".")[0] for n, p in encoder.named_parameters()
                 if p.requires_grad and ".layer." in n}
    assert trainable == {"4", "5"}  # MiniLM-L6 has layers 0-5
    assert not any(p.requires_grad for n, p in encoder.named_parameters() if "embeddings" in n)
    with pytest.raises(CMMAError, match="frozen, full or top:K"):
        get_modality("text").spec(TrainConfig(text_tune="top:0").text, None, Context({}))


def test_an_unloadable_text_model_is_one_sentence(tmp_path):
    cfg = TrainConfig(text_model=str(tmp_path / "no-such-model"))
    with pytest.raises(CMMAError, match="The text model .* pass --text-model a local folder"):
        get_modality("text").spec(cfg.text, None, Context({}))


def test_the_image_modality_needs_timm_or_says_how_to_get_it():
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(CMMAError, match=r"needs timm.*pip install 'cmma\[images\]'"):
            get_modality("image").spec(TrainConfig().image, None, Context({}))
        return
    spec = get_modality("image").spec(TrainConfig(image_model="resnet18", image_pretrained=False, image_size=64).image, None, Context({}))
    encoder = get_modality("image").encoder(spec)
    assert encoder({"image": torch.rand(2, 3, 64, 64)}).shape == (2, encoder.out_dim)


def test_a_material_set_collates_masks_and_only_present_inputs(tmp_path):
    table = structure_table([real("Si"), real("SrTiO3"), real("LiFePO4")], ids=["a", "b", "c"])
    for name in ("description", "synthesis_texts"):
        table = table.append_column(name, text_table()[name])
    cfg = TrainConfig(modalities=["structure", "text"], **SMALL)
    ctx = Context({"config": {"cutoff": CUTOFF}}, cache_dir=tmp_path, show_progress=False)
    spec = model_spec(cfg, table, ctx)
    materials = MaterialSet(table, spec["encoders"], ctx)
    assert materials.modality_counts().tolist() == [2, 1, 2]
    batch = materials.collate(np.array([0, 1, 2]))
    assert batch["masks"]["text"].tolist() == [True, False, True]
    assert batch["inputs"]["text"]["embedding"].shape == (2, 384)
    assert batch["inputs"]["structure"]["num_nodes"].tolist() == [2, 5, 28]
    dropped = materials.collate(np.arange(3).repeat(200), np.random.default_rng(0), dropout=0.5)
    kept = dropped["masks"]["structure"].float().mean().item()
    assert 0.4 < kept < 0.6  # each present modality is dropped with probability 0.5


def test_xrd_training_patterns_look_measured_but_evaluation_patterns_are_not():
    grid = np.linspace(10, 90, 1601)
    pattern = np.exp(-0.5 * ((grid - 40.0) / 0.085) ** 2) + 0.5 * np.exp(-0.5 * ((grid - 60.0) / 0.085) ** 2)
    other = np.exp(-0.5 * ((grid - 25.0) / 0.085) ** 2)
    table = pa.table({"material_id": ["a", "b", "c"],
                      "xrd": pa.array([pattern.astype(np.float32).tolist(), None, other.astype(np.float32).tolist()],
                                      pa.list_(pa.float32()))})
    modality = get_modality("xrd")
    ctx = Context({"xrd_grid": {"size": 1601, "step": 0.05, "two_theta_min": 10.0, "wavelength": "CuKa"}})
    spec = modality.spec(TrainConfig(**SMALL).xrd, table, ctx)
    assert spec["augment"] and spec["max_shift"] == 6  # 0.3 degrees on a 0.05 degree grid
    data = modality.prepare(table, spec, ctx)
    assert data.present.tolist() == [True, False, True]
    rows = np.zeros(400, dtype=np.int64)
    assert torch.equal(modality.collate(data, rows[:1], None)["pattern"][0], torch.from_numpy(pattern.astype(np.float32)))
    augmented = modality.collate(data, np.r_[rows, [2]], np.random.default_rng(0))["pattern"].numpy()[:400]
    assert np.allclose(augmented.max(axis=1), 1.0) and (augmented >= 0).all()
    # the strongest peak moves (zero shift and strain: at 40 degrees 1.5 % strain is ~0.6 degrees) but stays near 40
    first = 500 + augmented[:, 500:700].argmax(axis=1)  # 35-45 degrees holds the 40-degree peak
    moved = grid[first] - 40.0
    assert 0.3 < np.abs(moved).max() < 1.0 and len(set(np.round(moved, 2))) > 10
    # strain moves the 60-degree peak further than the 40-degree one: their separation changes
    second = grid[800 + augmented[:, 800:1400].argmax(axis=1)]  # 50-80 degrees holds the 60-degree peak
    separation = second - grid[first]
    assert separation.std() > 0.05
    # broadening: some peaks wider than the input's 0.2-degree FWHM
    widths = (augmented > 0.5 * augmented.max(axis=1, keepdims=True)).sum(axis=1) * 0.05
    assert widths.max() > 0.35 and np.median(widths) < 0.5
    # texture changes relative intensities; noise, background and impurity peaks put signal between the peaks
    ratios = augmented[np.arange(400), 800 + augmented[:, 800:1400].argmax(axis=1)]
    assert ratios.min() < 0.4 < 0.6 < ratios.max()
    between = augmented[:, 1100:1500].max(axis=1)  # 65-85 degrees: no peak of its own
    assert (between > 0.02).mean() > 0.15
    # mixtures: the other pattern's 25-degree peak shows up in some
    assert 0.05 < (augmented[:, 250:350].max(axis=1) > 0.03).mean() < 0.95
