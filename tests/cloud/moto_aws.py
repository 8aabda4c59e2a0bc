"""moto in server mode, in this process, checking signatures as AWS would.

moto checks a request's SigV4 signature (with botocore's own code) and its
IAM permissions once `INITIAL_NO_AUTH_ACTION_COUNT` requests have been served
unchecked. Set-up calls (creating the user, its keys, a role) go before that,
with no check; `enforce(spare)` then lets exactly `spare` more requests pass
unchecked (an unsigned STS web identity exchange, which moto would otherwise
refuse) and checks every one after.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config
from moto import settings
from moto.core.authorization import ActionAuthenticatorMixin
from moto.server import ThreadedMotoServer

REGION = "us-east-1"
ALLOW_ALL = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
)
# What an agent's client holds: not a key moto knows. The sidecar replaces it.
WRONG = {"aws_access_key_id": "AKIAWRONGWRONGWRONG0", "aws_secret_access_key": "not-the-secret"}


@dataclass
class Moto:
    url: str
    key_id: str = ""
    secret: str = ""

    def client(self, service: str, **kwargs: Any) -> Any:
        """A client straight to moto, for set-up and for looking behind the sidecar."""
        return boto3.client(
            service,
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=kwargs.pop("key_id", "testing"),
            aws_secret_access_key=kwargs.pop("secret", "testing"),
            config=Config(retries={"max_attempts": 1}),
            **kwargs,
        )

    def relax(self) -> None:
        """Serve every request unchecked (set-up calls), until `enforce`."""
        settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")

    def enforce(self, spare: int = 0) -> None:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = ActionAuthenticatorMixin.request_count + spare


def agent_client(service: str, endpoint: str, *, agent: str | None = None, **config: Any) -> Any:
    """The agent's client: pointed at the sidecar, holding a key that is not valid,
    naming itself in X-Agent-Id when `agent` is given."""
    client = boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        config=Config(retries={"max_attempts": 1}, **config),
        **WRONG,
    )
    if agent is not None:

        def name_agent(request: Any, **_: Any) -> None:
            request.headers["X-Agent-Id"] = agent

        client.meta.events.register("before-send.*", name_agent)
    return client


def moto_server() -> Iterator[Moto]:
    saved = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = float("inf")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    moto = Moto(url=f"http://{host}:{port}")
    try:
        iam = moto.client("iam")
        iam.create_user(UserName="sidecar")
        iam.put_user_policy(UserName="sidecar", PolicyName="all", PolicyDocument=ALLOW_ALL)
        key = iam.create_access_key(UserName="sidecar")["AccessKey"]
        moto.key_id, moto.secret = key["AccessKeyId"], key["SecretAccessKey"]
        yield moto
    finally:
        server.stop()
        settings.INITIAL_NO_AUTH_ACTION_COUNT = saved
