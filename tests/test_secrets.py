"""Secrets: rotated `${file:}` secrets take effect live; no secret ever leaks out.

The canary test gives every auth kind its own unique secret value, drives
the sidecar through successes and failures, then searches everything the
sidecar shows to anyone (logs, admin endpoints, error bodies and headers,
`sidecar validate` output, the Policy's repr) for any of those values.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import textwrap
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.cli import main as cli_main
from tests.conftest import echo_app
from tests.helpers import eventually
from tests.otlp_receiver import Receiver


def write_k8s_secret(volume: Path, files: dict[str, str], generation: int) -> None:
    """Write a Secret volume the way the kubelet does: a timestamped directory, an
    atomic `..data` symlink swap, and `name -> ..data/name` links that never change."""
    stamp = volume / f"..2024_01_01_00_00_0{generation}.000000000"
    stamp.mkdir()
    for name, text in files.items():
        (stamp / name).write_text(text)
    tmp = volume / "..data_tmp"
    tmp.symlink_to(stamp.name)
    old = os.readlink(volume / "..data") if (volume / "..data").is_symlink() else None
    os.replace(tmp, volume / "..data")
    for name in files:
        link = volume / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old is not None:
        for child in (volume / old).iterdir():
            child.unlink()
        (volume / old).rmdir()


async def test_rotated_file_secret_reaches_the_upstream(upstream, start_sidecar, client, tmp_path):
    volume = tmp_path / "secret-volume"
    volume.mkdir()
    write_k8s_secret(volume, {"token": "first-token\n"}, 1)
    base = await upstream(echo_app())
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          api:
            upstream: {base}
            auth: {{type: bearer, token: "${{file:{volume}/token}}"}}
        """,
        watch=True,
    )

    async def seen() -> str:
        async with client.get(f"{sc.url}/api/") as r:
            assert r.status == 200
            return str((await r.json())["headers"]["Authorization"])

    assert await seen() == "Bearer first-token"
    write_k8s_secret(volume, {"token": "second-token\n"}, 2)

    async def rotated() -> bool:
        return await seen() == "Bearer second-token"

    await eventually(rotated, "the rotated token sent upstream")
    assert sc.sidecar.last_reload is not None and sc.sidecar.last_reload.trigger == "watch"


# --- canary -------------------------------------------------------------------------------

CANARIES = {
    "bearer": "canary-bearer-7f3a91",
    "header": "canary-header-2b8c44",
    "query": "canary-query-9d1e07",
    "basic_user": "canary-basicuser-5a6b2c",
    "basic_pass": "canary-basicpass-3e4f8d",
    "client_id": "canary-clientid-8c2d19",
    "client_secret": "canary-clientsecret-1f7e62",
    "access_token": "canary-accesstoken-6b9a03",
    "jwt_key": "canary-jwtkey-4d5e6f-long-enough-for-hs256!",
    "broken": "canary-broken-0a1b2c",
}


def leaks(text: str) -> list[str]:
    """Every form a canary could take in text: raw, base64 (basic auth), url-encoded."""
    found = []
    for name, value in CANARIES.items():
        forms = {value, base64.b64encode(value.encode()).decode()}
        if name == "basic_user":
            pair = f"{value}:{CANARIES['basic_pass']}"
            forms.add(base64.b64encode(pair.encode()).decode())
        if name == "client_id":
            pair = f"{value}:{CANARIES['client_secret']}"
            forms.add(base64.b64encode(pair.encode()).decode())
        found.extend(f"{name} ({form})" for form in forms if form in text)
    return found


def token_endpoint(state: dict[str, Any]) -> web.Application:
    async def token(request: web.Request) -> web.Response:
        await request.read()
        if state["fail"]:
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        return web.json_response(
            {"access_token": CANARIES["access_token"], "token_type": "Bearer", "expires_in": 60}
        )

    app = web.Application()
    app.router.add_post("/token", token)
    return app


def slow_app() -> web.Application:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.Event().wait()  # never answers: any timeout is met, however short
        return web.Response(text="late")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", slow)
    return app


