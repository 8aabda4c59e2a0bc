"""A process that accepts a burst of webhook events, or only delivers; for the kill -9 test.

python -m tests.webhooks.burst_process accept DATA_DIR TARGET_URL COUNT [SENDERS]
    accepts COUNT events, SENDERS at once (20 unless given), alternately inbound (a
    signed Standard Webhooks POST to the ingress entry point) and outbound (an agent's
    publish), while the delivery worker runs; prints each message id once acknowledged.
python -m tests.webhooks.burst_process deliver DATA_DIR TARGET_URL
    only runs the delivery worker, until killed.
"""

from __future__ import annotations

import asyncio
import sys
import time

from sidecar.policy.webhooks import Signing, Webhooks
from sidecar.webhooks.delivery import DeliveryWorker, compile_settings
from sidecar.webhooks.inbound import Ingress
from sidecar.webhooks.outbound import Outbox
from sidecar.webhooks.signatures import Signer
from sidecar.webhooks.sqlite_store import SqliteStore

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def policy(target: str) -> Webhooks:
    retry = {"schedule": ["0s"] + ["50ms"] * 9, "jitter": 0}
    return Webhooks.model_validate(
        {
            "inbound": {
                "in": {
                    "path": "/in",
                    "verify": {"type": "standard", "secrets": [SECRET]},
                    "retry": retry,
                    "routes": [{"deliver_to": [target]}],
                }
            },
            "outbound": {
                "out": {
                    "signing": {"secrets": [SECRET]},
                    "retry": retry,
                    "endpoints": [{"name": "receiver", "url": target, "allow_private": True}],
                }
            },
        }
    )


async def main(mode: str, data_dir: str, target: str, count: int, senders: int) -> None:
    store = await SqliteStore.open(data_dir)
    webhooks = policy(target)
    worker = DeliveryWorker(store, compile_settings(webhooks))
    await worker.start()
    if mode == "deliver":
        await asyncio.Event().wait()
    ingress = Ingress(webhooks, store=store)
    outbox = Outbox(webhooks, store=store)
    sender = Signer(Signing(secrets=[SECRET]))

    async def one(n: int) -> None:
        body = b'{"type": "burst", "n": %d}' % n
        if n % 2:
            result = await outbox.handle("out", {}, body)
        else:
            headers = sender.headers(f"evt_{n}", int(time.time()), body)
            result = await ingress.handle("/in", headers, body)
        if result.status in (200, 202):
            print(result.message_id, flush=True)

    # Several senders at once, as a real burst has.
    for start in range(0, count, senders):
        await asyncio.gather(*(one(n) for n in range(start, min(start + senders, count))))


if __name__ == "__main__":
    mode, data_dir, target = sys.argv[1:4]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    senders = int(sys.argv[5]) if len(sys.argv) > 5 else 20
    asyncio.run(main(mode, data_dir, target, count, senders))
