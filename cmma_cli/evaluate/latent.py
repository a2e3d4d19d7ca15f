"""The latent space: 2-D maps (UMAP, t-SNE), neighbourhood purity, and interpolation between materials.

Maps show every material's unified embedding (test materials drawn larger), coloured by a numeric
property and by crystal system. Purity is measured on the test split only: the share of each test
material's k nearest test neighbours (cosine) with the same crystal system, beside its chance value.
Interpolation walks the great circle between two test materials' unified embeddings and lists the
materials nearest to each point.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cmma_cli.evaluate import metrics as M
from cmma_cli.evaluate.data import EvalData

#: Preferred property to colour maps by, in order; else the first numeric property.
COLOUR_PREFERENCE = ("formation_energy_per_atom", "band_gap", "heat_all", "density")


def embed_2d(x: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """``(n, 2)`` coordinates of ``x`` by ``umap`` or ``tsne`` (cosine geometry)."""
    n = len(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(max(2.0, min(30.0, (n - 1) / 3.0)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", metric="cosine", random_state=seed).fit_transform(x)
    if method == "umap":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import umap

            return umap.UMAP(n_neighbors=int(max(2, min(15, n - 1))), metric="cosine", random_state=seed,
                             init="random" if n < 10 else "spectral").fit_transform(x)
    raise ValueError(f"unknown map method {method!r}")


def _plot(coords: np.ndarray, values: pd.Series, is_test: np.ndarray, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=110)
    sizes = np.where(is_test, 28, 9)
    known = values.notna().to_numpy()
    if not known.all():
        ax.scatter(coords[~known, 0], coords[~known, 1], s=sizes[~known], c="lightgrey", label="unknown", linewidths=0)
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        sc = ax.scatter(coords[known, 0], coords[known, 1], s=sizes[known], c=values[known].astype(float),
                        cmap="viridis", linewidths=0)
        fig.colorbar(sc, ax=ax, label=values.name)
    else:
        labels = values[known].astype(str)
        for i, cat in enumerate(sorted(labels.unique())):
            sel = np.flatnonzero(known)[(labels == cat).to_numpy()]
            ax.scatter(coords[sel, 0], coords[sel, 1], s=sizes[sel], color=plt.cm.tab10(i % 10), label=cat, linewidths=0)
        ax.legend(fontsize=7, markerscale=1.5, loc="best", frameon=False)
    ax.set_title(title, fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def colour_property(data: EvalData) -> str | None:
    """The numeric property the maps are coloured by (one with values), or None."""
    for p in COLOUR_PREFERENCE:
        if p in data.numeric_properties:
            return p
    return data.numeric_properties[0] if data.numeric_properties else None


def slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """The unit vector a fraction ``t`` of the way along the great circle from unit ``a`` to unit ``b``."""
    omega = float(np.arccos(np.clip(a @ b, -1.0, 1.0)))
    if omega < 1e-6:
        v = (1 - t) * a + t * b
    else:
        v = (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)
    return v / np.linalg.norm(v)


def interpolate(data: EvalData, start: str, end: str, steps: int, k: int = 3) -> dict[str, Any]:
    """The ``k`` materials nearest to each of ``steps`` points between ``start``'s and ``end``'s unified embeddings."""
    emb = data.tables["unified"]
    formula = data.materials.set_index("material_id")["formula"]
    a, b = (emb.vectors[emb.rows_of(np.array([m]))[0]] for m in (start, end))
    path = []
    for t in np.linspace(0.0, 1.0, steps):
        sim = emb.vectors @ slerp(a, b, float(t))
        top = np.argsort(-sim, kind="stable")[:k]
        path.append({"t": round(float(t), 3), "nearest": [
            {"material_id": str(emb.ids[i]), "formula": str(formula.get(emb.ids[i], "?")), "similarity": float(sim[i])}
            for i in top]})
    return {"start": {"material_id": start, "formula": str(formula.get(start, "?"))},
            "end": {"material_id": end, "formula": str(formula.get(end, "?"))}, "path": path}


def run_latent(data: EvalData, cfg: Any, figures: Path) -> dict[str, Any]:
    """Maps (PNG files in ``figures``), purity per embedding table and one interpolation path."""
    out: dict[str, Any] = {"figures": [], "purity": {}, "purity_k": cfg.purity_k,
                           "description": "2-D maps of every material's unified embedding (test materials drawn "
                                          "larger); the maps are pictures, the purity scores below are the measurement."}
    emb = data.tables["unified"]
    mats = data.materials.set_index("material_id")
    ids = np.array([m for m in emb.ids if m in mats.index], dtype=object)
    x = emb.vectors[emb.rows_of(ids)]
    is_test = (mats.loc[list(ids), "split"] == "test").to_numpy()
    if len(ids) < 5:
        out["note"] = f"Only {len(ids)} materials have unified embeddings: no maps."
        return out
    prop = colour_property(data)
    colourings = [c for c in (prop, "crystal_system") if c is not None and c in mats]
    maps = []
    for method in cfg.maps:
        coords = embed_2d(x, method, cfg.seed)
        maps.append(pd.DataFrame({"material_id": ids.astype(str), "method": method, "x": coords[:, 0], "y": coords[:, 1]}))
        for col in colourings:
            name = f"{method}_{col}.png"
            values = mats.loc[list(ids), col].reset_index(drop=True)
            if col != "crystal_system":
                values = pd.to_numeric(values, errors="coerce").astype(float)
            values.name = col
            _plot(coords, values, is_test, f"{method.upper()} of the unified embeddings, coloured by {col}", figures / name)
            out["figures"].append(name)
    if maps:  # the coordinates themselves, for `cmma serve`'s interactive map and for a user's own plots
        from cmma_cli.workspace import write_table

        write_table(pd.concat(maps, ignore_index=True), figures / "maps.parquet")
        out["coordinates"] = "maps.parquet"

    if "crystal_system" in mats:
        test_ids = data.split_ids("test")
        labels_all = mats["crystal_system"]
        for table, e in data.tables.items():
            have = [m for m in test_ids if m in set(e.ids) and pd.notna(labels_all.get(m))]
            if len(have) < 3:
                continue
            labels = labels_all.loc[have].astype(str).to_numpy()
            vecs = e.vectors[e.rows_of(np.array(have, dtype=object))]
            out["purity"][table] = {"purity": M.neighbourhood_purity(vecs, labels, cfg.purity_k),
                                    "chance": M.chance_purity(labels), "n": len(have)}

    test_ids = [m for m in data.split_ids("test") if m in set(ids)]
    if len(test_ids) >= 2:
        e = emb.vectors[emb.rows_of(np.array(test_ids, dtype=object))]
        start = 0
        end = int(np.argmin(e @ e[start]))  # the test material least like the first one
        out["interpolation"] = interpolate(data, test_ids[start], test_ids[end], cfg.interpolation_steps)
    return out
