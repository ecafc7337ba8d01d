"""Fault: the real ``rekey worker`` gets SIGTERM in the middle of a re-wrap batch (a rolling
restart). It stops polling, the batch stops at a chunk boundary with its progress heartbeated,
the worker exits 0; a new worker resumes the batch from that heartbeat and the rotation ends
with every blob re-wrapped exactly once.

OpenBao is reached through a small proxy that holds each Transit ``rewrap`` request for a
moment (so that a batch lasts seconds, whatever the machine) and records every ciphertext it
forwards: that is how the test knows a DEK was re-wrapped once and only once, and that the
resumed attempt started after the last chunk the stopped one finished. The SIGTERM is sent
once the proxy has seen the second chunk of the batch, i.e. mid-batch.

The small version runs in ``make test``; the 20,000-blob one (two batches in flight, both
interrupted) is marked ``soak``."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.types import MAX_BATCH
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter
from rekey.client import RekeyClient
from sealing import envelope
from sealing.rotation import CHUNK
from sealing.state import SealedState
from sealing.store import SealedStateStore
from tests.fixtures.openbao import OpenBao

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]

SHUTDOWN_TIMEOUT_S = 20
REWRAP_DELAY_S = 0.4  # per Transit batch request: a 1,960-blob chunk (4 requests) takes ~1.6 s
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"}


class RewrapRecorder:
    """A reverse proxy to OpenBao that delays and records Transit rewrap requests."""

    def __init__(self, backend: str) -> None:
        parts = urlsplit(backend)
        assert parts.hostname and parts.port
        self.seen: list[str] = []  # every ciphertext sent for re-wrapping, in order
        self.lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_request(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if "/transit/rewrap/" in self.path:
                    items = json.loads(body).get("batch_input") or []
                    with recorder.lock:
                        recorder.seen.extend(item["ciphertext"] for item in items)
                    time.sleep(REWRAP_DELAY_S)
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    response = conn.getresponse()
                    payload = response.read()
                finally:
                    conn.close()
                self.send_response(response.status)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_BY_HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_LIST = do_request

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def __enter__(self) -> RewrapRecorder:
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder(openbao: OpenBao) -> Iterator[RewrapRecorder]:
    with RewrapRecorder(openbao.addr) as proxy:
        yield proxy


def _worker(home: Path, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "rekey.cli",
                "--home",
                str(home),
                "worker",
                "--shutdown-timeout",
                f"{SHUTDOWN_TIMEOUT_S}s",
            ],
            env=os.environ | env,
            stdout=subprocess.DEVNULL,
            stderr=out,
            start_new_session=True,
        )


async def _pending_rewraps(env: WorkflowEnvironment, workflow_id: str) -> list[tuple[int, dict[str, Any]]]:
    """(attempt, last heartbeat) of every pending rewrap_batch activity of the workflow."""
    description = await env.client.get_workflow_handle(workflow_id).describe()
    found = []
    for pending in description.raw_description.pending_activities:
        if pending.activity_type.name != "rewrap_batch":
            continue
        details = await env.client.data_converter.decode(pending.heartbeat_details.payloads)
        found.append((pending.attempt, details[0] if details else {}))
    return found


@pytest.mark.parametrize(
    ("blobs", "batches"),
    [pytest.param(6_000, 1, id="6k-one-batch"), pytest.param(20_000, 2, marks=pytest.mark.soak, id="20k")],
)
async def test_sigterm_mid_batch_loses_no_progress(
    temporal_env: WorkflowEnvironment,
    openbao: OpenBao,
    recorder: RewrapRecorder,
    temporal_home: Path,
    tmp_path: Path,
    blobs: int,
    batches: int,
) -> None:
    name = f"sigterm-{secrets.token_hex(3)}"
    adapter = VaultTransitAdapter(
        openbao.client(), name, release_store=MemoryReleasePolicyStore(), governor=Governor(name)
    )
    adapter.create()
    store_url = f"sqlite:///{tmp_path / 'state.db'}"
    store = SealedStateStore(store_url)
    store.put_generation("gen-1", '{"id":"gen-1"}')
    state = SealedState(store, lambda _ref: adapter)

    def put(i: int) -> None:
        data = secrets.token_bytes(32)
        state.put(namespace="ns", name=f"item-{i}", data=data, key_ref=adapter.key_ref, generation="gen-1")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(blobs)))
    # Each blob's wrapped DEK, as the sweep will send it to the KMS.
    blob_of: dict[str, str] = {}
    after = None
    while rows := store.sweep_page(
        key_ref=adapter.key_ref, below_version=2, after=after, upto=None, limit=5000
    ):
        for row in rows:
            slot = envelope.key_slot_in_head(row.head, row.length)
            assert slot is not None
            blob_of[slot.wrapped_dek.decode()] = row.blob_id
        after = rows[-1].blob_id
    assert len(blob_of) == blobs

    env = {
        "REKEY_TEMPORAL_ADDRESS": temporal_env.client.service_client.config.target_host,
        "REKEY_VAULT_ADDR": recorder.url,
        "REKEY_VAULT_TOKEN": openbao.token,
        "REKEY_STORE_URL": store_url,
    }
    log = tmp_path / "worker.log"
    worker = _worker(temporal_home, env, log)
    client = RekeyClient(temporal_env.client)
    batch = MAX_BATCH if batches == 1 else blobs // batches
    rotation = await client.start_rotation(adapter.key_ref, grace=0, batch_size=batch, in_flight=batches)
    try:
        # Mid-batch: the KMS has the second chunk of every batch (reads run a chunk ahead).
        while recorder.count() < batches * (CHUNK + 1):
            assert worker.poll() is None, log.read_text()
            await asyncio.sleep(0.05)
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, SHUTDOWN_TIMEOUT_S + 30)
        assert code == 0, log.read_text()
        text = log.read_text()
        assert text.count("SIGTERM, stopping") == 1, text

        # The stopped attempts' last heartbeats are at the server, and each names exactly what
        # it finished: the KMS saw those DEKs and no other.
        stopped = await _pending_rewraps(temporal_env, rotation.id)
        assert len(stopped) == batches, stopped
        sent_before = list(recorder.seen)
        on_new = store.count_by_key_version(adapter.key_ref).get(2, 0)
        assert sum(details["rewrapped"] for _, details in stopped) == on_new == len(sent_before)
        for attempt, details in stopped:
            assert attempt == 2  # the stopped attempt failed (retryable) and the retry waits
            assert 0 < details["rewrapped"] < batch  # stopped mid-batch, at a chunk boundary
            assert details["rewrapped"] % CHUNK == 0 and details["conflicts"] == 0
        resume_points = sorted(details["last_id"] for _, details in stopped)

        worker = _worker(temporal_home, env, log)
        result = await asyncio.wait_for(rotation.result(), timeout=600)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
    assert result.phase == "DONE"
    assert result.rewrapped == blobs and result.conflicts == 0 and result.failed == 0
    assert store.count_by_key_version(adapter.key_ref) == {2: blobs}
    times = Counter(recorder.seen)
    assert set(times) == set(blob_of) and max(times.values()) == 1  # every DEK re-wrapped once
    # The resumed attempts started after the stopped ones' last chunks: each DEK sent after
    # the SIGTERM belongs to a blob past a resume point (and so not finished before it).
    for ciphertext in recorder.seen[len(sent_before) :]:
        blob_id = blob_of[ciphertext]
        assert any(blob_id > point for point in resume_points), blob_id
    store.close()
