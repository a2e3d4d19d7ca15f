"""Pretrained universal potentials (CHGNet, SevenNet) as structure encoders, on real structures pymatgen ships:
the processed columns rebuild the structure, the material vector's parts and invariances, the frozen cache,
frozen and partly fine-tuned backbones, the one-sentence errors, and a training run end to end."""

from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from pymatgen.core import Structure

from cmma_cli.config import FetchConfig, PreprocessConfig, TrainConfig, validate
from cmma_cli.errors import CMMAError
from cmma_cli.modalities import get_modality
from cmma_cli.modalities.base import Context, Item
from cmma_cli.modalities.columns import column_array
from cmma_cli.modalities.structure import encoders
from cmma_cli.modalities.structure.encoders import backbone
from cmma_cli.modalities.structure.encoders.backbone import (FEATURES, NUM_COMPOSITION, make_structure,
                                                             read_structures)
from cmma_cli.modalities.structure.encoders.chgnet import CHGNetBackbone
from cmma_cli.model import build_model, load_model, model_spec, spec_mismatch

pytest.importorskip("chgnet")

from test_model import real  # noqa: E402

STRUCTURE = get_modality("structure")
NAMES = ["LiFePO4", "Si", "SrTiO3", "TiO2", "CsCl", "Li2O"]


def processed_table(structures: list[Structure]) -> pa.Table:
    """The processed structure columns of ``structures``, made by the structure modality's own ``featurize``."""
    cfg = PreprocessConfig().structure
    rows = [STRUCTURE.featurize(Item(f"m{i}", s, {}), cfg) for i, s in enumerate(structures)]
    return pa.table({"material_id": [f"m{i}" for i in range(len(structures))],
                     **{f.name: column_array([r.get(f.name) for r in rows], f) for f in STRUCTURE.fields}})


def settings(encoder: str = "chgnet", **kw):
    return TrainConfig(structure_encoder=encoder, **{f"structure_{k}": v for k, v in kw.items()}).structure


@pytest.fixture
def fresh(monkeypatch):
    """No backbone kept loaded between tests (each test sees what loading costs)."""
    monkeypatch.setattr(backbone, "_LOADED", {})
    monkeypatch.setattr(backbone, "_READ", {})


def no_loading(monkeypatch) -> None:
    """Make any load of a backbone fail loudly."""
    def refuse(cls, checkpoint):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(backbone, "_LOADED", {})
    monkeypatch.setattr(backbone.BackboneEncoder, "quietly_load", classmethod(refuse))


def vectors(encoder: str, structures: list[Structure], features=FEATURES) -> torch.Tensor:
    """Material vectors computed straight from the structures (no cache)."""
    cls = encoders.encoder_class(encoder)
    spec = cls.make_spec(encoder, settings(encoder, features=list(features)), Context({}))
    model = cls.loaded(spec["backbone"], None)
    table = processed_table(structures)
    z, offsets, _, lattice, frac = read_structures(table)
    rebuilt = [make_structure(z[offsets[i]:offsets[i + 1]], lattice[i], frac[offsets[i]:offsets[i + 1]])
               for i in range(len(structures))]
    with torch.no_grad():
        parts = cls.extract(model, rebuilt)
    owners = torch.from_numpy(np.repeat(np.arange(len(structures)), np.diff(offsets)))
    return cls.assemble(parts, spec["features"], torch.from_numpy(z), owners, len(structures))


# ------------------------------------------------------------------------------------- processed columns


def test_the_processed_columns_rebuild_the_structure_and_preprocess_records_them():
    from cmma_cli.preprocess.pipeline import stage_config

    structures = [real(n) for n in NAMES]
    z, offsets, present, lattice, frac = read_structures(processed_table(structures))
    assert present.all()
    for i, s in enumerate(structures):
        rebuilt = make_structure(z[offsets[i]:offsets[i + 1]], lattice[i], frac[offsets[i]:offsets[i + 1]])
        assert [site.specie.Z for site in rebuilt] == [site.specie.Z for site in s]
        np.testing.assert_allclose(rebuilt.lattice.matrix, s.lattice.matrix, atol=1e-5)
        np.testing.assert_allclose(rebuilt.cart_coords, s.cart_coords, atol=1e-4)
    columns = stage_config(PreprocessConfig())["columns"]
    assert {"lattice", "frac_coords", "atomic_numbers"} <= set(columns)  # an older processed/ is not up to date


