"""The admin listener: readiness before and after a policy, and /config as operators read it."""

from __future__ import annotations

import pytest

from sidecar.admin import admin_app
from sidecar.http.listener import serve
from sidecar.runtime import Sidecar
from tests.conftest import echo_app
from tests.helpers import sidecar_process


async def test_readyz_is_503_until_a_policy_is_loaded(upstream, client, tmp_path):
    base = await upstream(echo_app())
    (tmp_path / "p.yaml").write_text(f"version: 1\nservices:\n  api: {{upstream: '{base}'}}\n")
    sidecar = Sidecar(str(tmp_path), env={})
    listener = await serve(admin_app(sidecar), "127.0.0.1", 0)  # served before any reload
    admin = f"http://127.0.0.1:{listener.addresses[0][1]}"
    try:
        async with client.get(f"{admin}/readyz") as r:
            assert r.status == 503
        async with client.get(f"{admin}/healthz") as r:
            assert r.status == 200  # alive, just not ready
        assert (await sidecar.reload("startup")).ok
        async with client.get(f"{admin}/readyz") as r:
            assert r.status == 200
            assert (await r.json())["version"]
        async with client.get(f"{admin}/nowhere") as r:
            assert r.status == 404
        async with client.get(f"{admin}/reload") as r:
            assert r.status == 405
            assert r.headers["Allow"] == "POST"
    finally:
        await listener.cleanup()
        await sidecar.close()


async def test_config_shows_secret_references_and_the_served_version(
    upstream, start_sidecar, client, tmp_path
):
    base = await upstream(echo_app())
    token_file = tmp_path / "token"
    token_file.write_text("file-secret-value")
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          api:
            upstream: {base}
            auth: {{type: header, name: X-Api-Key, value: "${{env:API_KEY}}"}}
          other:
            upstream: {base}
            auth: {{type: bearer, token: "${{file:{token_file}}}"}}
        """,
        env={"API_KEY": "env-secret-value"},
    )
    async with client.get(f"{sc.admin}/config") as r:
        assert r.status == 200
        text = await r.text()
        config = await r.json()
    async with client.get(f"{sc.admin}/readyz") as r:
        ready = await r.json()
    assert config["services"]["api"]["auth"]["value"] == "${env:API_KEY}"
    assert config["services"]["other"]["auth"]["token"] == f"${{file:{token_file}}}"
    assert "env-secret-value" not in text and "file-secret-value" not in text
    assert config["version"] == ready["version"]

    # After a reload both show the new version, together.
    sc.write("policy.yaml", f"version: 1\nservices:\n  api: {{upstream: '{base}'}}\n")
    assert (await sc.sidecar.reload("test")).changed
    async with client.get(f"{sc.admin}/config") as r:
        version = (await r.json())["version"]
    async with client.get(f"{sc.admin}/readyz") as r:
        assert (await r.json())["version"] == version != ready["version"]


@pytest.mark.process
async def test_reload_refuses_a_cross_origin_post(upstream, client, tmp_path):
    # What a web page can send without a CORS preflight: a text/plain POST.
    base = await upstream(echo_app())
    (tmp_path / "p.yaml").write_text(f"version: 1\nservices:\n  api: {{upstream: '{base}'}}\n")
    async with sidecar_process(tmp_path) as proc:
        for origin in ("http://evil.example", "null", proc.admin.replace("127.0.0.1", "localhost")):
            async with client.post(
                f"{proc.admin}/reload",
                data="x",
                headers={"Origin": origin, "Content-Type": "text/plain"},
            ) as r:
                assert r.status == 403, origin
                assert r.headers["X-Sidecar-Error"] == "forbidden_origin"
                assert r.content_type == "application/problem+json"
                assert (await r.json())["reason"] == "forbidden_origin"
        async with client.get(f"{proc.admin}/config") as r:
            assert (await r.json())["last_reload"]["trigger"] == "startup", "no reload ran"

        # Its own origin (the admin's page) and no Origin at all (curl, scripts) may.
        for headers in ({"Origin": proc.admin}, {}):
            async with client.post(f"{proc.admin}/reload", headers=headers) as r:
                assert r.status == 200, headers
        # Reading stays open to any origin: it changes nothing.
        async with client.get(
            f"{proc.admin}/readyz", headers={"Origin": "http://evil.example"}
        ) as r:
            assert r.status == 200
