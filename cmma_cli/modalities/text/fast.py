"""A frozen sentence model at query time without sentence-transformers: its tokenizer and a TorchScript trace.

Embedding one typed query through sentence-transformers costs a cold ``cmma retrieve`` about 8 s on a CPU (importing
the library, then loading the model through transformers), for a few milliseconds of arithmetic. With a frozen text
model (``text_tune = "frozen"``, the default) the query is embedded instead by

- the tokenizer sentence-transformers loaded, serialised from its ``tokenizers`` backend, with the same truncation
  (the run's ``max_length``) and padding, run by the ``tokenizers`` library alone, and
- a TorchScript trace of the sentence model's own modules (transformer, pooling, normalisation) run by
  ``torch.jit.load``: no Python of transformers or sentence-transformers is imported,

both kept in one file of the workspace cache, ``<workspace>/cache/text/traced/<model key>-<key>.pt`` (about the size
of the model's weights: 90 MB for the default). The key is a digest of the model's name, its folder, its files
(:func:`~cmma_cli.workspace.fast_digest`), the truncation length and the versions of torch, tokenizers, transformers
and sentence-transformers, so a changed model or library makes another file (which replaces the older one); the file
repeats these facts and is refused when they differ.

The file is written (to a temporary name, then renamed) by a process that has the sentence model loaded on the CPU
(``cmma embed``; a query that took the slow path), and only when

- the pipeline is a transformer, mean pooling and optionally normalisation (no prompt, no lower-casing of its own,
  no extra processing options, no truncated output dimension), and
- the trace and the serialised tokenizer reproduce sentence-transformers exactly (the same token ids and the same
  vectors, bit for bit) on probe texts: short ones, one longer than the truncation length, mixed lengths padded in
  one batch, each alone, and texts of the workspace.

A model that fails either gets a small ``<key>.json`` saying why, and keeps the slow path. A file that cannot be read
or belongs to other model files is ignored: the query takes the slow path, which writes the file again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

#: The layout of the traced file (its stored facts and inputs); another layout is another key.
FORMAT = 1
#: The folder under ``<workspace>/cache/text/`` that holds the traced models.
FOLDER = "traced"
#: The stored facts inside the traced file (a TorchScript "extra file").
META = "cmma.json"
#: The sentence-transformers modules a traceable pipeline consists of, in order (Normalize optional).
PIPELINE = ("Transformer", "Pooling", "Normalize")
#: The tokenizer outputs the trace may take, in its argument order.
INPUTS = ("input_ids", "attention_mask", "token_type_ids")

#: Probe texts of the build check besides the workspace's own: cases, accents, symbols, scripts, spacing.
PROBES = (
    "NaCl",
    "Rock salt structure: sodium is bonded to six equivalent chlorine atoms forming edge-sharing octahedra.",
    "  LiFePO4 olivine, Pnma (No. 62); Fe–O bond lengths 2.06–2.25 Å.  ",
    "BaTiO3 was synthesized by a SOLID-STATE reaction of BaCO3 and TiO2 at 1200 °C for 12 h in air.",
    "Perovskit-Struktur mit verzerrten Oktaedern; naïve café, Ångström, Fe₂O₃, α-Al2O3, 氧化锌, ZnO.",
    "The mixture was ball-milled (400 rpm, 2h), pressed into pellets & calcined @ 900C; yield >95%!",
)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import tokenizers

    out = {"torch": torch.__version__, "tokenizers": tokenizers.__version__}
    for package in ("transformers", "sentence-transformers"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "none"
    return out


def model_folder(name: str) -> Path | None:
    """The folder sentence-transformers loads model ``name`` from: the packaged default, a local folder, or a
    Hugging Face id's snapshot in the local cache (None: it is in neither, the hub would be asked)."""
    from cmma_cli.modalities.text import resolve_model

    location = resolve_model(name)
    path = Path(location)
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(location, "modules.json")
    except Exception:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def _model_files(folder: Path) -> list[Path]:
    """The files that make the model: the folder's own, and those of its module folders (``1_Pooling``, ...)
    - not exports for other runtimes (``onnx/``, ``openvino/``)."""
    out = []
    for entry in sorted(folder.iterdir()):
        if entry.is_file():
            out.append(entry)
        elif entry.is_dir() and entry.name[:1].isdigit():
            out += sorted(p for p in entry.rglob("*") if p.is_file())
    return out


#: ``{(model name, max_length): identity}``, worked out once per process (a warm session asks for it per query).
_IDENTITIES: dict[tuple[str, int], dict[str, Any] | None] = {}
#: ``{trace path: ((size, mtime), the loaded model)}``: one load per process while the file is unchanged.
_LOADED: dict[str, tuple[tuple[int, int], "TracedSentenceModel"]] = {}


