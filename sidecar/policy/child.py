"""Loading a policy in a short-lived child process: the serving process never validates.

Validating a policy builds pydantic's core schema and a validator for every model,
and parsing it leaves the YAML and the schema machinery's garbage behind: about
10 MiB that would stay resident for the sidecar's whole life, for work done at start
and at each reload. `sidecar run` loads in a child instead (`python -m
sidecar.policy.child`): the child runs load_policy and writes the result, the Policy
or the problems with their FILE:LINE:COL, pickled on its stdout. The models are
declared with defer_build (policy/base.py), so unpickling them here builds nothing.

The arguments go to the child on stdin, never in its argv or environment: `env` may
hold the secrets the policy names, and a process's argv is readable by every user.

An OpenAPI document this process already holds compiled is not compiled again by the
child: the child is told their (path, digest) and operation ids, stands in for them,
and its answer names them by (path, digest) (pickle's persistent ids), so neither
side pickles, parses or compiles a large document that did not change.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import pickle
import sys
import traceback
from collections.abc import Mapping
from typing import Any

from .. import openapi
from .loaded import Policy, PolicyError
from .testing import CassetteOverride

# A load reads files and resolves secrets: one still running after this is stuck (a
# `${file:}` that names a FIFO), and the reloads queued behind it would wait forever.
TIMEOUT = 120.0

# The directory holding the `sidecar` package this process runs: the child imports
# the same one, whatever its working directory holds.
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class LoaderFailed(Exception):
    """The child gave no usable answer; `cause` names why, as a load in a thread would
    (the exception's type name)."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.cause = cause


async def load_in_child(
    directory: str,
    *,
    env: Mapping[str, str] | None = None,
    mode: str | None = None,
    cassettes: CassetteOverride | None = None,
    listeners: tuple[tuple[str, int], ...] = (),
) -> Policy:
    """load_policy's answer, worked out in a child process; raises PolicyError as it does."""
    held = openapi.held()
    request = pickle.dumps(
        {
            "load": {
                "directory": directory,
                "env": dict(env) if env is not None else None,
                "mode": mode,
                "cassettes": cassettes,
                "listeners": listeners,
            },
            "held": {key: tuple(sorted(spec.operations)) for key, spec in held.items()},
        }
    )
    python_path = os.environ.get("PYTHONPATH")
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        # -P: the working directory is not put first on the child's import path (a
        # yaml.py there would be imported, and its answer unpickled here).
        "-P",
        "-m",
        __name__,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "PYTHONPATH": _ROOT if not python_path else _ROOT + os.pathsep + python_path,
        },
        # Its own session: Ctrl-C in a terminal stops the sidecar, which ends the load.
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(TIMEOUT):
            out, _ = await child.communicate(request)
    except BaseException as exc:
        # Timed out, or cancelled (the sidecar is stopping): the load is of no use.
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await asyncio.shield(child.wait())
        if isinstance(exc, TimeoutError):
            detail = f"the policy loader took over {TIMEOUT:.0f}s"
            raise LoaderFailed("TimeoutError", detail) from None
        raise
    if child.returncode != 0 or not out:
        raise LoaderFailed(
            "LoaderFailed", f"the policy loader exited with status {child.returncode}"
        )
    # In a worker thread: unpickling compiles the OpenAPI documents that changed (a
    # large one takes a second), and the loop keeps serving meanwhile.
    kind, value = await asyncio.to_thread(_unpickled, out, held)
    if kind == "problems":
        raise PolicyError(value)
    if kind == "crashed":
        raise LoaderFailed(str(value), f"the policy loader failed: {value}")
    if not isinstance(value, Policy):
        raise LoaderFailed("LoaderFailed", f"the policy loader answered {type(value).__name__}")
    return value


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, held: dict[tuple[str, str], openapi.Spec]) -> None:
        super().__init__(io.BytesIO(data))
        self.held = held

    def persistent_load(self, pid: Any) -> openapi.Spec:
        spec = self.held.get(pid)
        if spec is None:
            raise pickle.UnpicklingError(f"no compiled OpenAPI document {pid[0]}")
        return spec


def _unpickled(data: bytes, held: dict[tuple[str, str], openapi.Spec]) -> Any:
    return _Unpickler(data, held).load()


class _Pickler(pickle.Pickler):
    """Names each document the parent holds (openapi.held_elsewhere) by (path, digest)."""

    def __init__(self, file: Any, held: Mapping[tuple[str, str], object]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.held = held

    def persistent_id(self, obj: Any) -> tuple[str, str] | None:
        if isinstance(obj, openapi.Spec):
            key = (obj.source, obj.digest)
            if key in self.held:
                return key
        return None


def main() -> int:
    from .loader import load_policy

    request: dict[str, Any] = pickle.load(sys.stdin.buffer)
    # Only the answer goes to stdout: fd 1 becomes stderr, for Python and C alike.
    answer = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    held: dict[tuple[str, str], tuple[str, ...]] = request["held"]
    openapi.held_elsewhere(held)
    try:
        result: tuple[str, object] = ("policy", load_policy(**request["load"]))
    except PolicyError as exc:
        result = ("problems", exc.problems)
    except Exception as exc:  # a loader bug: its traceback on stderr, as the runtime logged it
        traceback.print_exc()
        result = ("crashed", type(exc).__name__)
    try:
        with answer:
            _Pickler(answer, held).dump(result)
    except BrokenPipeError:
        return 1  # the parent stopped waiting (it is stopping): nobody to answer
    return 0


if __name__ == "__main__":
    sys.exit(main())
