"""Path templating and schema merging on their own, on strings and values."""

from __future__ import annotations

import pytest

from sidecar.learn.paths import template_all, value_kind
from sidecar.learn.shapes import infer


@pytest.mark.parametrize(
    ("segment", "kind"),
    [
        ("42", "integer"),
        ("550e8400-e29b-41d4-a716-446655440000", "uuid"),
        ("2026-12-07", "date"),
        ("9fceb02d0ae598e95dc970b74767f19372d61af8", "hash"),
        ("someone@example.com", "email"),
        ("cus_9s8d7f6g5h", "id"),
        ("chatcmpl-AbC123dEf", "id"),
        ("repos", None),
        ("gpt-4o", None),
        ("cafe", None),  # hex letters alone are a word
    ],
)
def test_value_kind(segment, kind):
    assert value_kind(segment) == kind


def test_words_under_a_parameter_that_recur_stay_words():
    paths = [
        "/repos/a/x/issues",
        "/repos/b/y/issues",
        "/repos/a/x/pulls",
        "/repos/b/y/pulls",
    ]
    found = {t.path for t in template_all(paths).values()}
    assert found == {"/repos/{owner}/{repo}/issues", "/repos/{owner}/{repo}/pulls"}


def test_first_segment_is_never_merged_and_singular_words_stay():
    paths = ["/user", "/users/a", "/users/b", "/rate_limit", "/user/repos", "/v1/models"]
    found = {p: t.path for p, t in template_all(paths).items()}
    assert found["/user"] == "/user"
    assert found["/user/repos"] == "/user/repos"
    assert found["/users/a"] == "/users/{user}"


def test_many_siblings_are_values_anywhere():
    paths = [f"/v1/catalog/{w}" for w in ("red", "green", "blue", "black", "white", "pink")]
    assert {t.path for t in template_all(paths).values()} == {"/v1/catalog/{catalog}"}


def test_enums_only_for_short_words_seen_often():
    assert infer([{"s": "open"}, {"s": "closed"}, {"s": "open"}])["properties"]["s"]["enum"] == [
        "closed",
        "open",
    ]
    # Each value once: no evidence it is a closed set.
    assert "enum" not in infer([{"s": "a"}, {"s": "b"}, {"s": "c"}])["properties"]["s"]
    # Digits, or a field named like a credential: never written down.
    assert "enum" not in infer([{"s": "sk1"}, {"s": "sk1"}, {"s": "sk1"}])["properties"]["s"]
    token = infer([{"token": "abc"}, {"token": "abc"}, {"token": "abc"}])
    assert "enum" not in token["properties"]["token"]
