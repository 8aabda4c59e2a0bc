"""A firing alert survives kill -9 of the real sidecar process: it was in the durable
webhook queue before the process died, and the next process delivers it."""

from __future__ import annotations

import os
import signal

import pytest

from tests.alerts.test_alerts import Flaky, Receiver, breaker_policy, receiver_yaml
from tests.helpers import eventually, sidecar_process

pytestmark = pytest.mark.process


async def test_kill_9_between_firing_and_delivery_loses_nothing(upstream, client, tmp_path):
    flaky, slack = Flaky(), Receiver(status=503)  # the receiver is down at first
    (tmp_path / "policies").mkdir()
    (tmp_path / "policies" / "p.yaml").write_text(
        breaker_policy(
            await upstream(flaky.app()),
            receiver_yaml(
                "ops",
                f"{await upstream(slack.app())}/services/T/B/x",
                more=", retry: {schedule: [0s, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms, "
                "100ms, 100ms, 100ms, 100ms, 100ms, 100ms, 100ms], jitter: 0}",
            ),
            "- {name: pay-breaker, kind: breaker_open, send_to: [ops]}",
        )
    )
    data = str(tmp_path / "data")
    env = {**os.environ, "SIDECAR_DATA_DIR": data}
    async with sidecar_process(tmp_path / "policies", env=env) as first:
        for _ in range(2):
            async with client.get(f"{first.url}/pay/x") as r:
                assert r.status == 500
        # The alert fired and is in the queue: its delivery was tried and refused.
        await eventually(lambda: slack.attempts, "a delivery attempt of the firing alert", 15)
        assert await first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert slack.bodies == []

    slack.status = 200
    async with sidecar_process(tmp_path / "policies", env=env) as second:
        await eventually(lambda: slack.bodies, "the firing alert, delivered after the restart", 15)
        assert second.proc.returncode is None
    [firing] = slack.bodies
    assert "FIRING" in firing["text"] and "*pay-breaker*" in firing["text"]
