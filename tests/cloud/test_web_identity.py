"""Web identity (EKS/IRSA): the sidecar trades a token file for a role's keys at moto's STS."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.cloud.moto_aws import ALLOW_ALL, Moto, agent_client
from tests.conftest import StartSidecar

TRUST = json.dumps(
    {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Federated": "arn:aws:iam::123456789012:oidc-provider/eks"},
                "Action": "sts:AssumeRoleWithWebIdentity",
            }
        ],
    }
)


async def test_role_keys_from_sts_sign_s3_calls(
    start_sidecar: StartSidecar, moto: Moto, tmp_path: Path
) -> None:
    moto.relax()
    iam = moto.client("iam")
    role = iam.create_role(RoleName="agent-role", AssumeRolePolicyDocument=TRUST)["Role"]
    iam.put_role_policy(RoleName="agent-role", PolicyName="all", PolicyDocument=ALLOW_ALL)
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl\n")
    sidecar = await start_sidecar(f"""
        version: 1
        services:
          s3:
            upstream: {moto.url}
            auth:
              type: aws_sigv4
              service: s3
              region: us-east-1
              web_identity:
                role_arn: {role["Arn"]}
                token_file: {token}
                sts_endpoint: {moto.url}
    """)
    # Exactly one request more goes unchecked: the unsigned STS exchange. A second
    # exchange would be refused, so the concurrent first calls below also show that
    # they all waited for the one exchange.
    moto.enforce(spare=1)
    s3 = agent_client("s3", f"{sidecar.url}/s3")
    await asyncio.gather(*(asyncio.to_thread(s3.list_buckets) for _ in range(5)))
    await asyncio.to_thread(s3.create_bucket, Bucket="role-bucket")
    await asyncio.to_thread(s3.put_object, Bucket="role-bucket", Key="k", Body=b"x")
    listed = await asyncio.to_thread(s3.list_objects_v2, Bucket="role-bucket")
    assert [o["Key"] for o in listed["Contents"]] == ["k"]
