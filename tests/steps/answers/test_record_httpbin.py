"""`sidecar record` / `sidecar replay` against a real third-party server: httpbin.

httpbin (the Flask app behind httpbin.org) runs on loopback in a thread. The
real program records calls to it, httpbin is stopped, and the real program
replays them: the agent gets the same status, headers and body bytes, except
that the credential httpbin echoes back (/headers, /bearer) reads "[redacted]",
because no cassette ever holds it. Recording the same calls twice writes the
same files, but for the upstream's Date header (and bytes in which the
upstream itself differs: a gzip header's time).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import httpbin
import pytest
from werkzeug.serving import BaseWSGIServer, make_server

from tests.helpers import sidecar_process

SECRET = "httpbin-canary-token-7d41f0c2"
REDACTED = "[redacted]"
# Differ between a live answer and its replay by nature, or exist on one side only;
# Content-Length differs where the echoed credential was redacted (the body is compared).
_UNCOMPARED = {
    "x-sidecar-replay",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "content-length",
}

CALLS: list[tuple[str, str, bytes | None]] = [
    ("GET", "/bin/get?colour=blue&n=2", None),
    ("GET", "/bin/headers", None),
    ("GET", "/bin/bearer", None),
    ("POST", "/bin/post", b'{"name": "Ada", "tags": ["x", "y"]}'),
    ("PUT", "/bin/anything/deep/path?x=%C3%A9", b"plain text body"),
    ("GET", "/bin/status/418", None),
    ("GET", "/bin/base64/aGVsbG8gZnJvbSBodHRwYmluIQ==", None),
    ("GET", "/bin/gzip", None),
    ("GET", "/bin/html", None),
]


class Httpbin:
    def __init__(self) -> None:
        self.server: BaseWSGIServer = make_server("127.0.0.1", 0, httpbin.app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.thread.is_alive():
            self.server.shutdown()
            self.thread.join(10)
        self.server.server_close()


@pytest.fixture
def httpbin_server() -> Iterator[Httpbin]:
    server = Httpbin()
    yield server
    server.stop()


def write_policy(directory: Path, upstream: str) -> Path:
    directory.mkdir()
    (directory / "policy.yaml").write_text(
        f"""version: 1
services:
  bin:
    upstream: {upstream}
    auth: {{type: bearer, token: "${{env:BIN_TOKEN}}"}}
