"""boto3 through the sidecar to moto's S3, which checks every signature.

The agent's client holds a key moto does not know; the sidecar removes the
agent's signature and signs with the policy's keys.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os

import aiohttp
import botocore.exceptions
import pytest

from tests.cloud.moto_aws import Moto, agent_client
from tests.conftest import RunningSidecar, StartSidecar


def s3_policy(moto: Moto, extra: str = "") -> str:
    return f"""
        version: 1
        services:
          s3:
            upstream: {moto.url}
            auth:
              type: aws_sigv4
              service: s3
              region: us-east-1
              access_key_id: ${{env:AWS_KEY}}
              secret_access_key: ${{env:AWS_SECRET}}
        {extra}
    """


async def start(start_sidecar: StartSidecar, moto: Moto) -> RunningSidecar:
    env = {"AWS_KEY": moto.key_id, "AWS_SECRET": moto.secret}
    sidecar = await start_sidecar(s3_policy(moto), env=env)
    moto.enforce()
    return sidecar


async def test_put_get_list_delete_through_the_sidecar(
    start_sidecar: StartSidecar, moto: Moto
) -> None:
    sidecar = await start(start_sidecar, moto)
    s3 = agent_client("s3", f"{sidecar.url}/s3")

    def scenario() -> None:
        s3.create_bucket(Bucket="docs")
        s3.put_object(Bucket="docs", Key="notes/a b+c.txt", Body=b"hello", ContentType="text/plain")
        got = s3.get_object(Bucket="docs", Key="notes/a b+c.txt")
        assert got["Body"].read() == b"hello"
        assert got["ContentType"] == "text/plain"
        listed = s3.list_objects_v2(Bucket="docs", Prefix="notes/")
        assert [o["Key"] for o in listed["Contents"]] == ["notes/a b+c.txt"]
        s3.delete_object(Bucket="docs", Key="notes/a b+c.txt")
        assert s3.list_objects_v2(Bucket="docs").get("KeyCount") == 0

    await asyncio.to_thread(scenario)


async def test_without_the_sidecar_the_agents_key_is_refused(moto: Moto) -> None:
    # The same client straight to moto: its key is wrong, so the test above proves the
    # sidecar's signature is what moto accepted.
    moto.enforce()
    s3 = agent_client("s3", moto.url)
    with pytest.raises(botocore.exceptions.ClientError) as err:
        await asyncio.to_thread(s3.list_buckets)
    assert err.value.response["Error"]["Code"] == "InvalidAccessKeyId"


async def test_multipart_upload_of_50_mb(start_sidecar: StartSidecar, moto: Moto) -> None:
    sidecar = await start(start_sidecar, moto)
    s3 = agent_client("s3", f"{sidecar.url}/s3")
    data = os.urandom(1 << 20) * 50
    from boto3.s3.transfer import TransferConfig

    config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20)

    def scenario() -> str:
        s3.create_bucket(Bucket="big")
        s3.upload_fileobj(io.BytesIO(data), "big", "blob.bin", Config=config)
        head = s3.head_object(Bucket="big", Key="blob.bin")
        assert head["ContentLength"] == len(data)
        assert "-" in head["ETag"]  # a multipart upload's ETag: <md5 of md5s>-<parts>
        out = io.BytesIO()
        s3.download_fileobj("big", "blob.bin", out, Config=config)
        return hashlib.sha256(out.getvalue()).hexdigest()

    assert await asyncio.to_thread(scenario) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("version", ["s3", "s3v4"])
async def test_agents_presigned_query_is_not_forwarded(
    start_sidecar: StartSidecar, moto: Moto, version: str
) -> None:
    sidecar = await start(start_sidecar, moto)
    s3 = agent_client("s3", f"{sidecar.url}/s3", signature_version=version)
    await asyncio.to_thread(s3.create_bucket, Bucket="pre")
    await asyncio.to_thread(s3.put_object, Bucket="pre", Key="k", Body=b"v")
    # A URL presigned with the agent's (wrong) key: the sidecar drops X-Amz-* from the
    # query and signs the call itself, so the agent's signature never reaches AWS.
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "pre", "Key": "k"})
    async with aiohttp.ClientSession() as client, client.get(url) as resp:
        assert resp.status == 200
        assert await resp.read() == b"v"


async def test_sts_template_signs_a_form_post(start_sidecar: StartSidecar, moto: Moto) -> None:
    # Another kind of AWS API: a signed body (the form's SHA-256), checked by moto with
    # botocore's SigV4Auth. The answer names the sidecar's identity, not the agent's.
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          sts:
            template: sts
            upstream: {moto.url}
        """,
        env={"AWS_ACCESS_KEY_ID": moto.key_id, "AWS_SECRET_ACCESS_KEY": moto.secret},
    )
    moto.enforce()
    sts = agent_client("sts", f"{sidecar.url}/sts")
    identity = await asyncio.to_thread(sts.get_caller_identity)
    assert identity["Arn"].endswith(":user/sidecar")
