"""``cmma fetch --source mp`` against a misbehaving server (issue #15, finding 9): malformed and HTML bodies are
retried, long ``Retry-After`` waits are capped and said, and a server that never answers is given up within a
bounded time, with notices while waiting, one sentence at the end and every finished chunk kept.

The real mp-api client talks to the loopback server (tests/mp_server.py); every limit is made small here, so
no test waits more than a few seconds.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from mp_server import HANG, TEST_API_KEY, LoopbackMP

from cmma_cli.config import FetchConfig
from cmma_cli.errors import CMMAError
from cmma_cli.sources import materials_project as mp
from cmma_cli.sources.materials_project import fetch_materials_project

HTML = "<!DOCTYPE html><html><head><title>Proxy error</title></head><body><h1>502 Bad Gateway</h1></body></html>"


@pytest.fixture(autouse=True)
def small_limits(monkeypatch):
    """Three attempts, millisecond backoff, waits capped at 0.2 s, attempts abandoned after 1 s of silence."""
    monkeypatch.setattr(mp, "RETRY_ATTEMPTS", 3)
    monkeypatch.setattr(mp, "RETRY_BASE_DELAY_S", 0.01)
    monkeypatch.setattr(mp, "MAX_WAIT_S", 0.2)
    monkeypatch.setattr(mp, "REQUEST_DEADLINE_S", 1.0)
    monkeypatch.setattr(mp, "GIVE_UP_AFTER_S", 20.0)
    monkeypatch.setattr(mp, "NOTICE_EVERY_S", 0.3)
    monkeypatch.setattr(mp, "CONNECT_TIMEOUT_S", 2.0)
    monkeypatch.setattr(mp, "READ_TIMEOUT_S", 20.0)  # the deadline, not the socket, ends a silent attempt


@pytest.fixture
def sleeps(monkeypatch):
    """Every ``time.sleep`` (ours and urllib3's) is recorded and lasts at most 10 ms: a long wait shows, costs nothing."""
    asked: list[float] = []
    real = time.sleep

    def sleep(seconds: float) -> None:
        asked.append(seconds)
        real(min(seconds, 0.01))

    monkeypatch.setattr(time, "sleep", sleep)
    return asked


def said(capsys) -> str:
    """What the terminal showed (stderr), with rich's line wrapping undone."""
    return " ".join(capsys.readouterr().err.split())


def config(server: LoopbackMP, **kw) -> FetchConfig:
    kw.setdefault("chunk_size", 15)
    kw.setdefault("synthesis", False)
    kw.setdefault("descriptions", False)
    return FetchConfig(source="mp", endpoint=server.url, elements=["O"], **kw)


def oxides(content) -> list[str]:
    return [d["material_id"] for d in content.summary if "O" in d["elements"]]


# ------------------------------------------------------------------------------- malformed bodies


@pytest.mark.parametrize(
    "body, content_type, detail",
    [
        ('{"data": [{"material_id": "mp-1"', "application/json", "a malformed answer (not JSON)"),
        (HTML, "text/html", "an HTML page instead of JSON"),
        ("", "application/json", "an empty answer"),
    ],
    ids=["broken-json", "proxy-html", "empty"],
)
def test_a_200_that_is_not_json_is_retried(mp_server, mp_content, tmp_path, capsys, body, content_type, detail):
    mp_server.fail("summary", 200, first=3, count=2, body=body, content_type=content_type)
    raw = fetch_materials_project(config(mp_server), TEST_API_KEY, tmp_path)
    expected = oxides(mp_content)
    assert list(raw.materials["material_id"]) == expected
    assert mp_server.count("summary") == 1 + -(-len(expected) // 15) + 2  # the second chunk took three tries
    err = said(capsys)
    assert f"Materials Project request failed ({detail}" in err and "(attempt 2/3)" in err and "(attempt 3/3)" in err


def test_a_proxy_page_that_stays_is_one_sentence_and_the_chunks_before_it_are_kept(mp_server, mp_content, tmp_path):
    expected = oxides(mp_content)
    mp_server.fail("summary", 200, first=4, count=None, body=HTML, content_type="text/html")
    with pytest.raises(CMMAError) as err:
        fetch_materials_project(config(mp_server), TEST_API_KEY, tmp_path)
    assert str(err.value) == (
        f"The Materials Project API at {mp_server.url} kept failing (an HTML page instead of JSON, as a proxy or "
        f"login page sends, 3 attempts): 30 of {len(expected)} materials were fetched and kept; re-run the same "
        "command to continue where it stopped."
    )
    mp_server.heal()
    mp_server.reset_log()
    raw = fetch_materials_project(config(mp_server), TEST_API_KEY, tmp_path)
    assert list(raw.materials["material_id"]) == expected
    assert {m for r in mp_server.routed("summary") for m in r.params["material_ids"][0].split(",")} == set(expected[30:])


def test_a_proxy_page_for_the_heartbeat_is_retried(mp_server, tmp_path, capsys):
    mp_server.fail("heartbeat", 200, body=HTML, content_type="text/html")
    raw = fetch_materials_project(config(mp_server, limit=3), TEST_API_KEY, tmp_path)
    assert len(raw.materials) == 3
    assert "an HTML page instead of JSON" in said(capsys)


def test_malformed_json_is_classified_as_transient():
    import orjson

    for body, words in ((b"<html>", "an HTML page"), (b'{"data": [', "a malformed answer"), (b"", "an empty answer")):
        with pytest.raises(ValueError) as exc:
            orjson.loads(body)
        kind, detail = mp.classify(exc.value)
        assert kind == "transient" and detail.startswith(words)


# ----------------------------------------------------------------------------------- Retry-After


def test_a_huge_retry_after_is_capped_and_the_wait_is_said(mp_server, mp_content, tmp_path, capsys, sleeps):
    mp_server.fail("summary", 429, first=2, headers={"Retry-After": "3600"})
    mp_server.fail("summary", 503, first=4, headers={"Retry-After": "0.05"})  # the next chunk's first try
    raw = fetch_materials_project(config(mp_server), TEST_API_KEY, tmp_path)
    assert list(raw.materials["material_id"]) == oxides(mp_content)
    assert sleeps and max(sleeps) <= 0.2  # nobody (not mp-api's session either) waited the hour
    err = said(capsys)
    assert "Materials Project request failed (HTTP 429); the server asked to wait 3600 s; waiting 0.2 s (attempt 2/3)." in err
    assert "the server asked to wait 0.1 s; waiting 0.1 s (attempt 2/3)" in err  # a short one is honoured
    assert 0.05 in sleeps


def test_a_server_that_keeps_asking_to_wait_is_given_up_saying_so(mp_server, tmp_path, sleeps):
    mp_server.fail("summary", 429, first=2, count=None, headers={"Retry-After": "3600"})
    with pytest.raises(CMMAError, match=r"kept failing \(HTTP 429, asking to wait 3600 s, 3 attempts\): 0 of \d+ "
                                        r"materials were fetched and kept; re-run the same command"):
        fetch_materials_project(config(mp_server), TEST_API_KEY, tmp_path)
    assert max(sleeps) <= 0.2


def test_retry_after_takes_seconds_or_an_http_date():
    assert mp.parse_retry_after("120") == 120.0
    assert mp.parse_retry_after(" 0 ") == 0.0
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=90), usegmt=True)
    assert 80 <= mp.parse_retry_after(later) <= 90
    past = format_datetime(datetime.now(timezone.utc) - timedelta(hours=1), usegmt=True)
    assert mp.parse_retry_after(past) == 0.0
    assert mp.parse_retry_after(None) is None and mp.parse_retry_after("soon") is None
    assert mp.parse_retry_after("inf") is None and mp.parse_retry_after("-5") == 0.0


