"""The aws_sigv4 and objects keys as the loader reads them: errors at FILE:LINE:COL."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sidecar.policy.cloud import AwsSigV4Auth
from sidecar.policy.loader import PolicyError, load_policy


def write(directory: Path, auth: str) -> None:
    text = f"""
        version: 1
        services:
          s3:
            upstream: https://s3.us-east-1.amazonaws.com
            auth: {auth}
    """
    (directory / "p.yaml").write_text(textwrap.dedent(text).lstrip("\n"))


def errors(directory: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(str(directory), env={})
    return [str(p) for p in info.value.problems]


def test_a_profile_of_the_shared_credentials_file(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(
        "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = d\n"
        "[agents]\naws_access_key_id = AKIAAGENTS\naws_secret_access_key = s3cret\n"
        "aws_session_token = tok\n"
    )
    write(
        tmp_path,
        f"{{type: aws_sigv4, service: s3, region: eu-west-1, profile: agents, "
        f"credentials_file: {creds}}}",
    )
    auth = load_policy(str(tmp_path), env={}).services["s3"].spec.auth
    assert isinstance(auth, AwsSigV4Auth)
    assert auth.access_key_id is not None and auth.access_key_id.reveal() == "AKIAAGENTS"
    assert auth.session_token is not None and auth.session_token.reveal() == "tok"
    assert "s3cret" not in repr(auth) and "s3cret" not in auth.model_dump_json()
    assert not auth.signed_payload  # s3: UNSIGNED-PAYLOAD by default


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        ("{type: aws_sigv4, service: s3, region: us-east-1}", "aws_sigv4 needs credentials"),
        (
            "{type: aws_sigv4, service: S3, region: us-east-1, access_key_id: a, "
            "secret_access_key: b}",
            "p.yaml:5:29: expected a lower-case AWS name",
        ),
        (
            "{type: aws_sigv4, service: s3, region: us-east-1, profile: nope, "
            "credentials_file: /nonexistent/credentials}",
            "cannot read credentials file /nonexistent/credentials",
        ),
        (
            "{type: aws_sigv4, service: s3, region: us-east-1, access_key_id: a, "
            "secret_access_key: b, web_identity: {role_arn: 'arn:aws:iam::123456789012:role/r', "
            "token_file: /t}}",
            "web_identity and access keys (or profile) are exclusive",
        ),
        (
            "{type: aws_sigv4, service: s3, region: us-east-1, web_identity: "
            "{role_arn: 'role/r', token_file: /t}}",
            "role_arn must look like arn:aws:iam::123456789012:role/NAME",
        ),
        ("{type: gcp, credentials: not-json}", "credentials is not JSON"),
        (
            """{type: gcp, credentials: '{"type": "authorized_user"}'}""",
            "credentials must be a file of type service_account or external_account",
        ),
        (
            """{type: gcp, credentials: '{"type": "service_account"}'}""",
            "the service-account key lacks client_email, private_key, token_uri",
        ),
        (
            "{type: azure, scope: x, workload_identity: {}}",
            "workload_identity.tenant_id is not set, nor is $AZURE_TENANT_ID",
        ),
        (
            "{type: azure, scope: x, managed_identity: {}, workload_identity: {tenant_id: t, "
            "client_id: c, token_file: /t}}",
            "managed_identity and workload_identity are exclusive",
        ),
    ],
)
def test_refused_with_position(tmp_path: Path, auth: str, message: str) -> None:
    write(tmp_path, auth)
    found = errors(tmp_path)
    assert any(message in e for e in found), found
    assert all(e.startswith(str(tmp_path / "p.yaml")) for e in found), found


WEB_IDENTITY = (
    "{{type: aws_sigv4, service: s3, region: us-east-1, web_identity: "
    "{{role_arn: 'arn:aws:iam::123456789012:role/r', token_file: /t, session_name: '{name}'}}}}"
)


def test_a_session_name_of_every_character_sts_takes(tmp_path: Path) -> None:
    write(tmp_path, WEB_IDENTITY.format(name="ci_Bot-7.run@team=a,b+c"))
    auth = load_policy(str(tmp_path), env={}).services["s3"].spec.auth
    assert isinstance(auth, AwsSigV4Auth) and auth.web_identity is not None
    assert auth.web_identity.session_name == "ci_Bot-7.run@team=a,b+c"


# STS refuses these (2 to 64 of ASCII letters, digits and _+=,.@-): refused at load.
@pytest.mark.parametrize("name", ["a", "x" * 65, "agent sidecar", "agent/sidecar", "agént"])
def test_a_session_name_sts_would_refuse(tmp_path: Path, name: str) -> None:
    write(tmp_path, WEB_IDENTITY.format(name=name))
    found = errors(tmp_path)
    assert any("p.yaml:5:" in e and "session_name" in e for e in found), found
