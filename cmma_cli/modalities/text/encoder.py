"""The text encoder: a sentence-transformers model, frozen (embeddings cached in the workspace) or fine-tuned."""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Context
from cmma_cli.modalities.text import BUILTIN_MODEL, ENCODE_BATCH, parse_tune, resolve_model, text_key


#: Seconds the Hugging Face Hub gets to accept a connection before a model id that is neither a local folder nor
#: cached is given up on (the hub client itself retries for over a minute offline).
HUB_TIMEOUT = 5.0
_TRUE = ("1", "true", "yes", "on")


def is_cached(name: str) -> bool:
    """Whether the Hugging Face cache holds model ``name`` (so it loads with ``local_files_only``, offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for repo in dict.fromkeys([name, f"sentence-transformers/{name}"]):
        try:
            if isinstance(try_to_load_from_cache(repo, "config.json"), str):
                return True
        except Exception:  # not a valid repo id: not cached
            continue
    return False


def hub_problem(timeout: float = HUB_TIMEOUT) -> str | None:
    """Why the Hugging Face Hub cannot be reached from here (offline mode set, no name resolution, no connection
    within ``timeout`` s), or None when it accepts a connection."""
    import socket
    import threading
    from urllib.parse import urlparse

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var} is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    answer: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answer.append(None)
        except OSError as exc:
            answer.append(f"{host} is unreachable ({type(exc).__name__})")

    thread = threading.Thread(target=probe, daemon=True)  # a name lookup ignores socket timeouts: bound it here
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else f"{host} did not answer within {timeout:g} s"


def load_sentence_model(name: str, device: str = "cpu"):
    """A fresh ``SentenceTransformer`` for ``name``, or one sentence saying how to fix the name.

    A name that is neither a local folder nor in the Hugging Face cache needs the Hub: when it cannot be reached
    the answer comes in seconds, not after the hub client's minute of retries."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    location = resolve_model(name)
    local = Path(location).exists()
    cached = not local and is_cached(location)
    if not local and not cached:
        problem = hub_problem()
        if problem:
            raise CMMAError(
                f"The text model {name!r} is not a local folder and not in the Hugging Face cache, and the Hub cannot "
                f"be reached ({problem}): pass --text-model a local folder, download the model on a machine with a "
                f"network first, or use the offline default {BUILTIN_MODEL}.")
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no "Loading weights" bars between our own progress output

    try:
        if cached:
            return SentenceTransformer(location, device=device, local_files_only=True)
        return SentenceTransformer(location, device=device)
    except Exception as exc:  # hub errors, missing files, bad configs: all one answer for the user
        raise CMMAError(
            f"Could not load the text model {name!r} ({type(exc).__name__}): pass --text-model a local folder "
            f"or a Hugging Face id this machine can download (the offline default is {BUILTIN_MODEL})."
        ) from None


@lru_cache(maxsize=8)
def sentence_dim(name: str) -> int:
    """The embedding width of a sentence model (loads it once per process)."""
    return int(load_sentence_model(name).get_embedding_dimension())


@lru_cache(maxsize=2)
def frozen_sentence_model(name: str, max_length: int, device: str = "cpu"):
    """The frozen sentence model ``name``, loaded once per process: a warm session (``cmma serve``, the Python
    API) encodes each query text without loading it again."""
    model = load_sentence_model(name, device)
    model.max_seq_length = max_length
    return model.requires_grad_(False).eval()


def cached_embeddings(texts: list[str], spec: dict[str, Any], ctx: Context) -> np.ndarray:
    """Frozen-model embeddings of ``texts``, computing only those missing from the workspace cache."""
    ident = f"{spec['model']}|{spec['max_length']}"
    path = ctx.cache_dir / "text" / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.parquet" if ctx.cache_dir else None
    known: dict[str, np.ndarray] = {}
    if path is not None and path.exists():
        cached = pd.read_parquet(path)
        known = dict(zip(cached["key"], cached["embedding"]))
    keys = [text_key(t) for t in texts]
    missing = [i for i, k in enumerate(keys) if k not in known]
    model_cache = getattr(ctx, "model_cache", ctx.cache_dir)  # where the traced copy lives (a query's: the Encoder's)
    traced = traced_model(spec, model_cache) if missing and (
        len(missing) <= ENCODE_BATCH or not torch.cuda.is_available()) else None
    found = traced_vectors(traced, [texts[i] for i in missing], ENCODE_BATCH) if traced is not None else None
    if found is not None:  # the same vectors, without loading sentence-transformers (a query's text)
        for i, vec in zip(missing, found.numpy()):
            known[keys[i]] = vec.astype(np.float32)
    elif missing:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = frozen_sentence_model(spec["model"], spec["max_length"], device)
        from cmma_cli.console import progress

        with progress() as bar:
            task = bar.add_task("Embedding texts (frozen, cached)", total=len(missing), visible=ctx.show_progress)
            for start in range(0, len(missing), ENCODE_BATCH):
                chunk = missing[start : start + ENCODE_BATCH]
                vectors = model.encode([texts[i] for i in chunk], batch_size=ENCODE_BATCH, convert_to_numpy=True)
                for i, vec in zip(chunk, vectors):
                    known[keys[i]] = vec.astype(np.float32)
                bar.advance(task, len(chunk))
        if device == "cpu":  # loaded anyway: write the traced copy the next query uses
            write_traced(spec, model_cache, [texts[i] for i in missing])
    if missing and path is not None:
        from cmma_cli.workspace import write_table

        write_table(pd.DataFrame({"key": list(known), "embedding": [v.tolist() for v in known.values()]}), path)
    return np.stack([np.asarray(known[k], dtype=np.float32) for k in keys]) if keys else np.zeros((0, spec["dim"]), np.float32)


