"""``AzureKeyVaultEmulator``: the public entry point, composed of the key store, the throttle, the
operations, the router and the HTTPS server (see docs/azure-keyvault-emulator.md)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from emulators.azure_keyvault.crypto import CryptoOperations
from emulators.azure_keyvault.keys import KeyOperations
from emulators.azure_keyvault.release import KeyRelease, load_verifier
from emulators.azure_keyvault.routes import Router
from emulators.azure_keyvault.server import (
    DEFAULT_RESOURCE,
    DEFAULT_TENANT,
    Dispatcher,
    EmulatorHttpServer,
    server_context,
)
from emulators.azure_keyvault.state import KeyStore
from emulators.azure_keyvault.throttle import SustainedLoad, Throttle
from emulators.azure_keyvault.tls import ensure_tls

__all__ = ["AzureKeyVaultEmulator"]


class AzureKeyVaultEmulator:
    """An Azure Key Vault keys endpoint on 127.0.0.1 (see docs/azure-keyvault-emulator.md).

    ``start()`` returns the vault URL; ``ca_file`` is the CA certificate clients must trust;
    ``stop()`` closes the listener and every open connection. Also a context manager.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        port: int = 0,
        limits: Mapping[str, float] | None = None,
        rate_scale: float = 1.0,
        retry_after: bool = True,
        sustained: SustainedLoad | None = None,
        attestation_verifier: str | os.PathLike[str] | bytes | None = None,
        tenant: str = DEFAULT_TENANT,
        resource: str = DEFAULT_RESOURCE,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.port = port
        self.tenant = tenant
        self.resource = resource
        verifier = load_verifier(attestation_verifier)
        self._throttle = Throttle(
            limits or {}, rate_scale=rate_scale, retry_after=retry_after, sustained=sustained
        )
        self._store = KeyStore(self.state_file)
        self._release = KeyRelease(self._store, self._throttle, verifier)
        self._router = Router(
            KeyOperations(self._store, self._throttle),
            CryptoOperations(self._store, self._throttle),
            self._release,
            self._throttle,
        )
        self._server: EmulatorHttpServer | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------- lifecycle

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("the emulator is not running")
        return f"https://127.0.0.1:{self._server.server_address[1]}"

    @property
    def ca_file(self) -> str:
        return str(self.state_dir / "ca.pem")

    @property
    def state_file(self) -> Path:
        return self.state_dir / "keys.json"

    def start(self) -> str:
        if self._server is not None:
            return self.url
        tls = ensure_tls(self.state_dir)
        self._release.load_signing_key(tls.signing_key, tls.signing_cert)
        self._store.load()
        dispatcher = Dispatcher(self._router, self._throttle, tenant=self.tenant, resource=self.resource)
        self._server = EmulatorHttpServer(self.port, dispatcher, server_context(tls))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="azure-kv-emulator",
            daemon=True,
        )
        self._thread.start()
        return self.url

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_connections()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> AzureKeyVaultEmulator:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------- throttling

    @property
    def retry_after(self) -> bool:
        """Whether a 429 carries ``Retry-After``; may be changed while the emulator runs."""
        return self._throttle.retry_after

    @retry_after.setter
    def retry_after(self, value: bool) -> None:
        self._throttle.retry_after = value

    def set_limits(self, limits: Mapping[str, float], *, reset: bool = False) -> None:
        """Override the limits of some classes (requests/s; 0 or less = unlimited). ``reset``
        first restores the defaults times ``rate_scale``."""
        self._throttle.set_limits(limits, reset=reset)

    @property
    def limits(self) -> dict[str, float]:
        return self._throttle.limits

    @property
    def sustained(self) -> SustainedLoad | None:
        """The sustained-load model's parameters (None: off)."""
        return self._throttle.sustained

    def set_sustained(self, model: SustainedLoad | None) -> None:
        """Switch the sustained-load model on (with these parameters) or off, while it runs."""
        self._throttle.set_sustained(model)

    def stats(self) -> dict[str, Any]:
        """Per class: current and normal limit, served, throttled, received rate and the
        sustained-load state (degraded, since when, added latency); the model's parameters; and
        request, 401 and status counts."""
        return self._throttle.stats()

    def reset_stats(self) -> None:
        self._throttle.reset_stats()

    def set_attestation_verifier(self, source: str | os.PathLike[str] | bytes | None) -> None:
        """Trust attestation tokens signed by this PEM public key for release (None: verify no
        signatures)."""
        self._release.verifier = load_verifier(source)

    # ------------------------------------------------------------------- inspection

    def keys(self) -> Iterator[tuple[str, int, bool]]:
        """``(name, number of versions, deleted)`` of every key (for tests)."""
        with self._store.lock:
            items = [(k.name, len(k.versions), k.deleted is not None) for k in self._store.keys.values()]
        yield from items
