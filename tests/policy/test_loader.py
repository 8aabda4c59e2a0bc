"""Policy files in, a Policy or FILE:LINE:COL errors out."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sidecar.policy.loader import PolicyError, load_policy
from sidecar.policy.units import parse_duration, parse_rate, parse_size


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def errors(directory: Path, **kw: object) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(str(directory), **kw)  # type: ignore[arg-type]
    return [str(p) for p in info.value.problems]


def test_units() -> None:
    assert parse_duration("250ms") == 0.25
    assert parse_duration("2m") == 120
    assert parse_rate("600/min").per_second == 10
    assert parse_rate("5/10s").per_second == 0.5
    assert parse_size("10MiB") == 10 * 1024 * 1024
    for bad in ("5", "5 parsecs", 5):
        with pytest.raises(ValueError):
            parse_duration(bad)
    with pytest.raises(ValueError):
        parse_rate("10 per second")
    # The spellings other tools use are accepted (docs/policy.md lists them).
    for spelling in ("10/s", "10/sec", "10/second", "600/min", "600/minute", "36000/hour"):
        assert parse_rate(spelling).per_second == 10


def test_merges_files_and_defaults(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\nagents: {header: X-Who}\n")
    write(
        tmp_path,
        "b.yml",
        """
        version: 1
        services:
          openai:
            upstream: https://api.openai.com/v1/
            auth: {type: bearer, token: "${env:KEY}"}
            rate_limit: {rate: 10/s}
        """,
    )
    write(tmp_path, "notes.txt", "not a policy")
    write(tmp_path, ".hidden.yaml", "garbage: [")
    policy = load_policy(str(tmp_path), env={"KEY": "sk-1"})
    assert policy.agents.header == "X-Who"
    svc = policy.services["openai"]
    assert svc.prefix == "/openai"
    assert svc.spec.upstream == "https://api.openai.com/v1"
    assert svc.spec.timeout.total == 300
    assert svc.spec.rate_limit[0].rate.per_second == 10
    assert svc.spec.auth is not None
    assert svc.spec.auth.token.reveal() == "sk-1"  # type: ignore[union-attr]
    assert "sk-1" not in repr(policy)


def test_unknown_key_points_at_key_with_hint(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          github:
            upstream: https://api.github.com
            rate_limt:
              - {rate: 10/s}
        """,
    )
    assert errors(tmp_path) == [
        f"{tmp_path}/p.yaml:5:5: unknown key 'rate_limt' (did you mean 'rate_limit'?)"
    ]


def test_value_errors_point_at_values(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          a:
            upstream: ftp://x
          b:
            upstream: http://x
            timeout: {connect: 2s, total: 3 days}
            retry: {attempts: 3, on: [timeout, connect-eror]}
            circuit_breaker: {on: [404]}
          c:
            upstream: http://x
            auth: {type: beerer, token: x}
          d:
            upstream: http://x
            auth: {type: header, value: x}
        """,
    )
    f = f"{tmp_path}/p.yaml"
    assert errors(tmp_path) == [
        f"{f}:4:15: upstream must start with http:// or https://",
        f"{f}:7:35: '3 days' is not a duration; write it like '250ms', '5s', '2m' or '1h'",
        f"{f}:8:40: unknown condition 'connect-eror' (did you mean 'connect-error'?)",
        f"{f}:9:28: status 404 is not allowed here; use 500..599",
        f"{f}:12:18: unknown auth type 'beerer' (did you mean 'bearer'?)",
        f"{f}:15:5: 'name' is required",
    ]


def test_unknown_keys_are_reported_with_the_other_errors(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          x:
            upstream: ftp://x
            timout: {total: 1s}
            rate_limit: {rate: 10/sec, brust: 3}
            auth: {type: header, name: X-Key, value: v, nme: a}
        extra: 1
        """,
    )
    f = f"{tmp_path}/p.yaml"
    assert errors(tmp_path) == [
        f"{f}:4:15: upstream must start with http:// or https://",
        f"{f}:5:5: unknown key 'timout' (did you mean 'timeout'?)",
        f"{f}:6:32: unknown key 'brust' (did you mean 'burst'?)",
        f"{f}:7:49: unknown key 'nme' (did you mean 'name'?)",
        f"{f}:8:1: unknown key 'extra'; expected one of: admin, agents, alerts, allow, "
        "databases, services, version, webhooks",
    ]


