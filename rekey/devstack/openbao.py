"""The dev stack's OpenBao: a single node on raft storage, initialised on first start, unsealed
and given a Transit mount on every start; and an hvac client for it."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from rekey.config import Settings
from rekey.devstack.component import HOST, Component, executable
from rekey.devstack.errors import ComponentFailed, DevStackError
from rekey.devstack.files import absolute, write_atomic, write_secret_json
from rekey.devstack.throttle import read_choice

if TYPE_CHECKING:
    import hvac

__all__ = ["OpenBaoServer", "openbao_client"]


class OpenBaoServer(Component):
    """Single-node OpenBao on raft storage (2.7 has no ``file`` backend).

    First start: initialise with one key share and store unseal key and root token in
    ``settings.openbao_init_file`` (mode 0600). Every start: unseal, wait for the node to
    become active, mount Transit at ``settings.transit_mount``.
    """

    name = "openbao"
    binary = "bao"
    port_fields = ("openbao_port",)

    def ports(self, settings: Settings) -> list[int]:
        # The raft cluster listener only binds after unseal, but it must be free too.
        return [settings.openbao_port, settings.openbao_port + 1]

    def port_hint(self, settings: Settings, port: int) -> str:
        hint = "set REKEY_OPENBAO_PORT or openbao_port in rekey.toml to use another port"
        if port == settings.openbao_port + 1:
            return f"the cluster port is openbao_port + 1; {hint}"
        return hint

    def data_dir(self, settings: Settings) -> Path:
        return absolute(settings.openbao_dir)

    def config_file(self, settings: Settings) -> Path:
        return self.data_dir(settings) / "config.hcl"

    def raft_dir(self, settings: Settings) -> Path:
        return self.data_dir(settings) / "data"

    def api_url(self, settings: Settings) -> str:
        return f"http://{HOST}:{settings.openbao_port}"

    def prepare(self, settings: Settings) -> None:
        directory = self.data_dir(settings)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.raft_dir(settings).mkdir(mode=0o700, exist_ok=True)
        port = settings.openbao_port
        config = (
            "# Written by `rekey dev up`; rewritten on every start.\n"
            'storage "raft" {\n'
            f"  path    = {json.dumps(str(self.raft_dir(settings)))}\n"
            '  node_id = "rekey-dev"\n'
            "}\n"
            "\n"
            'listener "tcp" {\n'
            f'  address         = "{HOST}:{port}"\n'
            f'  cluster_address = "{HOST}:{port + 1}"\n'
            "  tls_disable     = true\n"
            "}\n"
            "\n"
            f'api_addr     = "http://{HOST}:{port}"\n'
            f'cluster_addr = "http://{HOST}:{port + 1}"\n'
            "ui           = false\n"
        )
        write_atomic(self.config_file(settings), config)

    def command(self, settings: Settings) -> list[str]:
        return [
            executable(self.binary, self.name),
            "server",
            f"-config={self.config_file(settings)}",
        ]

    def _health(self, settings: Settings) -> int | None:
        try:
            response = httpx.get(f"{self.api_url(settings)}/v1/sys/health", timeout=2.0)
        except httpx.HTTPError:
            return None
        return response.status_code

    def probe(self, settings: Settings) -> str | None:
        # Any answer will do here: sealed (503) and uninitialised (501) are expected.
        code = self._health(settings)
        return None if code is not None else f"{self.api_url(settings)} does not answer"

    def health(self, settings: Settings) -> str | None:
        code = self._health(settings)
        reasons = {
            None: "API does not answer",
            429: "standby, not active",
            501: "not initialised",
            503: "sealed",
        }
        if code == 200:
            return None
        return reasons.get(code, f"sys/health answers HTTP {code}")

    def after_start(self, settings: Settings, deadline: float) -> None:
        import hvac

        client = hvac.Client(url=self.api_url(settings), timeout=10)
        init_file = settings.openbao_init_file
        if not client.sys.is_initialized():
            # An init file without initialised storage belongs to deleted data.
            init_file.unlink(missing_ok=True)
            result = client.sys.initialize(secret_shares=1, secret_threshold=1)
            write_secret_json(
                init_file,
                {"unseal_key": result["keys"][0], "root_token": result["root_token"]},
            )
        unseal_key, root_token = _read_init_file(init_file, self.raft_dir(settings))
        if client.sys.is_sealed():
            client.sys.submit_unseal_key(unseal_key)
        # Raft needs a few seconds after unseal to elect itself; writes fail before that.
        while (code := self._health(settings)) != 200:
            if time.monotonic() >= deadline:
                raise ComponentFailed(f"openbao did not become active after unseal (sys/health: HTTP {code})")
            time.sleep(0.2)
        client.token = root_token
        mount = settings.transit_mount.strip("/")
        mounts = client.sys.list_mounted_secrets_engines()
        mounts = mounts.get("data", mounts)
        if f"{mount}/" not in mounts:
            client.sys.enable_secrets_engine("transit", path=mount)
        self._apply_throttle(client, settings, mount)

    def _apply_throttle(self, client: hvac.Client, settings: Settings, mount: str) -> None:
        """The vault-quota throttle profile: a rate-limit quota of R req/s on the Transit mount
        (every Transit request counts; OpenBao answers 429 over it, to the root token too);
        without it, no such quota."""
        from emulators.profiles import set_vault_quota

        choice = read_choice(settings)
        rate = choice.effective_rate() if choice.profile == "vault-quota" else None
        set_vault_quota(client, rate, mount=mount)  # None: delete it (a no-op if there is none)

    def endpoints(self, settings: Settings) -> dict[str, str]:
        return {
            "api": self.api_url(settings),
            "transit_mount": settings.transit_mount,
            "init_file": str(absolute(settings.openbao_init_file)),
        }


def _read_init_file(path: Path, raft_dir: Path) -> tuple[str, str]:
    try:
        data = json.loads(path.read_text())
        return str(data["unseal_key"]), str(data["root_token"])
    except (OSError, ValueError, KeyError, TypeError):
        raise ComponentFailed(
            f"openbao storage in {raft_dir} is initialised but {path} is missing or "
            "unreadable, so it cannot be unsealed; restore the file or delete the storage "
            "directory to start afresh"
        ) from None


def openbao_client(settings: Settings) -> hvac.Client:
    """An hvac client for ``settings.vault_addr`` with the configured or dev root token."""
    import hvac

    token = settings.resolved_vault_token()
    if not token:
        raise DevStackError(
            "no OpenBao token: set REKEY_VAULT_TOKEN or run `rekey dev up` to create "
            f"{settings.openbao_init_file}"
        )
    return hvac.Client(url=settings.vault_addr, token=token, timeout=30)