def identity(name: str, max_length: int) -> dict[str, Any] | None:
    """The facts a traced file must have been made from: the model, its files' digests, the truncation length,
    the libraries' versions (None: the model is no folder here, so no trace). Worked out once per process."""
    key = (name, int(max_length))
    if key not in _IDENTITIES:
        _IDENTITIES[key] = _identity(name, max_length)
    return _IDENTITIES[key]


def _identity(name: str, max_length: int) -> dict[str, Any] | None:
    from cmma_cli.workspace import fast_digest

    folder = model_folder(name)
    if folder is None:
        return None
    try:
        files = {p.relative_to(folder).as_posix(): fast_digest(p) for p in _model_files(folder)}
    except OSError:
        return None
    return {"format": FORMAT, "model": name, "folder": str(folder), "max_length": int(max_length), "files": files,
            "versions": _versions()}


def trace_path(cache_dir: Path, ident: dict[str, Any]) -> Path:
    """``<cache>/text/traced/<model key>-<key>.pt`` of a model's identity: the model key stands for its name and
    truncation length alone (the files of older copies of the same model are replaced), the key for all of it."""
    model = hashlib.sha256(f"{ident['model']}|{ident['max_length']}".encode()).hexdigest()[:8]
    key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir) / "text" / FOLDER / f"{model}-{key}.pt"


def _replaced(path: Path) -> None:
    """Delete the files of older copies of the same model (other files, libraries) beside ``path``."""
    model = path.name.split("-", 1)[0]
    for old in path.parent.glob(f"{model}-*"):
        if old.suffix in (".pt", ".json") and old.stem != path.stem:
            old.unlink(missing_ok=True)


