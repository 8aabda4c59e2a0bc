"""The aws_sigv4 step on one call: what it removes, what it signs (checked by botocore)."""

from __future__ import annotations

from typing import Any

import pytest
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from multidict import CIMultiDict

from sidecar.core.call import Call
from sidecar.core.problems import ProblemError
from sidecar.policy.cloud import AwsSigV4Auth
from sidecar.steps.credentials.aws import AwsCredentials, Signer

KEY, SECRET, TOKEN = "AKIASIDECAR000000001", "sidecar-secret", "sidecar-session"
AGENT = [
    (b"Authorization", b"AWS4-HMAC-SHA256 Credential=AKIAAGENT/..."),
    (b"X-Amz-Date", b"20200101T000000Z"),
    (b"X-Amz-Security-Token", b"agent-token"),
    (b"X-Amz-Content-Sha256", b"UNSIGNED-PAYLOAD"),
    (b"X-Amz-Meta-Owner", b"  alice   smith "),
    (b"Content-Type", b"text/plain"),
    (b"User-Agent", b"boto3"),
]


def signed_call(raw: bool, token: str | None, service: str = "s3") -> Call:
    spec = AwsSigV4Auth(
        type="aws_sigv4",
        service=service,
        region="eu-west-1",
        access_key_id=KEY,
        secret_access_key=SECRET,
    )
    signer = Signer(service="svc", spec=spec, upstream="https://bucket.example.com:8443/base")
    if raw:
        call = Call(
            service="svc",
            method="PUT",
            target="/a%20b/c.txt?X-Amz-Signature=x&tagging",
            raw_headers=list(AGENT),
            body=None,
            agent=None,
        )
    else:
        headers = CIMultiDict((k.decode(), v.decode()) for k, v in AGENT)
        call = Call(
            service="svc",
            method="PUT",
            target="/a%20b/c.txt?X-Amz-Signature=x&tagging",
            headers=headers,
            body=None,
            agent=None,
        )
    signer.sign(call, AwsCredentials(KEY, SECRET, token), None if service == "s3" else "e3b0")
    return call


def botocore_signature(call: Call, token: str | None, service: str) -> tuple[str, str]:
    auth_header = call.headers["Authorization"]
    names = auth_header.partition("SignedHeaders=")[2].partition(",")[0].split(";")
    headers = {k: v for k, v in call.headers.items() if k.lower() in names}
    headers["Host"] = "bucket.example.com:8443"
    request = AWSRequest(
        method=call.method,
        url=f"https://bucket.example.com:8443/base{call.target}",
        headers=headers,
    )
    request.context["timestamp"] = call.headers["X-Amz-Date"]
    kind: Any = S3SigV4Auth if service == "s3" else SigV4Auth
    auth = kind(Credentials(KEY, SECRET, token), service, "eu-west-1")
    expected = auth.signature(
        auth.string_to_sign(request, auth.canonical_request(request)), request
    )
    return auth_header.rpartition("Signature=")[2], expected


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("token", [None, TOKEN])
def test_the_agents_signature_goes_and_botocore_accepts_ours(raw: bool, token: str | None) -> None:
    call = signed_call(raw, token)
    headers = call.headers
    assert headers["Authorization"].startswith(f"AWS4-HMAC-SHA256 Credential={KEY}/")
    assert (
        "SignedHeaders=content-type;host;x-amz-content-sha256;x-amz-date;x-amz-meta-owner"
        in (headers["Authorization"])
    )
    assert headers.getall("X-Amz-Date") != ["20200101T000000Z"]
    assert headers.getall("X-Amz-Security-Token", []) == ([token] if token else [])
    assert headers["X-Amz-Content-Sha256"] == "UNSIGNED-PAYLOAD"
    assert call.target == "/a%20b/c.txt?tagging"  # the presigned query is gone
    got, expected = botocore_signature(call, token, "s3")
    assert got == expected


def test_another_service_signs_the_hash_it_is_given() -> None:
    call = signed_call(True, None, service="bedrock")
    assert call.headers["X-Amz-Content-Sha256"] == "e3b0"
    got, expected = botocore_signature(call, None, "bedrock")
    assert got == expected


def test_a_chunk_signed_upload_is_refused() -> None:
    spec = AwsSigV4Auth(
        type="aws_sigv4",
        service="s3",
        region="us-east-1",
        access_key_id=KEY,
        secret_access_key=SECRET,
    )
    signer = Signer(service="svc", spec=spec, upstream="http://127.0.0.1:9000")
    call = Call(
        service="svc",
        method="PUT",
        target="/b/k",
        body=None,
        agent=None,
        raw_headers=[(b"X-Amz-Content-Sha256", b"STREAMING-AWS4-HMAC-SHA256-PAYLOAD")],
    )
    with pytest.raises(ProblemError) as err:
        signer.sign(call, AwsCredentials(KEY, SECRET, None), None)
    assert err.value.reason == "bad_request"