def test_processed_data_without_the_structure_columns_gets_one_sentence(fresh):
    table = processed_table([real("Si")]).drop_columns(["lattice", "frac_coords"])
    spec = STRUCTURE.spec(settings(), table, Context({}))
    with pytest.raises(CMMAError, match=r"no lattice, frac_coords column.* run `cmma preprocess --force`\.$"):
        STRUCTURE.prepare(table, spec, Context({}))


# ----------------------------------------------------------------------------------------- the vector


@pytest.mark.parametrize("encoder,layers", [("chgnet", 4 * 64), ("sevenn", 5 * 128)])
def test_the_material_vector_has_the_parts_the_settings_name(encoder, layers, fresh, tmp_path):
    pytest.importorskip(encoders.encoder_class(encoder).package)
    table = processed_table([real(n) for n in NAMES[:4]])
    ctx = Context({}, cache_dir=tmp_path)
    spec = STRUCTURE.spec(settings(encoder), table, ctx)
    assert spec["parts"] == {"layers": layers, "crystal": 64, "energy": 1, "composition": NUM_COMPOSITION}
    assert spec["dim"] == layers + 64 + 1 + NUM_COMPOSITION and spec["tune"] == "frozen"
    data = STRUCTURE.prepare(table, spec, ctx)
    inputs = STRUCTURE.collate(data, np.arange(4), None)
    out = STRUCTURE.encoder(spec)(inputs)
    assert out.shape == (4, spec["dim"]) and torch.isfinite(out).all()
    energy = out[:, layers + 64]
    assert (energy < 0).all() and (energy > -15).all()  # eV/atom of stable crystals
    composition = out[:, -NUM_COMPOSITION:]
    np.testing.assert_allclose(composition.sum(1).numpy(), 1.0, atol=1e-6)
    assert composition[1, 14 - 1] == 1.0  # Si
    two = STRUCTURE.spec(settings(encoder, features=["energy", "composition"]), table, ctx)
    assert two["dim"] == 1 + NUM_COMPOSITION
    small = STRUCTURE.collate(STRUCTURE.prepare(table, two, ctx), np.arange(4), None)["vector"]
    np.testing.assert_allclose(small.numpy(), out[:, layers + 64:].numpy(), atol=1e-6)  # same cache, fewer parts


@pytest.mark.parametrize("encoder", ["chgnet", "sevenn"])
def test_the_material_vector_is_invariant_to_site_order_rotation_and_translation(encoder, fresh):
    pytest.importorskip(encoders.encoder_class(encoder).package)
    s = real("LiFePO4")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(s))
    shuffled = Structure(s.lattice, [s[i].specie for i in order], s.frac_coords[order])
    angle = 0.7
    turn = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    axis = np.array([[1, 0, 0], [0, np.cos(1.1), -np.sin(1.1)], [0, np.sin(1.1), np.cos(1.1)]])
    rotated = Structure(s.lattice.matrix @ (axis @ turn).T, s.species, s.frac_coords)
    moved = Structure(s.lattice, s.species, s.frac_coords + np.array([0.31, -0.17, 0.55]))
    out = vectors(encoder, [s, shuffled, rotated, moved]).numpy()
    for other in out[1:]:
        np.testing.assert_allclose(other, out[0], rtol=1e-4, atol=2e-4)
    assert not np.allclose(vectors(encoder, [real("TiO2")]).numpy(), out[0], atol=1e-2)


# -------------------------------------------------------------------------------------- frozen and cached


