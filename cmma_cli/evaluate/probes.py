"""Property probes on frozen embeddings: what a simple model can read off the shared space.

For every numeric property and every embedding table (``unified`` and each modality alone), a ridge
regression and a small MLP are fitted on the *train* split, ridge's penalty is chosen on *val*, and
all scores are computed on *test*, beside two dummies: one predicts the train mean, the other the train
median (on a zero-inflated target, such as band gaps that are mostly 0, the median dummy is the honest
floor: predicting 0 everywhere already has a small MAE). Classification
probes (stable / unstable, metal / insulator, crystal system) do the same with a logistic regression
and an MLP against a majority-class dummy. Every probe records the material ids it was fitted on, so
a caller (and the tests) can check that no test material was ever seen while fitting.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from cmma_cli.evaluate import metrics as M
from cmma_cli.evaluate.data import EvalData

RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
LOGISTIC_CS = (0.1, 1.0, 10.0)
CLASSIFICATION_TASKS = ("stable", "metal", "crystal_system")


@dataclass
class Part:
    """The rows of one split that have both the embedding and the target."""

    ids: np.ndarray
    X: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Audit:
    """Which materials a probe was fitted on (train + val for model selection) and scored on (test)."""

    fit_ids: set[str]
    test_ids: set[str]


def split_parts(data: EvalData, table: str, target: pd.Series) -> dict[str, Part]:
    """Train / val / test parts of embedding ``table`` for ``target`` (indexed like ``data.materials``)."""
    emb = data.tables[table]
    mats = data.materials
    keep = target.notna().to_numpy().copy()
    rows = emb.rows_of(mats["material_id"].to_numpy())
    keep &= rows >= 0
    out = {}
    for split in ("train", "val", "test"):
        sel = keep & (mats["split"] == split).to_numpy()
        out[split] = Part(mats["material_id"].to_numpy()[sel], emb.vectors[rows[sel]], target.to_numpy()[sel])
    overlap = set(out["test"].ids) & (set(out["train"].ids) | set(out["val"].ids))
    if overlap:  # splits.parquet gives each material one split; anything else is a corrupt workspace
        raise RuntimeError(f"materials in both the test split and a fitting split: {sorted(overlap)[:5]}")
    return out


def _quiet(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` without sklearn's convergence and scipy's ill-conditioning warnings: the validation
    split judges the fit, and a wall of warnings on the terminal would hide the progress bar."""
    from scipy.linalg import LinAlgWarning
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", LinAlgWarning)
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------------------ regression