def test_control_characters_are_refused_at_their_place(tmp_path: Path) -> None:
    for text, at, code in [
        ("version: 1\n\0", "2:1", "0000"),
        ("version: 1\nservices: {}  # \x07\n", "2:17", "0007"),
        ("version: 1\x85x: \x7f", "2:4", "007F"),  # NEL breaks a line, as in yaml's marks
    ]:
        (tmp_path / "p.yaml").write_text(text, newline="")
        assert errors(tmp_path) == [
            f"{tmp_path}/p.yaml:{at}: invalid YAML: character U+{code} is not allowed"
        ]


def test_upstream_userinfo_and_recursive_alias_refused(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", "version: 1\nservices:\n  a: {upstream: 'http://u:pw@x'}\n")
    assert errors(tmp_path) == [
        f"{tmp_path}/p.yaml:3:17: upstream must not hold user:password; use auth: {{type: basic}}"
    ]
    write(tmp_path, "p.yaml", "version: 1\nx: &a [*a]\n")
    assert errors(tmp_path) == [
        f"{tmp_path}/p.yaml:1:1: invalid YAML: recursive alias or nesting too deep"
    ]


def test_yaml_syntax_error_has_position(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", "version: 1\nservices:\n  a: [unclosed\n")
    [err] = errors(tmp_path)
    assert err.startswith(f"{tmp_path}/p.yaml:4:1: invalid YAML")


def test_duplicate_key_in_one_file(tmp_path: Path) -> None:
    write(tmp_path, "p.yaml", "version: 1\nversion: 1\n")
    assert errors(tmp_path) == [f"{tmp_path}/p.yaml:2:1: duplicate key 'version'"]


def test_duplicate_service_and_prefix_across_files(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "version: 1\nservices:\n  gh: {upstream: http://a}\n")
    write(
        tmp_path,
        "b.yaml",
        """
        version: 1
        services:
          gh: {upstream: http://b}
          other: {upstream: http://c, prefix: /gh}
        """,
    )
    assert errors(tmp_path) == [
        f"{tmp_path}/b.yaml:3:3: service 'gh' is already defined in {tmp_path}/a.yaml:3:3",
        f"{tmp_path}/b.yaml:4:39: prefix '/gh' of service 'other' is already used by service "
        f"'gh' ({tmp_path}/a.yaml:3:3)",
    ]


def test_missing_version_and_empty_dir(tmp_path: Path) -> None:
    assert errors(tmp_path) == [f"{tmp_path}:1:1: no *.yaml or *.yml policy files found"]
    write(tmp_path, "p.yaml", "services: {}\n")
    assert errors(tmp_path) == [f"{tmp_path}/p.yaml:1:1: 'version' is required"]
    write(tmp_path, "p.yaml", "version: 2\n")
    assert errors(tmp_path) == [f"{tmp_path}/p.yaml:1:10: Input should be 1"]


def test_secret_references(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("from-file\n")
    write(
        tmp_path,
        "p.yaml",
        f"""
        version: 1
        services:
          a:
            upstream: http://a
            auth: {{type: header, name: X-Key, value: "${{file:{token}}}"}}
          b:
            upstream: http://b
            auth: {{type: basic, username: "${{env:USER_B}}", password: "${{env:MISSING}}"}}
        """,
    )
    f = f"{tmp_path}/p.yaml"
    assert errors(tmp_path, env={"USER_B": "u"}) == [
        f"{f}:8:52: environment variable MISSING is not set"
    ]
    # CI has no production secrets: validation checks the references' form only.
    policy = load_policy(str(tmp_path), env={}, resolve_secrets=False)
    assert set(policy.services) == {"a", "b"}
    policy = load_policy(str(tmp_path), env={"USER_B": "u", "MISSING": "p"})
    auth = policy.services["a"].spec.auth
    assert auth is not None and auth.value.reveal() == "from-file"  # type: ignore[union-attr]
    assert policy.secret_files == frozenset({str(token)})


def test_yaml_11_booleans_do_not_eat_keys(tmp_path: Path) -> None:
    # `on:` is True in YAML 1.1; the retry key must still be read as "on".
    write(
        tmp_path,
        "p.yaml",
        "version: 1\nservices:\n  a:\n    upstream: http://a\n    retry: {on: [timeout]}\n",
    )
    policy = load_policy(str(tmp_path))
    assert policy.services["a"].spec.retry is not None
    assert policy.services["a"].spec.retry.on == ["timeout"]


def test_example_policies_are_valid() -> None:
    root = Path(__file__).resolve().parents[2] / "policies"
    policy = load_policy(str(root), resolve_secrets=False)
    assert {"openai", "github"} <= set(policy.services)
    env = {"OPENAI_API_KEY": "sk-x", "GITHUB_TOKEN": "ghp-x"}
    assert load_policy(str(root), env=env).services["github"].prefix == "/github"
