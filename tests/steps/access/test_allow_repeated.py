"""Allow decisions kept per (method, agent, path) must be the decisions the rules make:
the same call again, other calls after the kept ones are cleared, and services whose
rules read the query or headers (never kept)."""

from __future__ import annotations

import pytest

from sidecar.core.call import Call
from sidecar.core.problems import ProblemError
from sidecar.core.reasons import Reason
from sidecar.policy.access import AllowRule
from sidecar.steps.access import allow
from sidecar.steps.access.allow import Allow

RULES = [
    AllowRule(agents=["research-*"], methods=["GET"], paths=["/repos/*/*", "/repos/*/*/issues/**"]),
    AllowRule(agents="triage-bot", methods=["POST", "PATCH"], paths=["/repos/*/*/issues/*"]),
    AllowRule(methods="GET", paths="/meta"),
]
CALLS = [
    # agent, method, target, allowed
    ("research-1", "GET", "/repos/o/r", True),
    ("research-1", "GET", "/repos/o/r?page=2", True),
    ("research-1", "POST", "/repos/o/r", False),
    ("research-1", "GET", "/repos/o/r/", False),
    ("research-1", "GET", "/rep%6Fs/o/r", True),
    ("research-1", "GET", "/repos/o%2Fr", False),
    ("research-1", "GET", "/repos/o/r/issues/%2e%2e/x", False),
    ("triage-bot", "PATCH", "/repos/o/r/issues/5", True),
    ("triage-bot", "GET", "/repos/o/r/issues/5", False),
    (None, "GET", "/meta", True),
    (None, "GET", "/repos/o/r", False),
    ("someone", "HEAD", "/meta", False),
]


def _call(agent: str | None, method: str, target: str) -> Call:
    return Call(service="gh", method=method, target=target, body=None, agent=agent)


def _decisions(step: Allow) -> list[bool]:
    return [step.allows(_call(agent, method, target)) for agent, method, target, _ in CALLS]


# An encoded '/' is judged as part of one segment (escaped_slashes: keep); refused by
# default, which tests/steps/access/test_allow_readings.py covers.
KEEP = {"escaped_slashes": "keep"}


def test_kept_decisions_are_the_rules_decisions(monkeypatch: pytest.MonkeyPatch) -> None:
    step = Allow(service="gh", rules=RULES, source="allow", **KEEP)
    expected = [allowed for *_, allowed in CALLS]
    assert _decisions(step) == expected
    assert _decisions(step) == expected  # from the kept decisions
    monkeypatch.setattr(allow, "DECISIONS", 3)  # full after three: cleared, decided again
    fresh = Allow(service="gh", rules=RULES, source="allow", **KEEP)
    assert _decisions(fresh) == expected
    assert _decisions(fresh) == expected


def test_rules_on_the_query_or_headers_are_decided_every_call() -> None:
    rules = [AllowRule(paths="/search", query={"per_page": "1*"})]
    step = Allow(service="gh", rules=rules, source="allow")
    assert step.allows(_call(None, "GET", "/search?per_page=10"))
    assert not step.allows(_call(None, "GET", "/search?per_page=5"))
    assert step.allows(_call(None, "GET", "/search?per_page=1"))
    headers = Allow(
        service="gh", rules=[AllowRule(headers={"Accept": "application/json"})], source="allow"
    )
    call = _call(None, "GET", "/x")
    call.headers["Accept"] = "text/html"
    assert not headers.allows(call)
    call = _call(None, "GET", "/x")
    call.headers["Accept"] = "application/json"
    assert headers.allows(call)


def test_a_method_override_is_part_of_the_kept_decision() -> None:
    # GET allowed and kept; the same GET overridden to DELETE (a service that takes
    # overrides) is judged as the DELETE the upstream will run, not from the kept GET.
    step = Allow(
        service="gh",
        rules=[AllowRule(methods="GET", paths="/repos/*/*")],
        source="allow",
        method_override=["DELETE"],
    )
    assert step.allows(_call("a", "GET", "/repos/o/r"))
    overridden = Call(
        service="gh",
        method="GET",
        target="/repos/o/r",
        body=None,
        agent="a",
        raw_headers=[(b"X-HTTP-Method-Override", b"DELETE")],
    )
    assert not step.allows(overridden)
    assert step.allows(_call("a", "GET", "/repos/o/r"))


def test_the_kept_decision_reads_the_method_and_path_as_the_rules_do() -> None:
    """A method in another case is judged uppercased, a bare '?' leaves the path as it
    is, and `_method` in the query is refused where no override is taken, kept or not."""
    step = Allow(service="gh", rules=RULES, source="allow", **KEEP)
    for _ in range(2):
        assert step.allows(_call("research-1", "get", "/repos/o/r"))
        assert step.allows(_call("research-1", "GET", "/repos/o/r?"))
        assert not step.allows(_call("research-1", "post", "/repos/o/r?"))
        with pytest.raises(ProblemError) as refused:
            step.allows(_call("research-1", "GET", "/repos/o/r?_method=DELETE"))
        assert refused.value.reason is Reason.bad_request
