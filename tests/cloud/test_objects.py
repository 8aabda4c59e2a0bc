"""Object-store rules: boto3 agents through the sidecar to moto's S3 (signatures checked).

Each refusal is the sidecar's own 403 `forbidden`, naming the rule; what was
allowed reached moto, signed by the sidecar.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import botocore.exceptions
import pytest
from boto3.s3.transfer import TransferConfig

from tests.cloud.moto_aws import Moto, agent_client
from tests.conftest import RunningSidecar, StartSidecar, echo_app

RULES = """
            objects:
              rules:
                - buckets: [shared]
                  keys: ["agents/{agent}/**"]
                  actions: [read, write, list, delete]
                - {buckets: [shared], keys: ["public/**"], actions: [read, list]}
                - {agents: [admin], actions: [admin, list, read, write, delete]}
              max_object_size: 12MiB
              content_types: [text/*, application/json, binary/octet-stream]
"""


async def start(start_sidecar: StartSidecar, moto: Moto) -> RunningSidecar:
    auth = """
            auth:
              type: aws_sigv4
              service: s3
              region: us-east-1
              access_key_id: ${env:AWS_KEY}
              secret_access_key: ${env:AWS_SECRET}"""
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          s3:
            upstream: {moto.url}{auth}{RULES}
          s3ro:
            upstream: {moto.url}{auth}
            objects: {{read_only: true, rules: [{{actions: [read, list, write, delete]}}]}}
        """,
        env={"AWS_KEY": moto.key_id, "AWS_SECRET": moto.secret},
    )
    moto.enforce()
    admin = agent_client("s3", f"{sidecar.url}/s3", agent="admin")
    await asyncio.to_thread(_fresh_bucket, admin)
    return sidecar


def _fresh_bucket(admin: Any) -> None:
    try:
        admin.create_bucket(Bucket="shared")
    except admin.exceptions.BucketAlreadyOwnedByYou:
        for item in admin.list_objects_v2(Bucket="shared").get("Contents", []):
            admin.delete_object(Bucket="shared", Key=item["Key"])
    admin.put_object(Bucket="shared", Key="public/readme.txt", Body=b"hi", ContentType="text/plain")
    admin.put_object(
        Bucket="shared", Key="agents/bob/secret.txt", Body=b"bob's", ContentType="text/plain"
    )


def refused(call: Callable[[], object]) -> tuple[str, str]:
    """(X-Sidecar-Error, the problem's rule) of a call the sidecar refused."""
    with pytest.raises(botocore.exceptions.ClientError) as err:
        call()
    meta = err.value.response["ResponseMetadata"]
    assert meta["HTTPStatusCode"] == 403
    return meta["HTTPHeaders"].get("x-sidecar-error", ""), meta["HTTPHeaders"].get(
        "content-type", ""
    )


async def test_each_agent_has_its_own_prefix(start_sidecar: StartSidecar, moto: Moto) -> None:
    sidecar = await start(start_sidecar, moto)
    alice = agent_client("s3", f"{sidecar.url}/s3", agent="alice")

    def scenario() -> None:
        alice.put_object(
            Bucket="shared", Key="agents/alice/a.txt", Body=b"a", ContentType="text/plain"
        )
        assert alice.get_object(Bucket="shared", Key="agents/alice/a.txt")["Body"].read() == b"a"
        mine = alice.list_objects_v2(Bucket="shared", Prefix="agents/alice/")
        assert [o["Key"] for o in mine["Contents"]] == ["agents/alice/a.txt"]
        assert alice.get_object(Bucket="shared", Key="public/readme.txt")["Body"].read() == b"hi"
        # Another agent's key, a listing wider than one's prefix, a public write:
        for call in (
            lambda: alice.get_object(Bucket="shared", Key="agents/bob/secret.txt"),
            lambda: alice.list_objects_v2(Bucket="shared", Prefix="agents/"),
            lambda: alice.list_objects_v2(Bucket="shared"),
            lambda: alice.put_object(Bucket="shared", Key="public/x.txt", Body=b"x"),
            lambda: alice.delete_object(Bucket="shared", Key="agents/bob/secret.txt"),
            lambda: alice.create_bucket(Bucket="alices-own"),
            lambda: alice.list_buckets(),
        ):
            assert refused(call) == ("forbidden", "application/problem+json")
        alice.delete_object(Bucket="shared", Key="agents/alice/a.txt")

    await asyncio.to_thread(scenario)


async def test_the_refusal_names_the_rule(start_sidecar: StartSidecar, moto: Moto) -> None:
    sidecar = await start(start_sidecar, moto)
    async with aiohttp.ClientSession(headers={"X-Agent-Id": "alice"}) as http:
        async with http.get(f"{sidecar.url}/s3/shared/agents/bob/secret.txt") as resp:
            problem = json.loads(await resp.read())
        assert resp.status == 403
        assert problem["reason"] == "forbidden" and problem["rule"] == "objects.rules"
        assert "no rule lets agent 'alice' read key 'agents/bob/secret.txt'" in problem["detail"]
        # No agent: `{agent}` rules match nobody.
        async with (
            aiohttp.ClientSession() as anonymous,
            anonymous.get(f"{sidecar.url}/s3/shared/agents//x") as resp,
        ):
            assert resp.status == 403
        async with http.get(f"{sidecar.url}/s3/shared/agents/alice/%2E%2E/bob/secret.txt") as resp:
            problem = json.loads(await resp.read())
        # Encoded dot segments do not climb out of one's prefix.
        assert resp.status == 403 and problem["rule"] == "objects.rules"
        assert "key 'agents/bob/secret.txt'" in problem["detail"]


async def test_copy_and_multi_delete_are_checked_key_by_key(
    start_sidecar: StartSidecar, moto: Moto
) -> None:
    sidecar = await start(start_sidecar, moto)
    alice = agent_client("s3", f"{sidecar.url}/s3", agent="alice")

    def scenario() -> None:
        source = {"Bucket": "shared", "Key": "agents/bob/secret.txt"}
        assert (
            refused(
                lambda: alice.copy_object(
                    Bucket="shared", Key="agents/alice/stolen.txt", CopySource=source
                )
            )[0]
            == "forbidden"
        )
        alice.put_object(
            Bucket="shared", Key="agents/alice/1.txt", Body=b"1", ContentType="text/plain"
        )
        both = {"Objects": [{"Key": "agents/alice/1.txt"}, {"Key": "agents/bob/secret.txt"}]}
        assert refused(lambda: alice.delete_objects(Bucket="shared", Delete=both))[0] == "forbidden"
        mine = {"Objects": [{"Key": "agents/alice/1.txt"}]}
        assert (
            alice.delete_objects(Bucket="shared", Delete=mine)["Deleted"][0]["Key"]
            == "agents/alice/1.txt"
        )

    await asyncio.to_thread(scenario)
    admin = agent_client("s3", f"{sidecar.url}/s3", agent="admin")

    def bobs() -> bytes:
        # Read in the thread: the sidecar relaying the body runs on this event loop.
        data: bytes = admin.get_object(Bucket="shared", Key="agents/bob/secret.txt")["Body"].read()
        return data

    assert await asyncio.to_thread(bobs) == b"bob's"


async def test_size_content_type_and_read_only(start_sidecar: StartSidecar, moto: Moto) -> None:
    sidecar = await start(start_sidecar, moto)
    alice = agent_client("s3", f"{sidecar.url}/s3", agent="alice")
    ro = agent_client("s3", f"{sidecar.url}/s3ro", agent="alice")
    config = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    part = b"p" * (5 << 20)

    def scenario() -> None:
        # 10 MiB in two parts: under max_object_size (12 MiB).
        alice.upload_fileobj(io.BytesIO(part * 2), "shared", "agents/alice/ok.bin", Config=config)
        assert (
            alice.head_object(Bucket="shared", Key="agents/alice/ok.bin")["ContentLength"]
            == 10 << 20
        )
        # 15 MiB: the third part takes the upload over; refused, whatever each part's size.
        with pytest.raises(botocore.exceptions.ClientError) as err:
            alice.upload_fileobj(
                io.BytesIO(part * 3), "shared", "agents/alice/big.bin", Config=config
            )
        assert (
            err.value.response["ResponseMetadata"]["HTTPHeaders"]["x-sidecar-error"] == "forbidden"
        )
        assert (
            refused(
                lambda: alice.put_object(
                    Bucket="shared", Key="agents/alice/big1.bin", Body=b"x" * (13 << 20)
                )
            )[0]
            == "forbidden"
        )
        assert (
            refused(
                lambda: alice.put_object(
                    Bucket="shared",
                    Key="agents/alice/run.sh",
                    Body=b"#!",
                    ContentType="application/x-sh",
                )
            )[0]
            == "forbidden"
        )
        assert ro.get_object(Bucket="shared", Key="public/readme.txt")["Body"].read() == b"hi"
        assert (
            refused(lambda: ro.put_object(Bucket="shared", Key="public/w.txt", Body=b"w"))[0]
            == "forbidden"
        )

    await asyncio.to_thread(scenario)


@pytest.mark.parametrize("version", ["s3", "s3v4"])
async def test_presigned_urls_are_refused(
    start_sidecar: StartSidecar, moto: Moto, version: str
) -> None:
    sidecar = await start(start_sidecar, moto)
    alice = agent_client("s3", f"{sidecar.url}/s3", agent="alice", signature_version=version)
    url = alice.generate_presigned_url(
        "get_object", Params={"Bucket": "shared", "Key": "public/readme.txt"}
    )
    async with (
        aiohttp.ClientSession(headers={"X-Agent-Id": "alice"}) as http,
        http.get(url) as resp,
    ):
        problem = json.loads(await resp.read())
    assert resp.status == 403
    assert problem["rule"] == "objects" and "presigned" in problem["detail"]


async def test_virtual_hosted_addressing(start_sidecar: StartSidecar, upstream: Any) -> None:
    # The upstream's host names the bucket (here `localhost`, which resolves); the whole
    # path is the key. The echo upstream shows what passed, signed for that host.
    base = (await upstream(echo_app())).replace("127.0.0.1", "localhost")
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          docs:
            upstream: {base}
            auth: {{type: aws_sigv4, service: s3, region: us-east-1, access_key_id: AKIAX,
                    secret_access_key: s}}
            objects:
              addressing: virtual
              rules: [{{buckets: [localhost], keys: ["agents/{{agent}}/**"],
                        actions: [read, list]}}]
        """
    )
    async with aiohttp.ClientSession(headers={"X-Agent-Id": "alice"}) as http:
        async with http.get(f"{sidecar.url}/docs/agents/alice/a.txt") as resp:
            echoed = await resp.json()
        assert resp.status == 200 and echoed["path"] == "/agents/alice/a.txt"
        assert echoed["headers"]["Host"].startswith("localhost:")
        assert echoed["headers"]["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIAX/")
        async with http.get(f"{sidecar.url}/docs/?list-type=2&prefix=agents/alice/") as resp:
            assert resp.status == 200
        for path in ("/docs/agents/bob/a.txt", "/docs/?list-type=2&prefix=agents/"):
            async with http.get(f"{sidecar.url}{path}") as resp:
                problem = json.loads(await resp.read())
            assert resp.status == 403 and problem["rule"] == "objects.rules"
            assert "bucket 'localhost'" in problem["detail"]
