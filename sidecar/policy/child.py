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
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Mapping
from typing import Any

from .loaded import Policy, PolicyError
from .positions import Position, Problem
from .testing import CassetteOverride


class LoaderFailed(Exception):
    """The child ended without an answer (a loader bug, or it was killed)."""


async def load_in_child(
    directory: str,
    *,
    env: Mapping[str, str] | None = None,
    mode: str | None = None,
    cassettes: CassetteOverride | None = None,
    listeners: tuple[tuple[str, int], ...] = (),
) -> Policy:
    """load_policy's answer, worked out in a child process; raises PolicyError as it does."""
    request = pickle.dumps(
        {
            "directory": directory,
            "env": dict(env) if env is not None else None,
            "mode": mode,
            "cassettes": cassettes,
            "listeners": listeners,
        }
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        __name__,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        out, _ = await child.communicate(request)
    except BaseException:
        # Cancelled (the sidecar is stopping): the load is of no use to anyone.
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        raise
    if child.returncode != 0 or not out:
        raise LoaderFailed(f"the policy loader exited with status {child.returncode}")
    # In a worker thread: unpickling compiles the OpenAPI documents that changed (a
    # large one takes a second), and the loop keeps serving meanwhile.
    kind, value = await asyncio.to_thread(pickle.loads, out)
    if kind == "problems":
        raise PolicyError(value)
    if not isinstance(value, Policy):
        raise LoaderFailed(f"the policy loader answered {type(value).__name__}")
    return value


def main() -> int:
    from .loader import load_policy

    # Ctrl-C in a terminal reaches the whole process group: the parent says why it
    # stops, the child just ends.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    request: dict[str, Any] = pickle.load(sys.stdin.buffer)
    # Only the answer goes to stdout: anything a library prints goes to stderr.
    answer = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr
    try:
        result: tuple[str, object] = ("policy", load_policy(**request))
    except PolicyError as exc:
        result = ("problems", exc.problems)
    except Exception as exc:  # a loader bug: its traceback on stderr, as the runtime logged it
        traceback.print_exc()
        at = Position(request["directory"], 1, 1)
        result = ("problems", [Problem(at, f"cannot load: {type(exc).__name__}")])
    try:
        with answer:
            answer.write(pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL))
    except BrokenPipeError:
        return 1  # the parent stopped waiting (it is stopping): nobody to answer
    return 0


if __name__ == "__main__":
    sys.exit(main())
