"""The docs' examples work: every ```yaml block of README.md and docs/*.md passes
`sidecar validate`, and every metric name they mention is in a live /metrics.

A block that is not a whole policy (a fragment of a service, a template file) is
marked with `<!-- not-a-policy -->` on the line just before its fence (docs/policy.md,
"Examples in the docs"). The placeholders a block needs are supplied here:
`version: 1` when it leaves it out, and a real OpenAPI document at any relative
`openapi:` path it names. Secrets are checked for form only, as `sidecar validate`
does by default, so no key is needed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import aiohttp
import pytest

from sidecar.cli import main

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- not-a-policy -->"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```yaml\n(.*?)^```", re.S | re.M)
_OPENAPI = re.compile(r"^\s*openapi:\s*['\"]?([^'\"\s#$]+)", re.M)
_METRIC = re.compile(r"\bsidecar_[a-z0-9_]*[a-z0-9]\b")


def yaml_blocks() -> list[tuple[str, str]]:
    """(page:line, text) of each policy block."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in _FENCE.finditer(text):
            before = text[: match.start()].rstrip("\n").rpartition("\n")[2]
            if before.strip() == MARKER:
                continue
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{page.relative_to(ROOT)}:{line}", match.group(1)))
    return found


@pytest.mark.parametrize(("where", "text"), yaml_blocks(), ids=[w for w, _ in yaml_blocks()])
def test_every_yaml_block_passes_sidecar_validate(
    where: str, text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if not re.search(r"^version:", text, re.M):
        text = "version: 1\n" + text
    for ref in _OPENAPI.findall(text):
        if not ref.startswith("/"):
            document = tmp_path / ref
            document.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / "tests" / "data" / "openapi" / "petstore.yaml", document)
    (tmp_path / "example.yaml").write_text(text)
    code = main(["validate", str(tmp_path)])
    err = capsys.readouterr().err.replace(str(tmp_path / "example.yaml"), "")
    assert code == 0, (
        f"the yaml block at {where} does not validate (mark a fragment with {MARKER} on "
        f"the line before its fence):\n{err}"
    )


def test_the_marker_is_documented() -> None:
    assert (
        MARKER in (ROOT / "docs" / "policy.md").read_text().partition("## Examples in the docs")[2]
    )


def _documented_metrics() -> dict[str, str]:
    names: dict[str, str] = {}
    for page in PAGES:
        for i, line in enumerate(page.read_text().splitlines(), 1):
            for name in _METRIC.findall(line):
                names.setdefault(name, f"{page.relative_to(ROOT)}:{i}")
    return names


async def test_every_metric_the_docs_name_is_in_a_live_metrics(start_sidecar) -> None:  # type: ignore[no-untyped-def]
    sc = await start_sidecar(
        """
        version: 1
        services:
          a: {upstream: "http://127.0.0.1:9"}
        """
    )
    async with aiohttp.ClientSession() as client, client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    live = set()
    for line in text.splitlines():
        if line.startswith(("# TYPE ", "# HELP ")):
            live.add(line.split()[2])
        elif line and not line.startswith("#"):
            live.add(line.partition("{")[0].split()[0])
    documented = _documented_metrics()
    assert documented, "the docs name no metric"
    missing = {
        f"{name} ({where})"
        for name, where in documented.items()
        if name not in live and re.sub(r"_(bucket|count|sum)$", "", name) not in live
    }
    assert not missing, f"named in the docs, absent from /metrics: {sorted(missing)}"


def test_the_readmes_error_table_names_each_reason_once() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme.partition("| `X-Sidecar-Error` | status |")[2].partition("\n\n")[0]
    reasons = re.findall(r"^\| `([a-z_]+)`", table, re.M)
    assert len(reasons) > 10
    assert sorted(r for r in set(reasons) if reasons.count(r) > 1) == []
