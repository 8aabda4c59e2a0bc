"""The policy watcher on its own: each burst of changes is one call, seen through inotify
on Linux (asyncinotify, on the event loop: no thread) and through watchfiles where there is
no inotify."""

from __future__ import annotations

import asyncio
import errno
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import sidecar.policy
from sidecar.policy import inotify, watcher
from tests.helpers import probe


class Watching:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.calls = 0
        self.called = asyncio.Event()
        self.stop = asyncio.Event()
        self.ready = asyncio.Event()

    async def on_change(self) -> None:
        self.calls += 1
        self.called.set()

    async def next_call(self) -> None:
        await asyncio.wait_for(self.called.wait(), 10)
        self.called.clear()


@pytest.fixture
async def watching(tmp_path: Path) -> AsyncIterator[Watching]:
    w = Watching(tmp_path)
    task = asyncio.create_task(
        watcher.watch(str(tmp_path), frozenset, w.on_change, stop=w.stop, ready=w.ready)
    )
    await asyncio.wait_for(w.ready.wait(), 10)
    yield w
    w.stop.set()
    await asyncio.wait_for(task, 10)  # the watch ends once stop is set


async def test_a_burst_of_writes_is_one_reload(watching: Watching) -> None:
    for i in range(5):
        (watching.directory / "policy.yaml").write_text(f"version: 1 # {i}\n")
    await watching.next_call()
    await asyncio.sleep(0.5)
    assert watching.calls == 1


async def test_a_change_made_while_the_secret_watches_move_is_caught_up(tmp_path: Path) -> None:
    """A reload that changes the set of secret files moves the watches to their
    directories; a file changed during that reload is seen by neither the old watches
    (closed) nor the new ones (not there yet), so the watcher reloads once more."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    policies = tmp_path / "policies"
    policies.mkdir()
    secret_set: frozenset[str] = frozenset()
    calls = []
    stop, ready, twice = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def on_change() -> None:
        nonlocal secret_set
        calls.append(secret_set)
        if len(calls) == 2:
            twice.set()
        if len(calls) == 1:
            # This reload found a new secret file, and meanwhile the policy changed.
            secret_set = frozenset({str(secrets_dir / "token")})
            (policies / "policy.yaml").write_text("version: 1 # changed during the reload\n")

    task = asyncio.create_task(
        watcher.watch(str(policies), lambda: secret_set, on_change, stop=stop, ready=ready)
    )
    await asyncio.wait_for(ready.wait(), 10)
    (policies / "policy.yaml").write_text("version: 1\n")
    await asyncio.wait_for(twice.wait(), 10)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert calls[1] == frozenset({str(secrets_dir / "token")})


async def test_a_file_in_a_directory_made_after_start_is_seen(watching: Watching) -> None:
    sub = watching.directory / "templates"
    sub.mkdir()
    await watching.next_call()
    (sub / "openai.yaml").write_text("upstream: https://api.openai.com\n")
    await watching.next_call()


async def watchfiles_watches(tmp_path: Path) -> None:
    w = Watching(tmp_path)
    task = asyncio.create_task(
        watcher.watch(str(tmp_path), frozenset, w.on_change, stop=w.stop, ready=w.ready)
    )
    await asyncio.wait_for(w.ready.wait(), 10)
    (tmp_path / "policy.yaml").write_text("version: 1\n")
    await w.next_call()
    w.stop.set()
    await asyncio.wait_for(task, 10)


async def test_without_asyncinotify_watchfiles_watches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As off Linux, where asyncinotify is not installed: importing the glue fails.
    monkeypatch.setitem(sys.modules, "asyncinotify", None)
    monkeypatch.delitem(sys.modules, "sidecar.policy.inotify")
    monkeypatch.delattr(sidecar.policy, "inotify")
    await watchfiles_watches(tmp_path)


async def test_when_inotify_cannot_be_had_watchfiles_watches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_inotify() -> None:
        raise OSError(errno.EMFILE, "the user's inotify instances are all taken")

    monkeypatch.setattr(inotify, "Inotify", no_inotify)
    await watchfiles_watches(tmp_path)


PROBE = """
import asyncio, json, sys, threading, tempfile
from sidecar.policy.watcher import watch

async def main():
    stop, ready = asyncio.Event(), asyncio.Event()
    with tempfile.TemporaryDirectory() as d:
        task = asyncio.create_task(watch(d, frozenset, asyncio.sleep, stop=stop, ready=ready))
        await asyncio.wait_for(ready.wait(), 10)
        threads = threading.active_count()
        stop.set()
        await task
    return threads

threads = asyncio.run(main())
print(json.dumps({"threads": threads, "modules": [m for m in ("watchfiles", "anyio")
                                                  if m in sys.modules]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify is Linux's")
def test_watching_on_linux_starts_no_thread_and_loads_no_library() -> None:
    assert probe(PROBE) == {"threads": 1, "modules": []}
