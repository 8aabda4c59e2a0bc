from tests.conftest import echo_app


async def test_routes_to_upstream_with_prefix_stripped(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          echo:
            upstream: {base}/v1
        """
    )
    async with client.get(f"{sc.url}/echo/chat/completions?x=1") as resp:
        assert resp.status == 200
        data = await resp.json()
    assert data["raw_path"] == "/v1/chat/completions?x=1"