class TracedSentenceModel:
    """A sentence model as a TorchScript trace and a ``tokenizers`` tokenizer; :meth:`encode` is
    ``SentenceTransformer.encode`` for a frozen model of the supported pipeline."""

    def __init__(self, module: torch.jit.ScriptModule, meta: dict[str, Any]):
        import tokenizers

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        self.module, self.meta = module, meta
        self.inputs: list[str] = list(meta["inputs"])
        self.dim = int(meta["dim"])
        tokenizer = tokenizers.Tokenizer.from_str(meta["tokenizer"])
        tokenizer.no_truncation()
        tokenizer.no_padding()
        truncation, padding = meta["truncation"], meta["padding"]
        tokenizer.enable_truncation(max_length=int(truncation["max_length"]), strategy=truncation["strategy"],
                                    direction=truncation["direction"])
        tokenizer.enable_padding(direction=padding["direction"], pad_id=int(padding["pad_id"]),
                                 pad_type_id=int(padding["pad_type_id"]), pad_token=padding["pad_token"])
        self.tokenizer = tokenizer

    def features(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The token tensors of one batch (padded to its longest text), as sentence-transformers makes them."""
        found = self.tokenizer.encode_batch(list(texts))
        columns = {"input_ids": [e.ids for e in found], "attention_mask": [e.attention_mask for e in found],
                   "token_type_ids": [e.type_ids for e in found]}
        return {name: torch.tensor(columns[name], dtype=torch.long) for name in self.inputs}

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int) -> torch.Tensor:
        """``(len(texts), dim)`` sentence vectors, batch by batch as ``TextEncoder.encode`` asks sentence-transformers:
        each chunk of ``batch_size`` sorted by decreasing length (as its ``encode`` does) and padded together."""
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            order = np.argsort([-len(t) for t in chunk])
            features = self.features([chunk[i] for i in order])
            with torch.jit.optimized_execution(False):  # the graph as traced: no fusions, the same kernels
                vectors = self.module(*(features[name] for name in self.inputs)).float()
            out.append(vectors[torch.from_numpy(np.argsort(order))])
        return torch.cat(out) if out else torch.zeros(0, self.dim)


def load(cache_dir: Path | None, name: str, max_length: int) -> tuple[TracedSentenceModel | None, str]:
    """``(the traced model, "ok")``, or ``(None, why not)``: ``"no cache"``, ``"no folder"`` (the model is not on this
    machine as files), ``"refused: ..."`` (its pipeline cannot be traced: never retried for these files),
    ``"missing"``, ``"unreadable: ..."`` or ``"stale"`` (the last three: a build may write it)."""
    if cache_dir is None:
        return None, "no cache"
    ident = identity(name, max_length)
    if ident is None:
        return None, "no folder"
    path = trace_path(cache_dir, ident)
    if not path.is_file():
        refusal = path.with_suffix(".json")
        try:
            told = json.loads(refusal.read_text())
            if told.get("identity") == ident:
                return None, f"refused: {told.get('reason')}"
        except (OSError, ValueError, AttributeError):
            pass
        return None, "missing"
    try:
        stat = path.stat()
        seen = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        return None, "missing"
    memo = _LOADED.get(str(path))
    if memo is not None and memo[0] == seen:
        return memo[1], "ok"
    extra = {META: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        meta = json.loads(extra[META])
        if meta.get("identity") != ident:
            return None, "stale"
        model = TracedSentenceModel(module.eval(), meta)
    except Exception as exc:  # a damaged file (truncated, overwritten, not TorchScript): the slow path answers
        return None, f"unreadable: {type(exc).__name__}"
    _LOADED.clear()  # one traced model in memory at a time
    _LOADED[str(path)] = (seen, model)
    return model, "ok"


def needs_build(state: str) -> bool:
    """Whether a :func:`load` state calls for (re)writing the traced file."""
    return state in ("missing", "stale") or state.startswith("unreadable")


# ------------------------------------------------------------------------------------------------ build


def pipeline_problem(model: Any, max_length: int) -> str | None:
    """Why the loaded ``SentenceTransformer`` ``model`` is not the pipeline a trace reproduces (None: it is)."""
    modules = list(model)
    kinds = [type(m).__name__ for m in modules]
    if not all(type(m).__module__.startswith("sentence_transformers.") for m in modules) or \
            tuple(kinds) not in (PIPELINE[:2], PIPELINE):
        return f"its modules are {' + '.join(kinds)}, not Transformer + Pooling (+ Normalize)"
    transformer, pooling = modules[0], modules[1]
    mode = getattr(pooling, "pooling_mode", None)
    if not isinstance(mode, str):  # older sentence-transformers: one flag per mode
        flags = pooling.get_config_dict()
        on = [k.removeprefix("pooling_mode_").removesuffix("_tokens") for k, v in flags.items()
              if k.startswith("pooling_mode_") and v]
        mode = on[0] if len(on) == 1 else "+".join(on)
    if mode != "mean":
        return f"its pooling is {mode}, not mean"
    if getattr(model, "default_prompt_name", None):
        return f"it prepends the prompt {model.default_prompt_name!r}"
    if getattr(model, "truncate_dim", None):
        return f"it truncates vectors to {model.truncate_dim} dimensions"
    if getattr(transformer, "do_lower_case", False):
        return "sentence-transformers lower-cases its input itself"
    if getattr(transformer, "processing_kwargs", None):
        return "it has processing options of its own"
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or getattr(tokenizer, "backend_tokenizer", None) is None:
        return "its tokenizer has no tokenizers backend"
    if model.max_seq_length != max_length:
        return f"its truncation length is {model.max_seq_length}, not the run's {max_length}"
    positions = getattr(transformer.auto_model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and max_length > positions:
        return f"max_length {max_length} exceeds its {positions} positions"
    if next(model.parameters()).device.type != "cpu":
        return "it is not on the CPU"
    return None


class _Pipeline(torch.nn.Module):
    """The sentence model's own modules on token tensors (what is traced)."""

    def __init__(self, model: Any, inputs: list[str]):
        super().__init__()
        self.model, self.inputs = model, inputs

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        features: dict[str, Any] = dict(zip(self.inputs, tensors))
        features["modality"] = "text"
        return self.model(features)["sentence_embedding"]


def _reference(model: Any, texts: list[str], batch_size: int) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """sentence-transformers' token tensors (each chunk in its length order) and vectors of ``texts``, chunk by
    chunk as ``TextEncoder.encode`` asks it."""
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    tokens, vectors = [], []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        order = np.argsort([-len(t) for t in chunk])
        tokens.append(preprocess([chunk[i] for i in order]))
        vectors.append(model.encode(chunk, batch_size=batch_size, convert_to_tensor=True).float().cpu())
    return tokens, torch.cat(vectors)


def _probes(texts: list[str], max_length: int) -> list[str]:
    """The check's texts: the probes, one far longer than the truncation length, then up to 24 of ``texts`` (the
    longest first, which truncate when any does, then others spread over the rest)."""
    extra = sorted(dict.fromkeys(t for t in texts if isinstance(t, str) and t.strip()), key=len, reverse=True)
    longest = " ".join(PROBES[1:]) + " "
    long = (longest * (max_length // 8 + 2)).strip()
    return [*PROBES, long, *extra[:8], *extra[8:][::max(1, len(extra[8:]) // 16)][:16]]


#: How many of the check's texts (the probes first) are also embedded one by one (a query is one text, unpadded).
ALONE = 10


def check(model: Any, traced: TracedSentenceModel, texts: list[str], batch_size: int) -> str | None:
    """Why ``traced`` differs from sentence-transformers ``model`` on ``texts`` (the first :data:`ALONE` each alone,
    then all together in batches of ``batch_size``), or None when every token id and every vector is the same."""
    for group, size in ((texts[:ALONE], 1), (texts, batch_size)):
        tokens, expected = _reference(model, group, size)
        for start, reference in zip(range(0, len(group), size), tokens):
            chunk = group[start:start + size]
            order = np.argsort([-len(t) for t in chunk])
            mine = traced.features([chunk[i] for i in order])
            for name in traced.inputs:
                if name in reference and not torch.equal(mine[name], reference[name].cpu()):
                    return f"the tokenizer's {name} differ from sentence-transformers' on {chunk[int(order[0])][:40]!r}"
            if set(reference) & set(INPUTS) - set(traced.inputs):
                return f"sentence-transformers also passes {sorted(set(reference) & set(INPUTS) - set(traced.inputs))}"
        got = traced.encode(group, size)
        if got.shape != expected.shape or not torch.equal(got, expected):
            diff = float((got - expected).abs().max()) if got.shape == expected.shape else float("nan")
            return f"the trace's vectors differ from sentence-transformers' (max abs difference {diff:.3g})"
    return None


def trace(model: Any, max_length: int) -> TracedSentenceModel:
    """The traced copy of the loaded sentence model ``model`` truncating at ``max_length`` (not checked: see
    :func:`build`); ValueError when its pipeline is not one a trace reproduces, or the tracer fails."""
    reason = pipeline_problem(model, max_length)
    if reason:
        raise ValueError(reason)
    tokenizer = model.tokenizer
    preprocess = getattr(model, "preprocess", None) or model.tokenize
    sample = preprocess(["a short text", "a longer text than the first one, padded against it"])
    tensors = sorted(k for k, v in sample.items() if isinstance(v, torch.Tensor))
    inputs = [n for n in INPUTS if n in sample]
    if set(tensors) - set(INPUTS) or inputs[:2] != list(INPUTS[:2]):
        raise ValueError(f"its inputs are {tensors}")
    was_training = model.training
    model.eval()
    import logging

    library_log = logging.getLogger("sentence_transformers")  # the tracer reads deprecated properties: no notes
    level = library_log.level
    library_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on shape-dependent branches (the check decides)
            module = torch.jit.trace(_Pipeline(model, inputs), tuple(sample[n] for n in inputs), check_trace=False,
                                     strict=False)
    except Exception as exc:
        raise ValueError(f"it cannot be traced ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})") \
            from None
    finally:
        model.train(was_training)
        library_log.setLevel(level)
    meta = {
        "inputs": inputs,
        "dim": int(model.get_embedding_dimension() if hasattr(model, "get_embedding_dimension")
                   else model.get_sentence_embedding_dimension()),
        "tokenizer": tokenizer.backend_tokenizer.to_str(),
        "truncation": {"max_length": int(max_length), "strategy": "longest_first",
                       "direction": getattr(tokenizer, "truncation_side", "right")},
        "padding": {"direction": getattr(tokenizer, "padding_side", "right"), "pad_id": int(tokenizer.pad_token_id),
                    "pad_type_id": int(getattr(tokenizer, "pad_token_type_id", 0) or 0),
                    "pad_token": str(tokenizer.pad_token)},
    }
    return TracedSentenceModel(module, meta)


def build(model: Any, cache_dir: Path, name: str, max_length: int, texts: list[str] = (),
          batch_size: int = 64) -> str:
    """Trace the loaded frozen sentence model ``model`` (``name``, truncating at ``max_length``) into the workspace
    cache, when its pipeline allows it and the trace reproduces it exactly on the probes and ``texts``. Returns
    ``"written"``, ``"refused: why"`` (written beside it, so it is not tried again for these files) or
    ``"no folder"``. Writes atomically (a failed write raises)."""
    from cmma_cli.workspace import atomic, write_json

    ident = identity(name, max_length)
    if ident is None:
        return "no folder"
    path = trace_path(cache_dir, ident)

    def refuse(reason: str) -> str:
        write_json({"identity": ident, "reason": reason}, path.with_suffix(".json"))
        _replaced(path)
        return f"refused: {reason}"

    try:
        traced = trace(model, max_length)
    except ValueError as exc:
        return refuse(str(exc))
    probes = _probes(list(texts), max_length)
    with torch.no_grad():
        reason = check(model, traced, probes, batch_size)
    if reason:
        return refuse(reason)
    meta = {**traced.meta, "identity": ident, "checked": {"texts": len(probes), "batch_size": batch_size}}
    with atomic(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(traced.module, str(tmp), _extra_files={META: json.dumps(meta)})
    path.with_suffix(".json").unlink(missing_ok=True)
    _replaced(path)
    _LOADED.pop(str(path), None)
    return "written"