def test_the_frozen_cache_is_reused_so_a_second_run_never_loads_the_backbone(fresh, monkeypatch, tmp_path):
    table = processed_table([real(n) for n in NAMES])
    ctx = Context({}, cache_dir=tmp_path, show_progress=False)
    spec = STRUCTURE.spec(settings(), table, ctx)
    first = STRUCTURE.prepare(table, spec, ctx)
    assert first.present.all() and sorted(p.suffix for p in (tmp_path / "structure").iterdir()) == [".json", ".parquet"]
    no_loading(monkeypatch)
    assert STRUCTURE.spec(settings(), table, ctx) == spec  # the part widths are remembered beside the cache
    again = STRUCTURE.prepare(table, spec, ctx)
    np.testing.assert_array_equal(again.vectors, first.vectors)
    # rows in another order, and a subset: looked up by structure, not by row
    back = STRUCTURE.prepare(table.take([3, 1]), spec, ctx)
    np.testing.assert_array_equal(back.vectors, first.vectors[[3, 1]])
    # a structure the cache has not seen needs the backbone
    with pytest.raises(AssertionError, match="loaded"):
        STRUCTURE.prepare(processed_table([real("VO2")]), spec, ctx)


def test_a_frozen_backbone_is_not_trained_nor_saved(fresh, tmp_path):
    table = processed_table([real(n) for n in NAMES[:3]])
    cfg = TrainConfig(modalities=["structure"], structure_encoder="chgnet", embed_dim=16, proj_hidden=32)
    ctx = Context({"config": {}}, cache_dir=tmp_path)
    spec = model_spec(cfg, table, ctx)
    model = build_model(spec)
    encoder = model.encoders["structure"]
    assert encoder.frozen and not list(encoder.parameters())
    assert not [k for k in model.state_dict() if k.startswith("encoders.structure.")]
    assert STRUCTURE.learning_rate(cfg.structure) is None
    assert spec_mismatch(spec, {**spec, "encoders": {**spec["encoders"], "structure": {
        **spec["encoders"]["structure"], "checkpoint": "/moved/elsewhere", "dim": 1}}}) == []
    other = model_spec(replace(cfg, structure=replace(cfg.structure, features=["energy"])), table, ctx)
    assert any("structure features" in d for d in spec_mismatch(spec, other))
    assert any("structure backbone" in d for d in spec_mismatch(spec, model_spec(
        replace(cfg, structure=replace(cfg.structure, encoder="schnet")), table, ctx)))


