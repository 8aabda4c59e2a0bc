"""A Bedrock runtime on loopback that checks each call's SigV4 signature with botocore.

It answers InvokeModel (Anthropic's message shape) and Converse, as Bedrock
does, after recomputing the signature the way AWS would: botocore's SigV4Auth
over the fields the request says it signed, and the body's own SHA-256 (never
the hash the request claims).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
    r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$"
)


@dataclass
class FakeBedrock:
    key_id: str
    secret: str
    region: str = "us-east-1"
    token: str | None = None  # the session token the signer must send and sign
    seen: list[dict[str, Any]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/model/{model}/invoke", self._invoke)
        app.router.add_post("/model/{model}/converse", self._converse)
        app.router.add_post("/model/{model}/invoke-with-response-stream", self._invoke_stream)
        app.router.add_post("/model/{model}/converse-stream", self._converse_stream)
        return app

    def _check(self, request: web.Request, body: bytes) -> str | None:
        """Why the signature is wrong, or None."""
        match = _AUTH.match(request.headers.get("Authorization", ""))
        if match is None:
            return "no SigV4 Authorization"
        key_id, _, region, service, signed, signature = match.groups()
        if key_id != self.key_id or region != self.region or service != "bedrock":
            return f"credential scope {key_id}/{region}/{service}"
        if request.headers.get("X-Amz-Security-Token") != self.token:
            return "not the session token expected"
        if request.headers.get("X-Amz-Content-Sha256") != hashlib.sha256(body).hexdigest():
            return "the body's hash is not the one signed"
        names = signed.split(";")
        headers = {k: v for k, v in request.headers.items() if k.lower() in names}
        aws = AWSRequest(
            method=request.method,
            url=f"http://{request.host}{request.raw_path}",
            data=body,
            headers=headers,
        )
        aws.context["timestamp"] = request.headers["X-Amz-Date"]
        creds = Credentials(self.key_id, self.secret, self.token)
        auth = SigV4Auth(creds, "bedrock", self.region)
        canonical = auth.canonical_request(aws)
        expected = auth.signature(auth.string_to_sign(aws, canonical), aws)
        return None if expected == signature else "signature does not match"

    async def _verified(self, request: web.Request) -> dict[str, Any] | web.Response:
        body = await request.read()
        why = self._check(request, body)
        if why is not None:
            self.refused.append(why)
            return web.json_response(
                {"message": f"The request signature we calculated does not match ({why})"},
                status=403,
                headers={"x-amzn-ErrorType": "InvalidSignatureException"},
            )
        self.seen.append({"path": request.raw_path, "headers": dict(request.headers)})
        return {"model": request.match_info["model"]}

    async def _invoke(self, request: web.Request) -> web.Response:
        got = await self._verified(request)
        if isinstance(got, web.Response):
            return got
        return web.json_response(
            {
                "id": "msg_bdrk_01",
                "type": "message",
                "role": "assistant",
                "model": "claude-sonnet-4-5-20250929",
                "content": [{"type": "text", "text": "Hello from Bedrock"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 12, "output_tokens": 5},
            },
            headers={"x-amzn-bedrock-input-token-count": "12"},
        )

    async def _converse(self, request: web.Request) -> web.Response:
        got = await self._verified(request)
        if isinstance(got, web.Response):
            return got
        return web.json_response(
            {
                "output": {"message": {"role": "assistant", "content": [{"text": "Hi there"}]}},
                "stopReason": "end_turn",
                "usage": {"inputTokens": 7, "outputTokens": 3, "totalTokens": 10},
                "metrics": {"latencyMs": 12},
            }
        )

    async def _invoke_stream(self, request: web.Request) -> web.StreamResponse:
        got = await self._verified(request)
        if isinstance(got, web.Response):
            return got
        events = [
            {
                "type": "message_start",
                "message": {
                    "id": "m",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": "claude",
                    "usage": {"input_tokens": 21, "output_tokens": 1},
                },
            },
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": "Streamed hello"},
            },
            {"type": "content_block_stop", "index": 0},
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 4},
            },
            {
                "type": "message_stop",
                "amazon-bedrock-invocationMetrics": {
                    "inputTokenCount": 21,
                    "outputTokenCount": 4,
                    "invocationLatency": 9,
                    "firstByteLatency": 3,
                },
            },
        ]
        frames = [
            frame("chunk", {"bytes": base64.b64encode(json.dumps(e).encode()).decode()})
            for e in events
        ]
        return await _stream(request, frames)

    async def _converse_stream(self, request: web.Request) -> web.StreamResponse:
        got = await self._verified(request)
        if isinstance(got, web.Response):
            return got
        frames = [
            frame("messageStart", {"role": "assistant"}),
            frame("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": "Hi"}}),
            frame("contentBlockStop", {"contentBlockIndex": 0}),
            frame("messageStop", {"stopReason": "end_turn"}),
            frame(
                "metadata",
                {
                    "usage": {"inputTokens": 9, "outputTokens": 2, "totalTokens": 11},
                    "metrics": {"latencyMs": 5},
                },
            ),
        ]
        return await _stream(request, frames)


def frame(event: str, payload: dict[str, Any]) -> bytes:
    """One AWS event-stream message (the binary framing boto3 decodes and checks)."""
    headers = b""
    for name, value in (
        (":event-type", event),
        (":content-type", "application/json"),
        (":message-type", "event"),
    ):
        headers += bytes([len(name)]) + name.encode() + b"\x07"
        headers += len(value).to_bytes(2, "big") + value.encode()
    body = json.dumps(payload).encode()
    total = 12 + len(headers) + len(body) + 4
    prelude = total.to_bytes(4, "big") + len(headers).to_bytes(4, "big")
    prelude += zlib.crc32(prelude).to_bytes(4, "big")
    message = prelude + headers + body
    return message + zlib.crc32(message).to_bytes(4, "big")


async def _stream(request: web.Request, frames: list[bytes]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream"})
    await response.prepare(request)
    for data in frames:
        # Split mid-frame too: the sidecar must cut frames across chunks.
        await response.write(data[:7])
        await response.write(data[7:])
    await response.write_eof()
    return response