def fit_regression(parts: dict[str, Part], seed: int = 0, hidden: int = 128) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Scores of the dummy, ridge and MLP probes on ``parts["test"]``, and their test predictions."""
    from sklearn.linear_model import Ridge
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler

    train, val, test = parts["train"], parts["val"], parts["test"]
    y_train = train.y.astype(float)
    scaler = StandardScaler().fit(train.X)
    mu, sd = y_train.mean(), y_train.std() or 1.0
    Xtr, Xva, Xte = scaler.transform(train.X), scaler.transform(val.X) if len(val) else None, scaler.transform(test.X)
    z = (y_train - mu) / sd

    alpha = 1.0
    if len(val) >= 3:
        errors = [M.mae(val.y, _quiet(Ridge(alpha=a).fit, Xtr, z).predict(Xva) * sd + mu) for a in RIDGE_ALPHAS]
        alpha = RIDGE_ALPHAS[int(np.argmin(errors))]
    preds = {
        "dummy": np.full(len(test), mu),
        "dummy_median": np.full(len(test), float(np.median(y_train))),
        "ridge": _quiet(Ridge(alpha=alpha).fit, Xtr, z).predict(Xte) * sd + mu,
    }
    mlp = MLPRegressor(hidden_layer_sizes=(hidden,), alpha=1e-3, learning_rate_init=1e-3, max_iter=400,
                       early_stopping=len(train) >= 50, n_iter_no_change=20, random_state=seed)
    preds["mlp"] = _quiet(mlp.fit, Xtr, z).predict(Xte) * sd + mu
    scores: dict[str, Any] = {"n_train": len(train), "n_val": len(val), "n_test": len(test)}
    for name, pred in preds.items():
        scores[name] = M.regression_scores(test.y.astype(float), pred)
    scores["ridge"]["alpha"] = alpha
    return scores, preds


# -------------------------------------------------------------------------------------- classification


def classification_scores(y: np.ndarray, pred: np.ndarray, proba: np.ndarray, classes: list) -> dict[str, float]:
    """Accuracy, macro F1 and ROC AUC (one-vs-rest macro over ``classes``, the columns of ``proba``)."""
    if len(classes) == 2:
        auc = M.roc_auc(y == classes[1], proba[:, 1])
    else:
        auc = M.macro_roc_auc(y, proba, classes)
    return {"accuracy": M.accuracy(y, pred), "macro_f1": M.macro_f1(y, pred, classes), "roc_auc": auc, "n": int(len(y))}


def fit_classification(parts: dict[str, Part], seed: int = 0, hidden: int = 128) -> dict[str, Any]:
    """Scores of the majority-class dummy, logistic regression and MLP probes on ``parts["test"]``."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler

    parts = {k: Part(p.ids, p.X, p.y.astype(str)) for k, p in parts.items()}  # bools and names alike: "True", "cubic"
    train, val, test = parts["train"], parts["val"], parts["test"]
    classes = sorted(set(train.y.tolist()))
    scaler = StandardScaler().fit(train.X)
    Xtr, Xte = scaler.transform(train.X), scaler.transform(test.X)
    C = 1.0
    if len(val) >= 3:
        Xva = scaler.transform(val.X)
        f1 = [M.macro_f1(val.y, _quiet(LogisticRegression(C=c, max_iter=2000).fit, Xtr, train.y).predict(Xva), classes)
              for c in LOGISTIC_CS]
        C = LOGISTIC_CS[int(np.argmax(f1))]
    counts = pd.Series(train.y).value_counts()
    majority = counts.index[0]
    prior = np.array([counts.get(c, 0) / len(train) for c in classes])
    scores: dict[str, Any] = {"n_train": len(train), "n_val": len(val), "n_test": len(test),
                              "classes": [str(c) for c in classes]}
    scores["dummy"] = classification_scores(test.y, np.full(len(test), majority, dtype=object), np.tile(prior, (len(test), 1)), classes)
    logistic = _quiet(LogisticRegression(C=C, max_iter=2000).fit, Xtr, train.y)
    scores["logistic"] = classification_scores(test.y, logistic.predict(Xte), logistic.predict_proba(Xte), classes)
    scores["logistic"]["C"] = C
    mlp = _quiet(MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=400, random_state=seed,
                               early_stopping=len(train) >= 50 and counts.min() >= 5, n_iter_no_change=20).fit, Xtr, train.y)
    scores["mlp"] = classification_scores(test.y, mlp.predict(Xte), mlp.predict_proba(Xte), classes)
    return scores


#: Binary tasks: (flag column used as is, value column thresholded when the flag is absent, its unit).
BINARY_TASKS = {"stable": ("is_stable", "energy_above_hull", "eV/atom"), "metal": ("is_metal", "band_gap", "eV")}


def missing(value: Any) -> bool:
    """Whether a label is unknown: None, NaN or pandas' NA (a mixed table, say a CSV fetched with a folder of CIFs,
    holds all three)."""
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _nullable(series: pd.Series, convert) -> pd.Series:
    """``convert`` applied to the known values; nulls stay None (object dtype). Built from a list, not with
    ``Series.map``, which under pandas 3 turns a None it returns into NaN (NaN beside strings breaks sorting)."""
    return pd.Series([None if missing(v) else convert(v) for v in series.tolist()], index=series.index, dtype=object)