def traced_model(spec: dict[str, Any], cache_dir: Path | None):
    """The traced copy (:class:`~cmma_cli.modalities.text.fast.TracedSentenceModel`) of the frozen sentence model of
    text ``spec`` in the workspace cache ``cache_dir``, or None (fine-tuned, no cache, no usable copy)."""
    if cache_dir is None or parse_tune(spec["tune"]) != 0:
        return None
    from cmma_cli.modalities.text import fast

    return fast.load(Path(cache_dir), spec["model"], spec["max_length"])[0]


def traced_vectors(traced, texts: list[str], batch_size: int) -> torch.Tensor | None:
    """``traced.encode(texts)``, or None when it fails (the caller takes the slow path)."""
    try:
        return traced.encode(texts, batch_size)
    except Exception:  # a trace the libraries here cannot run after all: sentence-transformers answers
        return None


#: ``{(cache folder, model, max_length): what write_traced did}``: one attempt per process.
_WRITTEN: dict[tuple[str, str, int], str | None] = {}


def write_traced(spec: dict[str, Any], cache_dir: Path | None, texts: list[str] = ()) -> str | None:
    """Write the traced copy of the frozen sentence model of text ``spec`` into the workspace cache ``cache_dir`` when
    it is missing, damaged or stale, checked against the sentence model (loaded on the CPU here, if this process has
    not yet) on probe texts and up to 24 of ``texts``. Returns what happened (``"written"``, ``"refused: why"``,
    ``"failed: why"``; None: nothing to do). One attempt per process; never raises: without a copy, queries take
    the slow path."""
    if cache_dir is None or parse_tune(spec["tune"]) != 0:
        return None
    key = (str(cache_dir), spec["model"], int(spec["max_length"]))
    if key in _WRITTEN:
        return _WRITTEN[key]
    from cmma_cli.modalities.text import fast

    try:
        _, state = fast.load(Path(cache_dir), spec["model"], spec["max_length"])
        if fast.needs_build(state):
            model = frozen_sentence_model(spec["model"], spec["max_length"], "cpu")
            state = fast.build(model, Path(cache_dir), spec["model"], spec["max_length"], list(texts))
        else:
            state = None
    except Exception as exc:  # a read-only or full cache, a model that will not load: the slow path stays
        state = f"failed: {type(exc).__name__}"
    _WRITTEN[key] = state
    return state


