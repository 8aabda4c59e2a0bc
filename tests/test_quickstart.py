"""The README's first call answers on a fresh machine: offline, without keys.

What `make run` starts: examples/echo_upstream.py on 127.0.0.1:15080 and
`sidecar run --policies policies` with the Makefile's placeholder keys.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest

from tests.helpers import ROOT, eventually, sidecar_process

pytestmark = pytest.mark.process

# The port policies/example.yaml names; the Makefile starts the echo upstream on it.
ECHO = "http://127.0.0.1:15080"
# Exported by the Makefile when unset, so the OpenAI and GitHub examples load.
PLACEHOLDERS = {
    "OPENAI_API_KEY": "sk-example-placeholder",
    "GITHUB_TOKEN": "ghp-example-placeholder",
}


def readme_first_curl() -> tuple[dict[str, str], str]:
    """The headers and the path (after the sidecar's address) of the README's first curl."""
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("curl "))
    words = shlex.split(line)
    headers = dict(
        words[i + 1].split(": ", 1) for i, word in enumerate(words) if word in ("-H", "--header")
    )
    [url] = [word for word in words if word.startswith("http://")]
    found = re.fullmatch(r"http://127\.0\.0\.1:15000(/\S*)", url)
    assert found, f"the README's first curl calls the sidecar's default address: {url}"
    return headers, found.group(1)


@pytest.fixture
async def echo_upstream() -> AsyncIterator[None]:
    """examples/echo_upstream.py, started as the Makefile starts it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "examples/echo_upstream.py", cwd=ROOT, stdout=asyncio.subprocess.DEVNULL
    )
    try:
        async with aiohttp.ClientSession() as session:

            async def answers() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"echo_upstream.py exited with {proc.returncode}")
                try:
                    async with session.get(f"{ECHO}/") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await eventually(answers, f"the example upstream to answer on {ECHO}", 20)
        yield
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()


async def test_the_readmes_first_curl_answers_200_from_the_example_service(
    echo_upstream: None, client: aiohttp.ClientSession
) -> None:
    headers, path = readme_first_curl()
    env = {**PLACEHOLDERS, **os.environ}
    async with (
        sidecar_process(ROOT / "policies", env=env) as proc,
        client.get(proc.url + path, headers=headers) as r,
    ):
        assert r.status == 200, await r.text()
        echoed = await r.json()
    # What the README says the answer shows: the prefix stripped, the header added.
    assert path.startswith("/example/")
    assert echoed["path"] == path.removeprefix("/example").split("?")[0]
    assert echoed["headers"]["X-Added-By-Sidecar"] == "policies/example.yaml"
