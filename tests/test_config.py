"""Stage configs: each modality's settings are a nested section, set by the flat names users type."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cmma_cli.config import (PreprocessConfig, TrainConfig, as_dict, flat_dict, from_dict, load_toml_section,
                             validate)
from cmma_cli.errors import CMMAError


def test_flat_names_set_the_nested_sections():
    cfg = TrainConfig(xrd_channels=8, structure_encoder="painn", num_rbf=16, text_tune="top:2")
    assert (cfg.xrd.channels, cfg.structure.encoder, cfg.structure.num_rbf, cfg.text.tune) == (8, "painn", 16, "top:2")
    assert TrainConfig().xrd.channels == 32  # the section's own default
    pre = PreprocessConfig(xrd=False, cutoff=6.0, xrd_dir="/data/patterns")
    assert (pre.xrd.enabled, pre.structure.cutoff, pre.xrd.dir) == (False, 6.0, "/data/patterns")


def test_replace_keeps_the_sections_and_never_shares_them():
    cfg = TrainConfig(xrd_channels=8, structure_encoder="schnet")
    other = replace(cfg, epochs=3, structure_encoder="cgcnn")
    assert (other.epochs, other.xrd.channels, other.structure.encoder) == (3, 8, "cgcnn")
    assert cfg.structure.encoder == "schnet"  # the original is untouched
    other.xrd.channels = 4
    assert cfg.xrd.channels == 8


def test_the_default_structure_encoder_is_chgnet_where_it_is_installed(monkeypatch):
    import importlib.util

    assert TrainConfig().structure.encoder == "chgnet"  # a regular dependency
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "chgnet" else real(name, *a))
    assert TrainConfig().structure.encoder == "schnet"


def test_manifests_record_sections_and_old_flat_configs_still_load():
    cfg = TrainConfig(epochs=3, xrd_channels=8)
    recorded = as_dict(cfg)
    assert recorded["xrd"] == {"channels": 8, "out_dim": 256, "augment": True} and recorded["epochs"] == 3
    assert from_dict(TrainConfig, recorded) == cfg
    # runs trained before the sections existed recorded flat keys
    old = {"epochs": 3, "xrd_channels": 8, "structure_encoder": "painn", "text_tune": "frozen", "gone_key": 1}
    assert from_dict(TrainConfig, old) == TrainConfig(epochs=3, xrd_channels=8, structure_encoder="painn")
    assert flat_dict(cfg)["xrd_channels"] == 8 and "xrd" not in flat_dict(cfg)


def test_choices_are_checked_with_one_sentence():
    with pytest.raises(CMMAError, match=r"^--structure-encoder must be one of schnet, cgcnn, painn, chgnet, sevenn or a class given as "
                                       r"package\.module:Class, not 'schnett'\.$"):
        validate(TrainConfig(structure_encoder="schnett"))
    with pytest.raises(CMMAError, match=r"--text-sources must name some of description, synthesis, not abstract"):
        validate(TrainConfig(text_sources=["abstract"]))
    with pytest.raises(CMMAError, match="--text-tune must be frozen, full or top:K"):
        validate(TrainConfig(text_tune="top:0"))
    with pytest.raises(CMMAError, match=r"--split-by must be one of composition, chemsys, not 'formula'"):
        validate(PreprocessConfig(split_by="formula"))
    assert validate(TrainConfig()) == TrainConfig()


def test_toml_files_take_flat_keys_or_a_table_per_modality(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[train]\nepochs = 5\nxrd_channels = 16\n\n[train.structure]\nencoder = \"painn\"\nlayers = 2\n")
    values = load_toml_section(path, "train", TrainConfig)
    assert values == {"epochs": 5, "xrd_channels": 16, "structure_encoder": "painn", "structure_layers": 2}
    cfg = TrainConfig(**values)
    assert (cfg.epochs, cfg.xrd.channels, cfg.structure.encoder, cfg.structure.layers) == (5, 16, "painn", 2)


@pytest.mark.parametrize("line, message", [
    ('epochs = "ten"', r"\[train\] epochs must be a whole number, not 'ten'\."),
    ("lr = true", r"\[train\] lr must be a number, not True\."),
    ("xrd_augment = 1", r"\[train\] xrd_augment must be true or false, not 1\."),
    ("modalities = 3", r"\[train\] modalities must be a list of strings, not 3\."),
    ("predict_properties = [1]", r"\[train\] predict_properties must be a string, not 1\."),
])
def test_toml_values_of_the_wrong_type_are_one_sentence(tmp_path, line, message):
    path = tmp_path / "bad.toml"
    path.write_text(f"[train]\n{line}\n")
    with pytest.raises(CMMAError, match=message):
        load_toml_section(path, "train", TrainConfig)


def test_unknown_toml_keys_name_the_known_ones(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nepoch = 5\n")
    with pytest.raises(CMMAError, match=r"unknown \[train\] keys \['epoch'\]"):
        load_toml_section(path, "train", TrainConfig)
    path.write_text("[train.xrd]\nchanels = 5\n")
    with pytest.raises(CMMAError, match=r"unknown \[train.xrd\] keys \['chanels'\]: the known keys are \['augment'"):
        load_toml_section(path, "train", TrainConfig)