def test_top_k_trains_only_the_top_k_interaction_blocks(fresh, tmp_path):
    table = processed_table([real(n) for n in ["Si", "SrTiO3", "CsCl"]])
    ctx = Context({}, cache_dir=tmp_path)
    spec = STRUCTURE.spec(settings(tune="top:2"), table, ctx)
    encoder = STRUCTURE.encoder(spec)
    blocks = CHGNetBackbone.blocks(encoder.backbone)
    top = {id(p) for block in blocks[-2:] for m in block for p in m.parameters()}
    trainable = [p for p in encoder.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == top and 0 < len(trainable) < len(list(encoder.parameters()))
    assert all(k.startswith("backbone.") for k in encoder.state_dict())  # fine-tuned: saved with the run
    assert STRUCTURE.learning_rate(settings(tune="top:2", lr=3e-5)) == 3e-5
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    optimizer = torch.optim.SGD([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    data = STRUCTURE.prepare(table, spec, ctx)
    inputs = STRUCTURE.collate(data, np.arange(3), np.random.default_rng(0))
    assert set(inputs) == {"z", "frac", "lattice", "num_nodes"}
    out = encoder(inputs)
    assert out.shape == (3, spec["dim"])
    (out[:, :spec["parts"]["layers"]] ** 2).sum().backward()
    optimizer.step()
    changed = {n for n, p in encoder.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= {n for n, p in encoder.named_parameters() if id(p) in top}
    with pytest.raises(CMMAError, match=r"top:9 asks for more blocks than the CHGNet backbone has \(4\)"):
        STRUCTURE.encoder({**spec, "tune": "top:9"})


# ----------------------------------------------------------------------------------------------- errors


def test_a_backbone_whose_package_is_missing_gets_one_sentence(fresh, monkeypatch):
    monkeypatch.setitem(sys.modules, "chgnet", None)  # import chgnet raises ImportError
    with pytest.raises(CMMAError, match=r"^The CHGNet structure encoder needs the Python package chgnet, which is not "
                                        r"installed: pip install chgnet\.$"):
        STRUCTURE.spec(settings(), None, Context({}))


def test_other_mistakes_get_one_sentence(tmp_path):
    with pytest.raises(CMMAError, match=r"^The backbone checkpoint .*nope.pth.tar given to --structure-checkpoint does "
                                        r"not exist: .*\.$"):
        STRUCTURE.spec(settings(checkpoint=str(tmp_path / "nope.pth.tar")), None, Context({}))
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CMMAError, match=r"^The CHGNet structure encoder could not load the checkpoint .*bad.pth.tar"):
        STRUCTURE.spec(settings(checkpoint=str(bad)), None, Context({}))
    with pytest.raises(CMMAError, match=r"^--structure-tune must be frozen, full or top:K"):
        validate(TrainConfig(structure_encoder="chgnet", structure_tune="top:0"))
    with pytest.raises(CMMAError, match=r"^--structure-features must name some of layers, crystal, energy, composition"):
        validate(TrainConfig(structure_features=["atoms"]))
    with pytest.raises(CMMAError, match=r"^--structure-encoder no_such_module:Thing: the module no_such_module cannot"):
        STRUCTURE.spec(settings("no_such_module:Thing"), None, Context({}))
    with pytest.raises(CMMAError, match=r"has no class Nope\.$"):
        STRUCTURE.spec(settings("cmma_cli.modalities.structure.encoders.chgnet:Nope"), None, Context({}))


def test_a_users_own_adapter_class_is_named_by_its_module_path(fresh, tmp_path):
    """A subclass with other weights (here CHGNet's r2scan transfer-learned model), plugged in without cmma knowing it."""
    name = f"{__name__}:R2SCANCHGNet"
    validate(TrainConfig(structure_encoder=name))
    table = processed_table([real("Si"), real("CsCl")])
    ctx = Context({}, cache_dir=tmp_path)
    spec = STRUCTURE.spec(settings(name), table, ctx)
    assert spec["architecture"] == name and "r2scan" in spec["backbone"]
    default = STRUCTURE.spec(settings(), table, ctx)
    assert spec["backbone"] != default["backbone"]  # its own cache file
    mine = STRUCTURE.prepare(table, spec, ctx).vectors
    theirs = STRUCTURE.prepare(table, default, ctx).vectors
    assert mine.shape == theirs.shape and not np.allclose(mine, theirs)


class R2SCANCHGNet(CHGNetBackbone):
    weights = "r2scan"


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory):
    """40 materials of the built-in sample, fetched and preprocessed."""
    from cmma_cli.fetch import run_fetch
    from cmma_cli.preprocess.pipeline import run_preprocess
    from cmma_cli.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("backbone-ws"))
    run_fetch(ws, FetchConfig(source="sample", limit=40), api_key=None)
    run_preprocess(ws, PreprocessConfig(workers=1))
    return ws


def test_training_with_a_frozen_chgnet_end_to_end(tiny_ws, fresh, monkeypatch):
    from cmma_cli.model import read_checkpoint
    from cmma_cli.train import run_train

    cfg = TrainConfig(modalities=["structure", "xrd"], structure_encoder="chgnet", epochs=2, batch_size=16,
                      embed_dim=16, proj_hidden=32, xrd_channels=4, xrd_out_dim=16, seed=0, workers=0)
    run_train(tiny_ws, cfg, run="chgnet")
    best = tiny_ws.run_files("chgnet").best
    ckpt = read_checkpoint(best)
    assert ckpt["spec"]["encoders"]["structure"]["architecture"] == "chgnet"
    assert not [k for k in ckpt["model"] if k.startswith("encoders.structure.")]  # the frozen backbone is not saved
    model, _ = load_model(best)
    assert model.encoders["structure"].frozen
    # a second run recomputes nothing: the backbone is never loaded
    no_loading(monkeypatch)
    run_train(tiny_ws, replace(cfg, epochs=1), run="again")
    assert tiny_ws.run_files("again").best.exists()
