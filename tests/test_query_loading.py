"""A query loads only what it needs: its own encoder (not the whole model), and no plotting stack to read a pattern."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq

from cmma_cli.retrieve import Query, Retriever


def test_a_query_builds_only_its_own_encoder_and_gets_the_full_models_vector(embedded_sample, tmp_path):
    from pymatgen.core import Structure

    from cmma_cli.encode import Encoder

    raw = pq.read_table(embedded_sample.ws.raw / "materials.parquet", columns=["material_id", "structure"]).to_pylist()
    path = tmp_path / "query.cif"
    Structure.from_dict(json.loads(raw[0]["structure"])).to(filename=str(path))
    retriever = Retriever(embedded_sample.ws, embedded_sample.run)
    result = retriever.query(Query(structure=path), source="xrd", target="xrd", k=3)
    assert set(retriever.encoder(["xrd"]).model.encoders) == {"xrd"}  # no structure backbone, no text model
    partial = retriever.encode(Query(structure=path), "xrd")

    full = Encoder(retriever.ws.locate(retriever.manifest["checkpoint"]["path"]), retriever.encoder([]).processed_manifest,
                   device="cpu", show_progress=False)
    assert set(full.model.encoders) == {"structure", "text", "xrd"}
    np.testing.assert_array_equal(partial, full.embed_query("structure", path, "xrd"))
    assert result.rows[0]["material_id"] == raw[0]["material_id"]
    # asking for the whole model (the default) builds the rest, once
    assert set(retriever.encoder().model.encoders) == {"structure", "text", "xrd"}
    np.testing.assert_array_equal(retriever.encode(Query(structure=path), "xrd"), partial)


def test_the_xrd_constants_are_pymatgens_and_reading_a_pattern_imports_no_plotting():
    from pymatgen.analysis.diffraction.core import AbstractDiffractionPatternCalculator
    from pymatgen.analysis.diffraction.xrd import ATOMIC_SCATTERING_PARAMS, WAVELENGTHS

    from cmma_cli.modalities.xrd import simulate

    read = simulate._read_pymatgen_constants()
    assert read["WAVELENGTHS"] == WAVELENGTHS and read["ATOMIC_SCATTERING_PARAMS"] == ATOMIC_SCATTERING_PARAMS
    assert read["TWO_THETA_TOL"] == simulate.TWO_THETA_TOL == AbstractDiffractionPatternCalculator.TWO_THETA_TOL
    assert simulate.SCALED_INTENSITY_TOL == AbstractDiffractionPatternCalculator.SCALED_INTENSITY_TOL
    code = ("import sys; import cmma_cli.modalities.xrd.readers as r; r.wavelength_angstrom('CuKa'); "
            "print(sorted(m for m in ('pymatgen.analysis.diffraction.core', 'matplotlib.pyplot', 'scipy.stats') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