# --------------------------------------------------------------------------------- no answer at all


def test_a_server_that_stops_answering_is_given_up_in_bounded_time_keeping_the_chunks(
    mp_server, mp_content, tmp_path, capsys
):
    expected = oxides(mp_content)
    mp_server.fail("summary", HANG, first=4, count=None)  # the listing and two chunks answer, then silence
    start = time.monotonic()
    with pytest.raises(CMMAError) as err:
        fetch_materials_project(config(mp_server), TEST_API_KEY, tmp_path)
    took = time.monotonic() - start
    assert took < 12, took  # three attempts of 1 s and the waits (slack for a loaded machine; unbounded before)
    assert str(err.value) == (
        f"The Materials Project API at {mp_server.url} kept failing (no answer within 1.0 s, 3 attempts): 30 of "
        f"{len(expected)} materials were fetched and kept; re-run the same command to continue where it stopped."
    )
    err_text = said(capsys)
    assert f"No answer from the Materials Project API at {mp_server.url} for 0.3 s; waiting up to 1.0 s (attempt 1/3)." in err_text
    assert "(attempt 3/3)" in err_text
    assert mp_server.count("summary") == 3 + 3

    mp_server.heal()
    mp_server.reset_log()
    raw = fetch_materials_project(config(mp_server), TEST_API_KEY, tmp_path)
    assert list(raw.materials["material_id"]) == expected
    assert mp_server.count("summary") == -(-len(expected) // 15) - 2  # only the chunks not kept


def test_silence_over_all_attempts_is_bounded_too(mp_server, tmp_path, monkeypatch):
    monkeypatch.setattr(mp, "RETRY_ATTEMPTS", 10)
    monkeypatch.setattr(mp, "GIVE_UP_AFTER_S", 2.5)
    mp_server.fail("summary", HANG, first=2, count=None)
    start = time.monotonic()
    with pytest.raises(CMMAError, match=r"kept failing \(no answer within 0.\d s, 3 attempts\): 0 of"):
        fetch_materials_project(config(mp_server), TEST_API_KEY, tmp_path)
    assert time.monotonic() - start < 7  # ten attempts of 1 s would be 10 s


def test_the_read_timeout_bounds_each_request(mp_server, tmp_path, monkeypatch):
    monkeypatch.setattr(mp, "READ_TIMEOUT_S", 0.2)
    monkeypatch.setattr(mp, "REQUEST_DEADLINE_S", 30.0)
    mp_server.fail("summary", HANG, first=2, count=None)
    start = time.monotonic()
    with pytest.raises(CMMAError, match=r"kept failing \(timed out, 3 attempts\): 0 of"):
        fetch_materials_project(config(mp_server), TEST_API_KEY, tmp_path)
    # each attempt: the read and the session's three retries of it, 0.2 s each (30 s each without the read timeout)
    assert time.monotonic() - start < 20


def test_a_heartbeat_that_never_comes_is_given_up(mp_server, tmp_path):
    mp_server.fail("heartbeat", HANG, count=None)
    start = time.monotonic()
    with pytest.raises(CMMAError) as err:
        fetch_materials_project(config(mp_server), TEST_API_KEY, tmp_path)
    assert time.monotonic() - start < 12
    assert str(err.value) == (
        f"The Materials Project API at {mp_server.url} kept failing (no answer within 1.0 s, 3 attempts): check your "
        "network connection and --endpoint, then re-run the same command to continue where it stopped."
    )


def test_a_slow_listing_that_keeps_answering_is_not_cut(mp_server, mp_content, tmp_path, monkeypatch):
    """The deadline counts silence, not work: a request that has answers coming in is left to finish."""
    monkeypatch.setattr(mp, "REQUEST_DEADLINE_S", 0.6)
    pages = []
    handle = mp_server._handle

    def slow(h):  # every listing page takes 0.25 s: the listing (four pages) takes 1 s in all
        if "material_ids" not in h.path and "summary" in h.path:
            pages.append(h.path)
            time.sleep(0.25)
        return handle(h)

    monkeypatch.setattr(mp_server, "_handle", slow)
    cfg = FetchConfig(source="mp", endpoint=mp_server.url, chunk_size=200, synthesis=False, descriptions=False,
                      limit=40)
    monkeypatch.setattr(mp, "MAX_PAGE", 10)
    raw = fetch_materials_project(cfg, TEST_API_KEY, tmp_path)
    assert len(raw.materials) == 40 and len(pages) == 4


def test_cli_gives_up_on_a_silent_server_with_one_sentence_and_exit_2(cli, mp_server, mp_content, tmp_path):
    ws = tmp_path / "ws"
    mp_server.fail("summary", HANG, first=3, count=None)
    result = cli("fetch", "--source", "mp", "--api-key", TEST_API_KEY, "--endpoint", mp_server.url, "--elements", "O",
                 "--chunk-size", "15", "--no-synthesis", "--no-descriptions", "-w", ws)
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "kept failing (no answer within 1.0 s, 3 attempts): 15 of" in " ".join(result.output.split())
    assert "No answer from the Materials Project API" in result.output
    assert len(list((ws / "raw" / ".partial" / "mp").glob("materials-*.parquet"))) == 1  # the finished chunk stays
    assert not (ws / "raw" / "manifest.json").exists()