"""
    )
    return directory


Answer = tuple[int, dict[str, str], bytes]


async def call_all(url: str) -> list[Answer]:
    answers: list[Answer] = []
    # No automatic decompression: the agent's bytes, as they came, are compared.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        for method, path, body in CALLS:
            headers = {"Content-Type": "application/json"} if body and body[:1] == b"{" else {}
            async with session.request(method, url + path, data=body, headers=headers) as r:
                kept = {k.lower(): v for k, v in r.headers.items() if k.lower() not in _UNCOMPARED}
                answers.append((r.status, kept, await r.read()))
    return answers


@pytest.fixture
async def recorded(
    tmp_path: Path, httpbin_server: Httpbin
) -> AsyncIterator[tuple[Path, Path, list[Answer]]]:
    """The calls recorded once (their live answers) into tapes/, then the server stopped."""
    policies = write_policy(tmp_path / "policies", httpbin_server.url)
    tapes = tmp_path / "tapes"
    env = {**os.environ, "BIN_TOKEN": SECRET}
    async with sidecar_process(
        policies, "--cassettes", str(tapes), env=env, command_name="record"
    ) as sc:
        live = await call_all(sc.url)
        assert await sc.stop() == 0
    yield policies, tapes, live


def _without_date(text: str) -> list[str]:
    lines = text.splitlines()
    return [line for i, line in enumerate(lines) if i == 0 or '"Date",' not in lines[i - 1]]


@pytest.mark.process
async def test_httpbin_recorded_then_replayed_with_the_server_stopped(
    recorded: tuple[Path, Path, list[Answer]], httpbin_server: Httpbin
) -> None:
    policies, tapes, live = recorded
    # What the agent saw live: httpbin got the injected credential and echoed it.
    assert live[1][0] == 200 and SECRET.encode() in live[1][2]
    assert live[2][0] == 200 and SECRET.encode() in live[2][2]
    assert live[5][0] == 418

    files = sorted((tapes / "bin").glob("*.json"))
    assert len(files) == len(CALLS)
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert SECRET not in text, f.name
    # httpbin's pretty JSON is kept parsed, so a cassette diffs line by line.
    get = next(f for f in files if f.name.startswith("GET-get-"))
    assert '"colour": "blue"' in get.read_text(encoding="utf-8")

    await asyncio.to_thread(httpbin_server.stop)
    env = {**os.environ, "BIN_TOKEN": SECRET}
    async with sidecar_process(
        policies, "--cassettes", str(tapes), env=env, command_name="replay"
    ) as sc:
        replayed = await call_all(sc.url)
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{sc.url}/bin/get?colour=red") as r,
        ):
            assert r.status == 501
            assert r.headers["X-Sidecar-Error"] == "no_recording"
            assert "GET /get?colour=red" in (await r.json())["detail"]
        assert await sc.stop() == 0

    for (method, path, _), want, got in zip(CALLS, live, replayed, strict=True):
        status, headers, body = want
        # The whole injected header value is one secret, the token alone another.
        for secret in (f"Bearer {SECRET}", SECRET):
            body = body.replace(secret.encode(), REDACTED.encode())
        assert got == (status, headers, body), f"{method} {path}"


@pytest.mark.process
async def test_recording_twice_writes_the_same_files_but_the_date(
    tmp_path: Path, httpbin_server: Httpbin
) -> None:
    policies = write_policy(tmp_path / "policies", httpbin_server.url)
    env = {**os.environ, "BIN_TOKEN": SECRET}
    runs = []
    for run in ("one", "two"):
        tapes = tmp_path / run
        async with sidecar_process(
            policies, "--cassettes", str(tapes), env=env, command_name="record"
        ) as sc:
            await call_all(sc.url)
            assert await sc.stop() == 0
        runs.append({f.name: f.read_text(encoding="utf-8") for f in (tapes / "bin").iterdir()})
    first, second = runs
    assert sorted(first) == sorted(second)
    assert len(first) == len(CALLS)
    for name, text in first.items():
        if name.startswith("GET-gzip-"):
            continue  # the gzip header holds httpbin's clock: the upstream's bytes differ
        assert _without_date(text) == _without_date(second[name]), name


@pytest.mark.process
async def test_replay_passthrough_sends_what_has_no_recording_to_the_server(
    tmp_path: Path, httpbin_server: Httpbin
) -> None:
    policies = write_policy(tmp_path / "policies", httpbin_server.url)
    tapes = tmp_path / "empty"
    env = {**os.environ, "BIN_TOKEN": SECRET}
    async with sidecar_process(
        policies,
        "--cassettes",
        str(tapes),
        "--passthrough",
        "--fast",
        env=env,
        command_name="replay",
    ) as sc:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{sc.url}/bin/bearer") as r,
        ):
            assert r.status == 200
            assert "X-Sidecar-Replay" not in r.headers
            assert (await r.json())["token"] == SECRET
        assert await sc.stop() == 0
    assert not tapes.exists()  # passed through, never recorded


def test_record_and_replay_flags_are_those_of_run(tmp_path: Path) -> None:
    """The shortcuts are `run --mode`, their flags one override of every service's cassettes."""
    from sidecar.cli import _cassette_override, build_parser
    from sidecar.policy.loader import load_policy

    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(
        "version: 1\nservices:\n"
        # A live service's cassettes settings are for runs that record or replay it.
        "  a: {upstream: 'http://127.0.0.1:9', cassettes: {dir: tapes/a, redact: [X-Key]}}\n"
        "  b: {upstream: 'http://127.0.0.1:9'}\n"
        "  m: {upstream: 'http://127.0.0.1:9', mode: mock, mock: [{body: ok}]}\n"
    )
    parser = build_parser()
    args = parser.parse_args(
        [
            "replay",
            str(policies),
            "--fast",
            "--passthrough",
            "--cassettes",
            str(tmp_path / "c"),
            "--listen",
            "127.0.0.1:0",
        ]
    )
    assert (args.mode, args.listen) == ("replay", ("127.0.0.1", 0))
    policy = load_policy(args.policies, mode=args.mode, cassettes=_cassette_override(args))
    for name in ("a", "b"):
        spec = policy.services[name].spec
        assert spec.mode == "replay"
        assert spec.cassettes is not None
        assert spec.cassettes.dir == str(tmp_path / "c" / name)
        assert (spec.cassettes.pacing, spec.cassettes.on_missing) == ("fast", "passthrough")
    assert policy.services["a"].spec.cassettes.redact == ["X-Key"]  # the rest stays
    assert policy.services["m"].spec.mode == "mock"

    # Without the flags, each service's own cassettes settings stand.
    args = parser.parse_args(["record", str(policies)])
    policy = load_policy(args.policies, mode=args.mode, cassettes=_cassette_override(args))
    a = policy.services["a"].spec.cassettes
    assert a is not None and a.dir == "tapes/a" and a.pacing == "recorded"
    assert policy.services["b"].spec.mode == "record"
    assert _cassette_override(parser.parse_args(["run", "--policies", str(policies)])) is None


def test_record_needs_a_policy_directory_and_mock_takes_no_cassettes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.cli import main
    from sidecar.policy.loader import PolicyError, load_policy

    monkeypatch.delenv("SIDECAR_POLICIES", raising=False)
    with pytest.raises(SystemExit) as done:
        main(["record"])
    assert done.value.code == 2
    assert "record: give the policy directory DIR" in capsys.readouterr().err

    (tmp_path / "policy.yaml").write_text(
        "version: 1\nservices:\n  m:\n    upstream: http://127.0.0.1:9\n    mode: mock\n"
        "    mock: [{body: ok}]\n    cassettes: tapes\n"
    )
    with pytest.raises(PolicyError) as refused:
        load_policy(str(tmp_path))
    assert "cassettes are not used with mode: mock" in str(refused.value.problems[0])