def classification_labels(materials: pd.DataFrame, task: str, hull_threshold: float, gap_threshold: float
                          ) -> tuple[pd.Series | None, str]:
    """The labels of a classification task (object Series, nulls where unknown) and where they come from."""
    def has(col: str) -> bool:
        return col in materials and materials[col].notna().any()

    if task in BINARY_TASKS:
        flag, value, unit = BINARY_TASKS[task]
        threshold = hull_threshold if task == "stable" else gap_threshold
        if has(flag):
            return _nullable(materials[flag], bool), flag
        if has(value):
            return _nullable(materials[value], lambda v: bool(v <= threshold)), f"{value} <= {threshold} {unit}"
        return None, f"no {flag} or {value} values"
    if task == "crystal_system":
        if has("crystal_system"):
            return _nullable(materials["crystal_system"], str), "crystal_system"
        return None, "no crystal_system values"
    raise ValueError(f"unknown classification task {task!r}")


# --------------------------------------------------------------------------------------------- driver


def _too_small(parts: dict[str, Part], min_train: int, min_test: int) -> str | None:
    if len(parts["train"]) < min_train:
        return f"{len(parts['train'])} train rows (< {min_train})"
    if len(parts["test"]) < min_test:
        return f"{len(parts['test'])} test rows (< {min_test})"
    return None


def run_probes(data: EvalData, hull_threshold: float = 0.0, gap_threshold: float = 0.0, seed: int = 0,
               hidden: int = 128, min_train: int = 10, min_test: int = 5, tick: Callable[[], None] | None = None,
               tables: list[str] | None = None) -> tuple[dict[str, Any], dict[tuple[str, str], Audit]]:
    """Regression and classification probes for every target and embedding table (or only ``tables``).

    Returns ``({"regression": {prop: {table: scores}}, "classification": {task: {table: scores}},
    "skipped": [...]}, audits)`` where ``audits[(target, table)]`` lists the fit and test ids.
    """
    out: dict[str, Any] = {"regression": {}, "classification": {}, "skipped": [], "label_sources": {}}
    audits: dict[tuple[str, str], Audit] = {}
    names = [t for t in data.tables if tables is None or t in tables]
    for prop in data.numeric_properties:
        target = pd.to_numeric(data.materials[prop], errors="coerce").astype(float)
        for table in names:
            parts = split_parts(data, table, target)
            reason = _too_small(parts, min_train, min_test)
            if reason:
                out["skipped"].append({"target": prop, "table": table, "reason": reason})
            else:
                out["regression"].setdefault(prop, {})[table], _ = fit_regression(parts, seed, hidden)
                audits[(prop, table)] = Audit(set(parts["train"].ids) | set(parts["val"].ids), set(parts["test"].ids))
            if tick:
                tick()
    for task in CLASSIFICATION_TASKS:
        labels, source = classification_labels(data.materials, task, hull_threshold, gap_threshold)
        out["label_sources"][task] = source
        for table in names:
            if labels is None:
                out["skipped"].append({"target": task, "table": table, "reason": source})
            else:
                parts = split_parts(data, table, labels)
                reason = _too_small(parts, min_train, min_test)
                if reason is None and len(set(parts["train"].y.tolist())) < 2:
                    reason = "one class only in the train split"
                if reason:
                    out["skipped"].append({"target": task, "table": table, "reason": reason})
                else:
                    out["classification"].setdefault(task, {})[table] = fit_classification(parts, seed, hidden)
                    audits[(task, table)] = Audit(set(parts["train"].ids) | set(parts["val"].ids), set(parts["test"].ids))
            if tick:
                tick()
    return out, audits


def probe_count(data: EvalData) -> int:
    """How many (target, table) probes :func:`run_probes` visits (for a progress bar)."""
    return (len(data.numeric_properties) + len(CLASSIFICATION_TASKS)) * len(data.tables)
