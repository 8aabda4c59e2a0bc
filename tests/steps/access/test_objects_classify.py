"""steps/access/objects.py's reading of S3 calls, and its rules, without a server."""

from __future__ import annotations

import pytest

from sidecar.policy.cloud import ObjectRule
from sidecar.steps.access.objects import Operation, Rule, classify


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/", {}, ("list", None, None, "")),
        ("PUT", "/b", {}, ("admin", "b", None, None)),
        ("GET", "/b", {"list-type": "2", "prefix": "p/"}, ("list", "b", None, "p/")),
        ("POST", "/b", {"delete": ""}, ("delete", "b", None, None)),
        ("GET", "/b/a%20b/c", {}, ("read", "b", "a b/c", None)),
        ("PUT", "/b/k", {"partNumber": "1", "uploadId": "u"}, ("write", "b", "k", None)),
        ("POST", "/b/k", {"uploads": ""}, ("write", "b", "k", None)),
        ("DELETE", "/b/k", {"uploadId": "u"}, ("write", "b", "k", None)),
        ("DELETE", "/b/k", {}, ("delete", "b", "k", None)),
        ("POST", "/b/k", {"select": "", "select-type": "2"}, ("read", "b", "k", None)),
    ],
)
def test_path_style(
    method: str, path: str, query: dict[str, str], expected: tuple[object, ...]
) -> None:
    op = classify(method, path, query, bucket=None)
    assert (op.action, op.bucket, op.key, op.prefix) == expected


def test_virtual_hosted_the_whole_path_is_the_key() -> None:
    op = classify("GET", "/agents/alice/x", {}, bucket="docs")
    assert (op.action, op.bucket, op.key) == ("read", "docs", "agents/alice/x")
    op = classify("GET", "/", {"prefix": "agents/alice/"}, bucket="docs")
    assert (op.action, op.bucket, op.prefix) == ("list", "docs", "agents/alice/")


def test_agent_placeholder_and_globs() -> None:
    rule = Rule(1, ObjectRule(keys=["agents/{agent}/**", "shared/*.txt"], actions=["read", "list"]))
    assert rule.lets("alice", Operation("read", "b", "agents/alice/deep/x"))
    assert not rule.lets("alice", Operation("read", "b", "agents/alicex/y"))
    assert not rule.lets("a*", Operation("read", "b", "agents/alice/y"))  # a name is no glob
    assert not rule.lets("a/b", Operation("read", "b", "agents/a/b/y"))
    assert not rule.lets(None, Operation("read", "b", "agents//y"))
    assert rule.lets(None, Operation("read", "b", "shared/n.txt"))
    assert not rule.lets(None, Operation("read", "b", "shared/sub/n.txt"))
    assert rule.lets("alice", Operation("list", "b", prefix="agents/alice/"))
    assert not rule.lets("alice", Operation("list", "b", prefix="agents/"))
    assert not rule.lets("alice", Operation("write", "b", "agents/alice/x"))
