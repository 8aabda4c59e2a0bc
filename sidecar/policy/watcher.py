"""Watches the policy directory (and the directories of secret files) for changes.

The directory is watched, not single files: a Kubernetes ConfigMap or Secret
volume swaps an atomic `..data` symlink, which a watch on one file misses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable

log = logging.getLogger("sidecar.watcher")


async def watch(
    directory: str,
    secret_files: Callable[[], frozenset[str]],
    on_change: Callable[[], Awaitable[object]],
    *,
    debounce_ms: int = 300,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Call `on_change` after each burst of changes, until `stop` is set.

    `ready` is set once the watches are in place: changes made before that
    can be missed, which matters to whoever writes a file right after start.
    """
    stop = stop or asyncio.Event()
    catch_up = False
    while not stop.is_set():
        secrets = secret_files()
        paths = _watched(directory, secrets)
        log.debug("watching %s", sorted(paths))
        async with contextlib.aclosing(_changes(sorted(paths), debounce_ms, stop)) as bursts:
            async for changes in bursts:
                if ready is not None:
                    ready.set()
                if not changes and not catch_up:
                    continue
                catch_up = False
                try:
                    await on_change()
                except Exception:
                    # Whatever went wrong with this change, keep watching for the next one.
                    log.exception("reload after a change failed")
                if secret_files() != secrets:
                    # The set of secret files changed: watch their new directories. What
                    # changed since this reload began is not seen by the new watches, so
                    # once they are in place, one more reload catches it up.
                    catch_up = True
                    break
            else:
                return


async def _changes(
    paths: list[str], debounce_ms: int, stop: asyncio.Event
) -> AsyncGenerator[set[str], None]:
    """An empty set once the watches are in place, then each burst of changed paths."""
    try:
        from . import inotify  # asyncinotify is installed on Linux only

        bursts = inotify.changes(paths, debounce_ms=debounce_ms, step_ms=50, stop=stop)
        first = await anext(bursts)
    except (ImportError, OSError):
        bursts = _watchfiles(paths, debounce_ms, stop)  # no inotify here (macOS)
    else:
        yield first
    async with contextlib.aclosing(bursts):
        async for changes in bursts:
            yield changes


async def _watchfiles(
    paths: list[str], debounce_ms: int, stop: asyncio.Event
) -> AsyncGenerator[set[str], None]:
    from watchfiles import awatch

    async for changes in awatch(
        *paths,
        debounce=debounce_ms,
        step=50,
        stop_event=stop,
        watch_filter=None,
        recursive=True,
        ignore_permission_denied=True,
        # The first (empty) yield after a quiet second proves the watches exist.
        rust_timeout=1000,
        yield_on_timeout=True,
    ):
        yield {path for _change, path in changes}


def _watched(directory: str, secrets: frozenset[str]) -> set[str]:
    paths = {os.path.abspath(directory)}
    paths.update(d for d in (os.path.dirname(f) for f in secrets) if os.path.isdir(d) and d != "/")
    return paths
