"""`agents:` identity and `allow:` rules in policy files: what loads, and each mistake
reported at its FILE:LINE:COL by `sidecar validate`."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.cli import main as cli_main
from sidecar.core.call import Call
from sidecar.core.problems import ProblemError
from sidecar.policy.access import AllowRule, path_regex
from sidecar.policy.loader import load_policy
from sidecar.steps.access.allow import Allow
from tests.policy.test_loader import errors, write

HASH = "sha256:" + hashlib.sha256(b"k").hexdigest()


def test_rules_and_identity_load(tmp_path: Path) -> None:
    write(
        tmp_path,
        "agents.yaml",
        f"""
        version: 1
        agents:
          keys: {{research-1: "{HASH}", triage-bot: "sha256:{"0" * 64}"}}
        allow:
          - agents: [research-*]
        """,
    )
    write(
        tmp_path,
        "services.yaml",
        """
        version: 1
        services:
          own: {upstream: "http://a", allow: [{methods: get, paths: /x/**}]}
          default: {upstream: "http://b"}
          everyone: {upstream: "http://c", allow: []}
        """,
    )
    policy = load_policy(str(tmp_path))
    own, default, everyone = (policy.services[n] for n in ("own", "default", "everyone"))
    assert own.allow_from == "services.own.allow"
    assert own.allow[0].methods == ["GET"]
    assert default.allow_from == "allow"
    assert default.allow[0].agents == ["research-*"]
    assert everyone.allow == () and everyone.allow_from == ""
    assert own.agents.keys["research-1"] == HASH


def test_bad_globs_and_unknown_agents_are_reported_at_their_place(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "p.yaml",
        f"""
        version: 1
        agents:
          keys:
            research-1: "{HASH}"
            triage-bot: not-a-hash
        allow:
          - agents: [reserch-1, admin, nobody-*, research-*]
        services:
          api:
            upstream: http://a
            allow:
              - paths: [repos/*, /a/**b, "/a/?x", /a/../b]
                methods: [GETT, FETCH]
              - agents: ["bad name"]
                query: {{page: [1]}}
        """,
    )
    assert errors(tmp_path) == [
        f"{f}:5:17: an agent key is stored as sha256:<64 lowercase hex digits> "
        '(printf %s "$KEY" | sha256sum), never as the key itself',
        f"{f}:12:17: path glob 'repos/*' must start with '/' (the path after the prefix)",
        f"{f}:12:26: path glob '/a/**b': '**' must be a whole segment, like /a/**/b",
        f"{f}:12:34: path glob '/a/?x' must not hold '?' or '#' (use `query:`)",
        f"{f}:12:43: path glob '/a/../b' must not hold '.' or '..' segments",
        f"{f}:13:19: unknown method 'GETT' (did you mean 'GET'?)",
        f"{f}:13:25: unknown method 'FETCH' (did you mean 'PATCH'?)",
        f"{f}:14:18: agent 'bad name': names hold letters, digits, _ . @ : - (and * as a wildcard)",
        f"{f}:15:23: expected a string glob",
    ]


def test_unknown_agents_are_reported_when_agents_keys_lists_them(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "p.yaml",
        f"""
        version: 1
        agents:
          keys: {{research-1: "{HASH}"}}
        allow:
          - agents: [reserch-1, admin, nobody-*, research-*]
        services:
          api:
            upstream: http://a
            allow: [{{agents: [research-1, triage-bot]}}]
        """,
    )
    assert errors(tmp_path) == [
        f"{f}:5:14: unknown agent 'reserch-1' (did you mean 'research-1'?)",
        f"{f}:5:25: unknown agent 'admin'; agents.keys has: research-1",
        f"{f}:5:32: agent glob 'nobody-*' matches no agent in agents.keys",
        f"{f}:9:35: unknown agent 'triage-bot'; agents.keys has: research-1",
    ]


def test_with_jwts_any_agent_name_may_be_a_subject(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        f"""
        version: 1
        agents:
          keys: {{research-1: "{HASH}"}}
          verify: {{type: jwt, jwks: "https://idp.example/jwks", issuer: i, audience: a}}
        allow: [{{agents: [anyone-the-issuer-signs-for]}}]
        """,
    )
    load_policy(str(tmp_path))


def test_identity_mistakes(tmp_path: Path) -> None:
    keyset = tmp_path / "keys" / "jwks.json"
    keyset.parent.mkdir()
    keyset.write_text('{"not": "a key set"}')
    f = write(
        tmp_path,
        "p.yaml",
        f"""
        version: 1
        agents:
          header: X-Agent-Id
          credential_header: x-agent-id
          keys: {{a: "{HASH}", b: "{HASH}"}}
          verify:
            type: jwt
            jwks: http://idp.example/jwks.json
            issuer: https://idp.example
            audience: []
            algorithms: [HS256, none]
        """,
    )
    write(
        tmp_path,
        "q.yaml",
        f"""
        version: 1
        agents:
          verify: {{type: jwt, jwks: "${{file:{keyset}}}", issuer: i, audience: a}}
        """,
    )
    assert errors(tmp_path) == [
        f"{f}:4:22: credential_header must differ from header (the self-declared name)",
        f"{f}:5:9: agents 'a' and 'b' have the same key",
        f"{f}:8:11: jwks must be fetched over https:// (http:// only on loopback)",
        f"{f}:10:15: List should have at least 1 item after validation, not 0",
        f"{f}:11:18: Input should be 'RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', "
        "'ES256', 'ES384', 'ES512' or 'EdDSA'",
        f"{f}:11:25: Input should be 'RS256', 'RS384', 'RS512', 'PS256', 'PS384', 'PS512', "
        "'ES256', 'ES384', 'ES512' or 'EdDSA'",
        f'{tmp_path}/q.yaml:3:29: a JWKS is a JSON object {{"keys": [...]}}',
    ]


def test_a_service_that_drops_the_credential_header_is_an_error(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        "p.yaml",
        f"""
        version: 1
        agents:
          credential_header: Authorization
          keys: {{a: "{HASH}"}}
        services:
          fine: {{upstream: "http://a", auth: {{type: query, name: k, value: v}}}}
          bearer: {{upstream: "http://a", auth: {{type: bearer, token: t}}}}
          removes: {{upstream: "http://a", headers: {{remove: [authorization]}}}}
        """,
    )
    assert errors(tmp_path) == [
        f"{f}:7:3: service 'bearer' replaces or removes Authorization, the header agents prove "
        "who they are with (agents.credential_header); choose another credential_header",
        f"{f}:8:3: service 'removes' replaces or removes Authorization, the header agents "
        "prove who they are with (agents.credential_header); choose another credential_header",
    ]


def test_top_level_allow_twice_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\nallow: [{methods: [GET]}]\n")
    b = write(tmp_path, "b.yaml", "version: 1\nallow: []\n")
    assert errors(tmp_path) == [f"{b}:2:1: 'allow' is already set in {tmp_path}/a.yaml:2:1"]


def test_validate_prints_the_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, "p.yaml", "version: 1\nallow: [{paths: [x]}]\n")
    assert cli_main(["validate", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"{f}:2:18: path glob 'x' must start with '/' (the path after the prefix)\n"
    )


def test_schema_lists_the_new_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert set(schema["$defs"]["AllowRule"]["properties"]) == {
        "agents",
        "methods",
        "paths",
        "query",
        "headers",
        "operations",
    }
    assert "verify" in schema["$defs"]["Agents"]["properties"]


def test_a_dot_segment_never_matches_even_past_the_listener() -> None:
    """The step does not rely on the listener refusing dot segments."""
    allow = Allow(service="s", rules=[AllowRule(paths=["/repos/**"])], source="allow")

    def allowed(target: str) -> bool:
        call = Call(
            service="s", method="GET", target=target, headers=CIMultiDict(), body=None, agent=None
        )
        try:
            return allow.allows(call)
        except ProblemError as err:  # an encoded separator: refused with 400
            assert err.reason == "bad_request"
            return False

    assert allowed("/repos/a/b")
    for sneaky in ("/repos/..", "/repos/%2e%2e/admin", "/repos/a%2F..%2F..%2Fadmin", "/repos/.;x/"):
        assert not allowed(sneaky), sneaky


def _reference(pattern: list[str], path: list[str]) -> bool:
    """Glob matching segment by segment, written the slow obvious way."""
    if not pattern:
        return not path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_reference(rest, path[i:]) for i in range(len(path) + 1))
    if not path:
        return False
    segment = path[0]
    if head == "*":
        ok = segment != ""
    else:
        ok = re.fullmatch(".*".join(map(re.escape, head.split("*"))), segment) is not None
    return ok and _reference(rest, path[1:])


@given(
    pattern=st.lists(st.sampled_from(["a", "b", "*", "a*", "*b", "**"]), min_size=1, max_size=5),
    path=st.lists(st.sampled_from(["", "a", "b", "ab", "ba"]), min_size=1, max_size=6),
)
def test_path_globs_match_segment_by_segment(pattern: list[str], path: list[str]) -> None:
    regex = re.compile(path_regex("/" + "/".join(pattern)))
    assert (regex.fullmatch("/" + "/".join(path)) is not None) == _reference(pattern, path)


@given(target=st.text(alphabet="/%2eEfF.\\;?=&ab", max_size=30))
def test_any_target_gets_an_answer(target: str) -> None:
    allow = Allow(
        service="s",
        rules=[AllowRule(paths=["/a/**"], query={"q": "a*"})],
        source="allow",
    )
    call = Call(
        service="s",
        method="GET",
        target="/" + target,
        headers=CIMultiDict(),
        body=None,
        agent=None,
    )
    try:
        assert allow.allows(call) in (True, False)
    except ProblemError as err:  # read two ways (encoded separators, repeated keys): 400
        assert err.reason == "bad_request"
