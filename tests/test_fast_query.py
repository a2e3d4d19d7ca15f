"""A typed query is embedded by the traced copy of the frozen sentence model (:mod:`cmma_cli.modalities.text.fast`):
bit for bit the vectors of sentence-transformers on real texts (one longer than the truncation length too), the same
ranking, a damaged or stale copy falls back to sentence-transformers and is written again, a pipeline the trace
cannot reproduce (CLS pooling) or a fine-tuned model keeps the slow path, and a cold ``cmma retrieve "text"`` imports
neither sentence-transformers nor transformers."""

from __future__ import annotations

import json
import lzma
import os
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cmma_cli.modalities.text import encoder as text_encoder
from cmma_cli.modalities.text import fast
from cmma_cli.retrieve import Query, Retriever
from conftest import SHARED_DATA

QUERIES = [
    "Rock salt structure: sodium is bonded to six equivalent chlorine atoms forming edge-sharing octahedra.",
    "LiFePO4 was prepared by a solid-state reaction of Li2CO3, FeC2O4 and NH4H2PO4 at 700 C under argon.",
    "perovskite",
]


@pytest.fixture(scope="module")
def spec(embedded_sample) -> dict:
    """The text spec of the sample run (its frozen model and truncation length)."""
    found = Retriever(embedded_sample.ws, embedded_sample.run).encoder(["text"]).spec["encoders"]["text"]
    assert found["tune"] == "frozen"
    return found


def procedures(n: int) -> list[str]:
    """Synthesis procedures composed by cmma from the first ``n`` text-mined recipes of ``../shared/data`` (the
    sample has none); none when that folder is absent."""
    from cmma_cli.preprocess.text import compose_procedure

    path = SHARED_DATA / "synthesis" / "solid-state_dataset_2019-12-03.json.xz"
    if not path.is_file():
        return []
    with lzma.open(path, "rt") as fh:
        head = fh.read(400_000)
    decoder, at, out = json.JSONDecoder(), head.index("[") + 1, []
    while len(out) < n:
        at = len(head) - len(head[at:].lstrip(" \n,"))
        record, at = decoder.raw_decode(head, at)
        out.append(compose_procedure(record, "solid-state"))
    return out


@pytest.fixture(scope="module")
def texts(embedded_sample) -> list[str]:
    """Real texts: the sample's descriptions, synthesis procedures, and one far past the truncation length."""
    table = pq.read_table(embedded_sample.ws.processed / "materials.parquet", columns=["description"]).to_pylist()
    descriptions = [r["description"] for r in table if r["description"]]
    assert len(descriptions) > 100
    return [*descriptions[::4][:40], *procedures(12), " ".join(descriptions[:12])]


def slow_vectors(model, texts: list[str], batch_size: int) -> torch.Tensor:
    """What ``TextEncoder.encode`` gets from sentence-transformers: chunks of ``batch_size``."""
    return torch.cat([model.encode(texts[i:i + batch_size], batch_size=batch_size, convert_to_tensor=True).float()
                      for i in range(0, len(texts), batch_size)])


def trace_file(ws) -> "os.PathLike":
    found = sorted((ws.cache / "text" / fast.FOLDER).glob("*.pt"))
    assert len(found) == 1, found
    return found[0]


def forget() -> None:
    """Forget what this process loaded or wrote, as a new process would."""
    fast._LOADED.clear()
    text_encoder._WRITTEN.clear()


def test_the_trace_gives_sentence_transformers_vectors_on_real_texts(embedded_sample, spec, texts):
    model = text_encoder.frozen_sentence_model(spec["model"], spec["max_length"], "cpu")
    long = texts[-1]
    assert len(model.tokenizer(long, truncation=False)["input_ids"]) > spec["max_length"]  # it truncates
    for traced in (fast.trace(model, spec["max_length"]),  # traced here, and the copy `cmma embed` wrote
                   fast.load(embedded_sample.ws.cache, spec["model"], spec["max_length"])[0]):
        assert traced is not None
        assert traced.features([long])["input_ids"].shape == (1, spec["max_length"])
        for group, batch_size in (([*texts[:-1:6], long], 1), (texts, 64)):  # some alone (the long one too), all padded
            expected = slow_vectors(model, group, batch_size)
            got = traced.encode(group, batch_size)
            assert torch.equal(got, expected), float((got - expected).abs().max())