async def test_no_secret_appears_anywhere(
    upstream, start_sidecar, client, tmp_path, caplog, capsys, monkeypatch, closed_port
):
    caplog.set_level(logging.DEBUG, logger="sidecar")
    state: dict[str, Any] = {"fail": False}
    echo = await upstream(echo_app())
    tokens = await upstream(token_endpoint(state))
    slow = await upstream(slow_app())
    down = f"http://127.0.0.1:{closed_port}"
    receiver = Receiver()  # a real OTLP/HTTP collector: spans are searched too
    collector = await upstream(receiver.app())
    secret_file = tmp_path / "bearer"
    secret_file.write_text(CANARIES["bearer"])
    env = {
        "HEADER_VALUE": CANARIES["header"],
        "CLIENT_ID": CANARIES["client_id"],
        "CLIENT_SECRET": CANARIES["client_secret"],
        "JWT_KEY": CANARIES["jwt_key"],
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)  # for `sidecar validate --resolve-secrets` below

    def services(upstream_of: dict[str, str]) -> str:
        auths = {
            "bearer": f'{{type: bearer, token: "${{file:{secret_file}}}"}}',
            "header": '{type: header, name: X-Api-Key, value: "${env:HEADER_VALUE}"}',
            "query": f'{{type: query, name: key, value: "{CANARIES["query"]}"}}',
            "basic": (
                f'{{type: basic, username: "{CANARIES["basic_user"]}", '
                f'password: "{CANARIES["basic_pass"]}"}}'
            ),
            "oauth2": (
                f"{{type: oauth2_client_credentials, token_url: {tokens}/token, "
                'client_id: "${env:CLIENT_ID}", client_secret: "${env:CLIENT_SECRET}"}'
            ),
            "jwt": '{type: jwt, algorithm: HS256, key: "${env:JWT_KEY}", claims: {iss: sidecar}}',
        }
        out = []
        for kind, auth in auths.items():
            for where, base in upstream_of.items():
                # Only the upstream that never answers gets a short deadline; the
                # others (a token fetch included) have all the time they need.
                total = "100ms" if where == "slow" else "10s"
                out.append(
                    f"  {kind}-{where}:\n    upstream: {base}\n    auth: {auth}\n"
                    f"    timeout: {{total: {total}}}\n"
                )
        return "version: 1\nservices:\n" + "".join(out)

    policy = services({"ok": echo, "down": down, "slow": slow})
    sc = await start_sidecar(policy, env={**env, "OTEL_EXPORTER_OTLP_ENDPOINT": collector})
    seen: list[str] = []  # everything the agent got back

    async def call(path: str, **kw: Any) -> int:
        async with client.get(f"{sc.url}{path}", **kw) as r:
            seen.append(str(dict(r.headers)))
            body = await r.text()
            if r.headers.get("X-Sidecar-Error"):
                seen.append(body)  # the sidecar's own answers; echo bodies hold secrets by design
            return r.status

    for kind in ("bearer", "header", "query", "basic", "oauth2", "jwt"):
        assert await call(f"/{kind}-ok/x?key=agent") == 200
        assert await call(f"/{kind}-down/x") == 502
        assert await call(f"/{kind}-slow/x") == 504
    state["fail"] = True
    sc.sidecar.state.find("oauth2-ok", "oauth2")[0].invalidate(f"Bearer {CANARIES['access_token']}")
    assert await call("/oauth2-ok/x") == 502
    assert await call("/nowhere") == 404

    # A policy that fails to load, with a canary in it, through a reload and through validate.
    broken = textwrap.dedent(
        f"""
        version: 1
        services:
          bad:
            upstream: {echo}
            auth: {{type: bearer, tokn: "{CANARIES["broken"]}"}}
          badjwt:
            upstream: {echo}
            auth: {{type: jwt, algorithm: RS256, key: "{CANARIES["broken"]}"}}
        """
    )
    sc.write("zz-broken.yaml", broken)
    assert not (await sc.sidecar.reload("test")).ok
    admin_status = {}
    for path in ("/config", "/services", "/healthz", "/readyz", "/metrics"):
        async with client.get(f"{sc.admin}{path}") as r:
            admin_status[path] = r.status
            seen.append(f"{path}: {dict(r.headers)} {await r.text()}")
    assert set(admin_status.values()) == {200}

    capsys.readouterr()
    cli_dir = tmp_path / "cli"
    cli_dir.mkdir()
    (cli_dir / "policy.yaml").write_text(policy)
    (cli_dir / "broken.yaml").write_text(broken)
    assert cli_main(["validate", str(cli_dir)]) == 1
    assert cli_main(["validate", "--resolve-secrets", str(cli_dir)]) == 1
    (cli_dir / "broken.yaml").unlink()
    assert cli_main(["validate", "--resolve-secrets", str(cli_dir)]) == 0
    out = capsys.readouterr()
    assert "zz-broken" not in out.err and "broken.yaml" in out.err  # the errors were printed
    seen.append(out.out + out.err)

    assert sc.sidecar.policy is not None
    seen.append(repr(sc.sidecar.policy))
    seen.append(str(sc.sidecar.policy))
    seen.append(repr(sc.sidecar.router))

    # Telemetry: /metrics is searched above; every exported span here.
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    assert len(receiver.spans) > 20
    seen.extend(repr(span) for span in receiver.spans)

    seen.append(caplog.text)  # formatted, tracebacks included
    everything = "\n".join(seen)
    assert "auth_failed" in everything and "upstream_timeout" in everything  # searched what matters
    assert leaks(everything) == []
