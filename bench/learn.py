"""How long `sidecar learn` takes on 100,000 recorded calls (issue: under 30 s).

Writes an access log of N calls over three real-shaped APIs (ids, UUIDs, nested
resources, several agents) and a directory of `mode: observe` lines with JSON
skeletons, then times `sidecar learn` on each, as a user runs it.

    .venv/bin/python bench/learn.py [--calls 100000]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def calls(n: int) -> list[dict[str, object]]:
    rng = random.Random(7)
    owners = [f"owner{i}" for i in range(200)]
    repos = [f"project{i}" for i in range(300)]
    items = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(2000)]
    agents = ["research-bot", "triage-bot", "billing-bot", "embed-bot"]
    out: list[dict[str, object]] = []
    for i in range(n):
        agent = agents[i % len(agents)]
        pick = rng.random()
        if pick < 0.4:
            service, method = "github", "GET"
            path = f"/repos/{rng.choice(owners)}/{rng.choice(repos)}"
            path += rng.choice(["", "/issues", f"/issues/{rng.randint(1, 5000)}", "/pulls"])
            answer: object = {"id": i, "state": rng.choice(["open", "closed"]), "title": "t"}
        elif pick < 0.7:
            service, method = "ledger", rng.choice(["GET", "GET", "DELETE"])
            path = f"/items/{rng.choice(items)}" if rng.random() < 0.8 else "/items"
            answer = {"id": rng.choice(items), "amount": rng.randint(1, 99), "currency": "EUR"}
        else:
            service, method = "openai", "POST"
            path = rng.choice(["/v1/chat/completions", "/v1/embeddings"])
            answer = {"id": f"chatcmpl-{i}", "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        out.append(
            {
                "service": service,
                "agent": agent,
                "method": method,
                "path": path,
                "query": ["page"] if rng.random() < 0.2 else [],
                "status": 200,
                "response_type": "application/json",
                "response_json": answer,
                "at": time.time(),
            }
        )
    return out


def timed(*args: str) -> float:
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "sidecar", "learn", *args], cwd=ROOT, check=True, capture_output=True
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=100_000)
    n = parser.parse_args().calls
    recorded = calls(n)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        log = base / "access.log"
        with log.open("w") as f:
            for c in recorded:
                line = {k: c[k] for k in ("agent", "method", "service", "status")}
                line.update(path=f"/{c['service']}{c['path']}", time="2026-12-07T00:00:00.000Z")
                f.write(json.dumps(line) + "\n")
        observe = base / "data" / "observe"
        observe.mkdir(parents=True)
        with (observe / "all.jsonl").open("w") as f:
            for c in recorded:
                f.write(json.dumps(c) + "\n")
        a = timed("--access-log", str(log), "--out", str(base / "out1"))
        b = timed("--observed", str(base / "data"), "--out", str(base / "out2"))
    print(f"sidecar learn, {n:,} calls: access log {a:.1f} s, observe (with bodies) {b:.1f} s")


if __name__ == "__main__":
    main()