def test_a_text_query_ranks_exactly_as_through_sentence_transformers(embedded_sample, monkeypatch):
    forget()
    calls = []
    encode = fast.TracedSentenceModel.encode
    monkeypatch.setattr(fast.TracedSentenceModel, "encode", lambda self, *a: calls.append(a) or encode(self, *a))
    retriever = Retriever(embedded_sample.ws, embedded_sample.run)
    n = retriever.index("structure").ntotal
    quick = [retriever.query(Query(q), k=n) for q in QUERIES]
    quick_vectors = [retriever.encode(Query(q), "text") for q in QUERIES]
    assert calls  # the traced copy answered
    monkeypatch.setattr(fast, "load", lambda *a, **k: (None, "missing"))  # no copy: sentence-transformers answers
    monkeypatch.setattr(text_encoder, "write_traced", lambda *a, **k: None)
    calls.clear()
    slow = Retriever(embedded_sample.ws, embedded_sample.run)
    for query, got, vector in zip(QUERIES, quick, quick_vectors):
        want = slow.query(Query(query), k=n)
        assert [(r["material_id"], r["score"]) for r in got.rows] == [(r["material_id"], r["score"]) for r in want.rows]
        np.testing.assert_array_equal(vector, slow.encode(Query(query), "text"))
    assert not calls


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load / save, to make the stale copy
@pytest.mark.parametrize("damage", ["garbage", "truncated", "stale"])
def test_a_damaged_or_stale_copy_falls_back_and_is_written_again(embedded_sample, spec, tmp_path, damage):
    ws = embedded_sample.copy(tmp_path / "ws")
    forget()
    expected = Retriever(ws, embedded_sample.run).encode(Query(QUERIES[0]), "text")
    path = trace_file(ws)
    if damage == "garbage":
        path.write_bytes(b"not a TorchScript archive")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # a readable file made from other model files or libraries than these
        extra = {fast.META: ""}
        module = torch.jit.load(str(path), _extra_files=extra)
        meta = json.loads(extra[fast.META])
        meta["identity"]["versions"]["torch"] = "0.0"
        torch.jit.save(module, str(path), _extra_files={fast.META: json.dumps(meta)})
    damaged = path.read_bytes()
    forget()
    state = fast.load(ws.cache, spec["model"], spec["max_length"])[1]
    assert state == "stale" if damage == "stale" else state.startswith("unreadable")

    vector = Retriever(ws, embedded_sample.run).encode(Query(QUERIES[0]), "text")  # the slow path answers ...
    np.testing.assert_array_equal(vector, expected)
    assert trace_file(ws) == path and path.read_bytes() != damaged  # ... and writes the copy again
    forget()
    rewritten, state = fast.load(ws.cache, spec["model"], spec["max_length"])
    assert state == "ok"
    np.testing.assert_array_equal(Retriever(ws, embedded_sample.run).encode(Query(QUERIES[0]), "text"), expected)


def test_a_cold_text_query_imports_no_sentence_transformers(embedded_sample, tmp_path, monkeypatch):
    ws = embedded_sample.copy(tmp_path / "ws")
    before = trace_file(ws).stat().st_mtime_ns
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    for query in QUERIES:
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "cmma_cli", "retrieve", query,
                               "-w", str(ws.root), "--run", embedded_sample.run, "-k", "10", "--json"],
                              capture_output=True, text=True, env=env, check=True)
        names = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()
                 if line.startswith("import time:")}
        assert "torch" in names and "tokenizers" in names  # (the trace and its tokenizer)
        assert "sentence_transformers" not in names and "transformers" not in names
        got = json.loads(proc.stdout)["results"]
        monkeypatch.setattr(fast, "load", lambda *a, **k: (None, "missing"))  # the answer through sentence-transformers
        monkeypatch.setattr(text_encoder, "write_traced", lambda *a, **k: None)
        want = Retriever(ws, embedded_sample.run).query(Query(query), k=10).to_dict()["results"]
        monkeypatch.undo()
        assert [(r["material_id"], r["score"]) for r in got] == [(r["material_id"], r["score"]) for r in want]
    assert trace_file(ws).stat().st_mtime_ns == before  # a usable copy is only read


def test_a_pipeline_the_trace_cannot_reproduce_keeps_the_slow_path(spec, tmp_path):
    """CLS pooling: refused (and remembered, not retried); a fine-tuned model is never traced."""
    source = fast.model_folder(spec["model"])
    folder = tmp_path / "cls-model"
    shutil.copytree(source, folder, ignore=lambda d, names: [n for n in names if n.endswith((".safetensors", ".bin"))])
    for weights in source.iterdir():
        if weights.name.endswith((".safetensors", ".bin")):
            (folder / weights.name).symlink_to(weights)
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    config.update(pooling_mode_cls_token=True, pooling_mode_mean_tokens=False)
    pooling.write_text(json.dumps(config))
    cls_spec = {**spec, "model": str(folder)}
    forget()
    state = text_encoder.write_traced(cls_spec, tmp_path / "cache", ["a text"])
    assert state is not None and state.startswith("refused: its pooling is cls"), state
    assert fast.load(tmp_path / "cache", str(folder), spec["max_length"])[1].startswith("refused")
    assert not list((tmp_path / "cache").rglob("*.pt"))

    tuned = text_encoder.TextEncoder({**spec, "tune": "top:1"})
    assert tuned.traced(tmp_path / "cache") is None and tuned.write_traced(tmp_path / "cache") is None
    assert text_encoder.traced_model({**spec, "tune": "full"}, tmp_path / "cache") is None