def _transformer_layers(backbone) -> nn.ModuleList:
    """The longest ModuleList inside the transformer: its stack of layers (BERT, RoBERTa, MPNet, ...)."""
    lists = [m for m in backbone.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise CMMAError("The text model has no stack of transformer layers to fine-tune partly: use --text-tune full.")
    return max(lists, key=len)


class TextEncoder(nn.Module):
    """Cached embeddings pass through (frozen); token inputs run the sentence model (fine-tuning, or ``encode``)."""

    def __init__(self, spec: dict[str, Any]):
        super().__init__()
        self.spec, self.out_dim = dict(spec), spec["dim"]
        layers = parse_tune(spec["tune"])
        self.frozen = layers == 0
        if self.frozen:
            self._frozen_backbone = None  # loaded on first use, kept out of the state dict
            return
        self.backbone = load_sentence_model(spec["model"])
        self.backbone.max_seq_length = spec["max_length"]
        if layers is not None:
            self.backbone.requires_grad_(False)
            stack = _transformer_layers(self.backbone)
            for layer in list(stack)[-layers:]:
                layer.requires_grad_(True)

    def _model(self):
        if not self.frozen:
            return self.backbone
        if self._frozen_backbone is None:
            model = frozen_sentence_model(self.spec["model"], self.spec["max_length"], "cpu")
            object.__setattr__(self, "_frozen_backbone", model)  # not a submodule: never trained or saved
        return self._frozen_backbone

    def traced(self, cache_dir: Path | None):
        """The frozen model's traced copy in the workspace cache ``cache_dir`` (:mod:`~cmma_cli.modalities.text.fast`);
        None when it is fine-tuned, there is no usable copy, or this process has loaded the sentence model anyway."""
        if not self.frozen or self._frozen_backbone is not None:
            return None
        return traced_model(self.spec, cache_dir)

    def write_traced(self, cache_dir: Path | None, texts: list[str] = ()) -> str | None:
        """Write the frozen model's traced copy into ``cache_dir`` when it is missing, damaged or stale (see
        :func:`write_traced`)."""
        if not self.frozen:
            return None
        return write_traced(self.spec, cache_dir, texts)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        if "embedding" in inputs:
            return inputs["embedding"]
        model = self._model()
        if self.frozen:
            model.to(inputs["input_ids"].device)
            with torch.no_grad():
                return model(dict(inputs))["sentence_embedding"]
        return model(dict(inputs))["sentence_embedding"]

    @torch.no_grad()
    def encode(self, texts: list[str], batch_size: int = ENCODE_BATCH, cache_dir: Path | None = None) -> torch.Tensor:
        """Sentence vectors of raw ``texts`` (before the projection head), e.g. for ``cmma embed``.

        ``cache_dir`` (the workspace cache): a frozen model runs as its traced copy there when there is one (the same
        vectors, without importing sentence-transformers); otherwise the sentence model runs, and writes that copy
        for the next process."""
        traced = self.traced(cache_dir)
        found = traced_vectors(traced, texts, batch_size) if traced is not None else None
        if found is not None:
            return found
        model = self._model()
        device = next(iter(self.parameters()), torch.empty(0)).device if not self.frozen else torch.device("cpu")
        model.to(device)
        was_training = model.training
        model.eval()
        out = [model.encode(texts[i : i + batch_size], batch_size=batch_size, convert_to_tensor=True).float().cpu()
               for i in range(0, len(texts), batch_size)]
        model.train(was_training)
        self.write_traced(cache_dir, texts)
        return torch.cat(out) if out else torch.zeros(0, self.out_dim)


# ---- embed and retrieve


@torch.no_grad()
def embed_texts(encoder, texts: list[str]) -> np.ndarray:
    """Shared-space vectors ``(len(texts), d)``, L2-normalised, of already clean ``texts`` through the run of
    ``encoder`` (a :class:`cmma_cli.encode.Encoder`).

    With a frozen sentence model and a workspace cache, the sentence vectors come from (and go to) the cache
    training filled, so ``cmma embed`` recomputes nothing; otherwise (a query, a fine-tuned model) the run's
    own sentence model encodes them.
    """
    from cmma_cli.modalities.text import TextModality

    name = TextModality.name
    if not texts:
        return np.zeros((0, encoder.dim), dtype=np.float32)
    module = encoder.model.encoders[name]
    if module.frozen and encoder.ctx.cache_dir is not None:
        raw = torch.from_numpy(cached_embeddings(texts, encoder.spec["encoders"][name], encoder.ctx))
    else:
        raw = module.encode(texts, cache_dir=getattr(encoder, "model_cache", None))
    step = encoder.batch_size
    out = [encoder.model.embed(name, {"embedding": raw[i : i + step].to(encoder.device)}).float().cpu()
           for i in range(0, len(texts), step)]
    return torch.cat(out).numpy()


def material_vectors(encoder, table, sources) -> tuple[list[int], list[str], np.ndarray, list[tuple[str, int]], np.ndarray]:
    """One text vector per row of ``table`` that has a text (processed text columns), and one per recipe link.

    Returns ``(rows, their text source, their vectors, (recipe_id, row) of every recipe link, the links'
    vectors)``. A row's vector is the model's embedding of the texts :func:`~cmma_cli.modalities.text.chosen_texts`
    picks (its description when ``sources`` has descriptions, else its synthesis texts, pooled), computed by
    :meth:`cmma_cli.encode.Encoder.embed_table` exactly as validation and evaluation compute it. Every recipe
    link gets a vector whatever ``sources``: the text encoder reads any procedure.
    """
    from cmma_cli.modalities.text import TextModality, chosen_texts

    n = table.num_rows
    descriptions = table.column("description").to_pylist()
    synthesis = table.column("synthesis_texts").to_pylist()
    recipes = table.column("recipe_ids").to_pylist() if "recipe_ids" in table.column_names else [None] * n
    spec = {**encoder.spec["encoders"][TextModality.name], "sources": list(sources)}
    rows, vectors = encoder.embed_table(TextModality.name, table, spec=spec)
    kinds = [chosen_texts(descriptions[r], synthesis[r], sources)[0] for r in rows]
    links = [(str(r), row, t) for row, (rids, texts) in enumerate(zip(recipes, synthesis))
             for r, t in zip(rids or [], texts or []) if isinstance(t, str) and t.strip()]
    distinct = list(dict.fromkeys(t for _, _, t in links))
    text_vectors = dict(zip(distinct, embed_texts(encoder, distinct)))
    link_vectors = np.stack([text_vectors[t] for _, _, t in links]) if links else np.zeros((0, encoder.dim), np.float32)
    # the traced copy a cold query embeds its text with, checked on these texts too (written once per model)
    texts = [t for t in descriptions if isinstance(t, str) and t.strip()]
    encoder.model.encoders[TextModality.name].write_traced(getattr(encoder, "model_cache", None), texts + distinct)
    return [int(r) for r in rows], kinds, vectors, [(r, row) for r, row, _ in links], link_vectors
