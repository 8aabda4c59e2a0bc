"""`files:` in the policy: what it accepts, and each mistake at its FILE:LINE:COL."""

from __future__ import annotations

from pathlib import Path

from sidecar.check import check_service
from sidecar.policy.loader import load_policy
from sidecar.policy.models import PolicyFile
from sidecar.runtime import Sidecar
from tests.policy.test_loader import errors, write


def test_a_files_service_needs_no_upstream(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          docs:
            files:
              root: /data/
              extensions: [.TXT, .md]
              max_size: 100MiB
              per_agent: true
              quota: 1GiB
        """,
    )
    docs = load_policy(str(tmp_path)).services["docs"]
    files = docs.spec.files
    assert files is not None
    assert docs.prefix == "/docs"
    assert files.root == "/data"
    assert files.extensions == [".md", ".txt"]
    assert (files.max_size, files.quota) == (100 * 1024**2, 1024**3)
    assert files.read_only is False and files.list_limit == 1000
    # `sidecar run --mode record|replay` leaves it alone: there is nothing to record.
    assert load_policy(str(tmp_path), mode="record").services["docs"].spec.mode == "live"


def test_files_mistakes_are_reported_where_they_are(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          a:
            files: {root: data}
          b:
            files: {root: /data, quota: 10MiB}
          c:
            files: {root: /data, extensions: [txt]}
          d:
            files: {root: /data, read_onyl: true}
          e:
            upstream: https://example.com
            files: {root: /data}
          f:
            files: {root: /data}
            auth: {type: bearer, token: x}
            retry: {attempts: 2}
          g:
            files: {root: /data}
            mode: mock
          h:
            files: {root: /}
        """,
    )
    at = f"{tmp_path}/p.yaml"
    assert errors(tmp_path) == [
        f"{at}:4:19: root must be an absolute path (e.g. /data)",
        f"{at}:6:12: quota is per agent: it needs per_agent: true",
        f"{at}:8:38: extension 'txt' must look like .txt (a dot, then a name)",
        f"{at}:10:26: unknown key 'read_onyl' (did you mean 'read_only'?)",
        f"{at}:12:5: a files service has no upstream: upstream cannot be used with files",
        f"{at}:15:5: a files service has no upstream: auth, retry cannot be used with files",
        f"{at}:19:5: a files service is always mode: live (it has nothing to mock or record)",
        f"{at}:22:19: root must not be / (serve a directory of its own)",
    ]


def test_the_schema_describes_files() -> None:
    schema = PolicyFile.model_json_schema()
    service = schema["$defs"]["Service"]
    assert {"required": ["files"]} in service["anyOf"]
    files = schema["$defs"]["Files"]["properties"]
    assert set(files) == {
        "root",
        "read_only",
        "extensions",
        "max_size",
        "per_agent",
        "quota",
        "list_limit",
    }
    assert all("description" in value for value in files.values())


async def test_sidecar_check_looks_at_the_root(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    write(
        tmp_path,
        "p.yaml",
        f"""
        version: 1
        services:
          docs: {{files: {{root: "{root}"}}}}
          gone: {{files: {{root: "{tmp_path / "missing"}"}}}}
        """,
    )
    sidecar = Sidecar(str(tmp_path))
    assert (await sidecar.reload("startup")).ok
    try:
        docs = await check_service(sidecar, "docs")
        gone = await check_service(sidecar, "gone")
    finally:
        await sidecar.close()
    assert (docs.ok, docs.stage, docs.error) == (True, "ok", None)
    assert (gone.ok, gone.stage) == (False, "files")
    assert gone.error == "root is not a directory the sidecar can read and write"
