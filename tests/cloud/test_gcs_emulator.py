"""google-cloud-storage through the sidecar's gcs template to gcp-storage-emulator (PyPI).

The agent's client holds no credential (AnonymousCredentials); the sidecar gets
a token with the service-account key from a local token endpoint and injects
it. The emulator ignores tokens: this shows the real client's uploads,
downloads and listings pass the sidecar's prefix unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from gcp_storage_emulator.server import create_server
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from tests.cloud.test_gcp_azure import GoogleTokenEndpoint
from tests.conftest import StartSidecar


@pytest.fixture
def emulator() -> Iterator[str]:
    server = create_server("127.0.0.1", 0, in_memory=True)
    server.start()
    host, port = server._api._httpd.server_address[:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


async def test_google_cloud_storage_client(
    start_sidecar: StartSidecar, upstream: Any, tmp_path: Path, emulator: str
) -> None:
    google = GoogleTokenEndpoint()
    (tmp_path / "key.json").write_text(google.key_file(f"{await upstream(google.app())}/token"))
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          gcs:
            template: gcs
            upstream: {emulator}
            auth:
              credentials: ${{file:{tmp_path / "key.json"}}}
        """
    )
    client = storage.Client(
        project="agents",
        credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
        client_options={"api_endpoint": f"{sidecar.url}/gcs"},
    )

    def scenario() -> tuple[bytes, list[str]]:
        bucket = client.create_bucket("agent-docs")
        bucket.blob("agents/alice/notes.txt").upload_from_string(b"hello gcs")
        data = bucket.blob("agents/alice/notes.txt").download_as_bytes()
        names = [b.name for b in client.list_blobs("agent-docs", prefix="agents/")]
        return data, names

    data, names = await asyncio.to_thread(scenario)
    assert data == b"hello gcs"
    assert names == ["agents/alice/notes.txt"]
    assert len(google.requests) == 1  # the sidecar's token, fetched once
