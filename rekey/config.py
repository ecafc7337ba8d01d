"""Settings: one state directory, endpoints from ``rekey.toml`` or ``REKEY_*`` variables.

Precedence, highest first: explicit overrides (CLI flags), ``REKEY_<FIELD>`` environment
variables, ``<home>/rekey.toml``, built-in defaults that point at the dev stack. An unknown field
in ``rekey.toml``, or a ``REKEY_`` + upper-case name that is neither ``REKEY_<FIELD>`` nor
``REKEY_HOME`` (`check_environment`), is a `ConfigError` naming the closest known one.

``allowed_keys`` (optional; ``rekey.toml``: a list of strings; ``REKEY_ALLOWED_KEYS``: one
comma-separated string) lists the key references rekey may use: exact refs (``vault:orders``) or a name
prefix ending in ``*`` (``vault:team-*``, ``aws:*``). When it is set, ``rekey.backends.adapter_for``
refuses every other key ref, including one read from a store record before its blob is
authenticated (someone with write access to the store could otherwise point a record at any key
of a configured backend). Empty (the default): any key ref with a safe name
(``kms_adapters.keyref``) of a configured backend.

``signing_key`` says which key signs audit records and freshness checkpoints: ``file`` (the
default: the Ed25519 key file ``<home>/audit/ed25519.pem``), ``vault:NAME`` (an OpenBao/Vault
Transit key of type ``ed25519`` on ``vault_addr``/``transit_mount``) or ``aws:KEYID`` (an AWS KMS
``ECC_NIST_P256`` ``SIGN_VERIFY`` key, by key id or ``alias/NAME``). A KMS key cannot be read
by whoever can read the worker's files. ``trusted_key_fingerprints`` (``sha256:<64 hex>``, a list
or one comma-separated string) pins the other keys ``rekey audit verify`` trusts: this
installation's own key is always trusted; a public key merely found in a directory never is.

``codec_min_format`` (1, 2 or 3; ``REKEY_CODEC_MIN_FORMAT``): the oldest payload codec format
(``rekey.codec``) workers and clients decode. 3 accepts only payloads bound to their namespace
and workflow, so an encrypted payload copied from another workflow's history is refused in
every case; set it once no retained history, pending workflow, schedule or running rotation
still holds a format 1 or 2 payload (those were written before format 3, and continuing
rotations and existing schedules carry them on). The default, 1, keeps them readable: a
format 3 payload is still refused in another workflow, but a format 2 one copied from an old
history is not.

``max_blob_bytes`` (``REKEY_MAX_BLOB_BYTES``; default 64 MiB, at most ``MAX_BLOB_BYTES``): the
largest plaintext ``rekey state put`` seals; a larger input is refused before it is read.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from kms_adapters.keyref import BACKENDS, InvalidKeyRef, KeyRef
from sealing.envelope import MAX_BODY
from sealing.signing import SigningError, check_fingerprint

DEFAULT_HOME = Path(".rekey")
CONFIG_FILE = "rekey.toml"


class ConfigError(Exception):
    """The settings file or an environment variable holds a value rekey cannot use."""

    exit_code = 2


class InsecureHome(ConfigError):
    """The home directory is writable by other users (or owned by one): they could replace the
    state database, keys or settings in it, so rekey refuses to use it."""


def secure_home(home: Path) -> Path:
    """Create ``home`` (and missing parents) with mode 0700, or check an existing one: it must be
    a directory owned by this user that neither group nor others can write. ``InsecureHome`` if
    not (one line: what is wrong and the ``chmod`` that fixes it)."""
    try:
        home.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the home directory {home}: {exc.strerror}") from None
    else:
        os.chmod(home, 0o700)  # mkdir's mode is masked by the umask; make it exactly 0700
    try:
        info = home.stat()
    except OSError as exc:
        raise ConfigError(f"cannot read the home directory {home}: {exc.strerror}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"the home {home} is not a directory")
    if info.st_uid != os.geteuid():
        raise InsecureHome(f"refusing the home {home}: it is owned by uid {info.st_uid}, not {os.geteuid()}")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        mode = stat.S_IMODE(info.st_mode)
        raise InsecureHome(
            f"refusing the home {home}: mode {mode:04o} lets other users write it (chmod 700 {home})"
        )
    return home


BLOB_FRESHNESS: Final = ("tofu", "strict")
DEFAULT_MAX_BLOB_BYTES: Final = 64 * 1024 * 1024
#: The envelope's own limit on a sealed body.
MAX_BLOB_BYTES: Final = MAX_BODY


@dataclass(frozen=True)
class Settings:
    home: Path = DEFAULT_HOME
    # Dev-stack ports. Endpoints below derive from them unless set explicitly.
    temporal_port: int = 7233
    temporal_ui_port: int = 8233
    openbao_port: int = 8200
    moto_port: int = 5000
    azure_port: int = 8443
    codec_port: int = 8234
    temporal_address: str = ""
    temporal_namespace: str = "default"
    vault_addr: str = ""
    vault_token: str = ""
    transit_mount: str = "transit"
    aws_endpoint: str = ""
    aws_region: str = "us-east-1"
    azure_vault_url: str = ""
    azure_ca_file: str = ""
    azure_token: str = ""
    store_url: str = ""
    allowed_keys: tuple[str, ...] = ()
    witness_dir: str = ""
    trusted_key_fingerprints: tuple[str, ...] = ()
    # "tofu": a sealed blob with no freshness checkpoint reads and is anchored on first read;
    # "strict": it is refused (sealing.state).
    blob_freshness: str = "tofu"
    signing_key: str = "file"
    codec_min_format: int = 1
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES

    def __post_init__(self) -> None:
        home = Path(self.home)
        object.__setattr__(self, "home", home)
        if not self.temporal_address:
            object.__setattr__(self, "temporal_address", f"127.0.0.1:{self.temporal_port}")
        if not self.vault_addr:
            object.__setattr__(self, "vault_addr", f"http://127.0.0.1:{self.openbao_port}")
        if not self.aws_endpoint:
            object.__setattr__(self, "aws_endpoint", f"http://127.0.0.1:{self.moto_port}")
        if not self.azure_vault_url:
            object.__setattr__(self, "azure_vault_url", f"https://127.0.0.1:{self.azure_port}")
        if not self.azure_ca_file:
            object.__setattr__(self, "azure_ca_file", str(home / "azure" / "ca.pem"))
        if not self.store_url:
            object.__setattr__(self, "store_url", f"sqlite:///{home.resolve() / 'state.db'}")
        if not self.witness_dir:
            object.__setattr__(self, "witness_dir", str(home / "witness"))
        for name in ("vault_addr", "aws_endpoint", "azure_vault_url"):
            check_endpoint_url(name, getattr(self, name))
        check_temporal_address(self.temporal_address)
        for name in ("vault_token", "azure_token"):
            check_token(name, getattr(self, name))
        check_aws_region(self.aws_region)
        if urlsplit(self.vault_addr).path not in ("", "/"):
            # hvac appends /v1/...: a path would name another API, and every key "not exist".
            raise ConfigError(
                f"vault_addr {_shown(self.vault_addr)} must not have a path (give the server's root)"
            )
        check_temporal_namespace(self.temporal_namespace)
        if not _MOUNT.fullmatch(self.transit_mount):
            raise ConfigError(
                f"transit_mount {_shown(self.transit_mount)} is not a mount path (e.g. transit, team/transit)"
            )
        for name in ("witness_dir", "azure_ca_file"):
            if not getattr(self, name).isprintable() or not getattr(self, name):
                raise ConfigError(
                    f"{name} {_shown(getattr(self, name))} holds unprintable characters or is empty"
                )
        object.__setattr__(self, "allowed_keys", tuple(self.allowed_keys))
        object.__setattr__(self, "trusted_key_fingerprints", tuple(self.trusted_key_fingerprints))
        for pattern in self.allowed_keys:
            check_allowed_pattern(pattern)
        if self.blob_freshness not in BLOB_FRESHNESS:
            raise ConfigError(
                f"blob_freshness must be one of {', '.join(BLOB_FRESHNESS)}, got {self.blob_freshness!r}"
            )
        object.__setattr__(self, "signing_key", check_signing_key(self.signing_key))
        if self.codec_min_format not in (1, 2, 3):
            raise ConfigError(f"codec_min_format must be 1, 2 or 3, got {self.codec_min_format!r}")
        if not 1 <= self.max_blob_bytes <= MAX_BLOB_BYTES:
            raise ConfigError(f"max_blob_bytes must be 1 to {MAX_BLOB_BYTES}, got {self.max_blob_bytes!r}")

    def allows_key(self, key_ref: str) -> bool:
        """Whether ``allowed_keys`` admits ``key_ref`` (always, when it is empty)."""
        if not self.allowed_keys:
            return True
        for pattern in self.allowed_keys:
            if pattern.endswith("*"):
                if key_ref.startswith(pattern[:-1]):
                    return True
            elif key_ref == pattern:
                return True
        return False

    def environ(self) -> dict[str, str]:
        """These settings as ``REKEY_*`` variables, for child processes (the dev stack's worker)."""
        env = {"REKEY_HOME": str(self.home.resolve())}
        for name in _FIELD_NAMES:
            value = getattr(self, name)
            if isinstance(value, tuple):
                if value:
                    env[f"REKEY_{name.upper()}"] = ",".join(value)
            elif value not in ("", None):
                env[f"REKEY_{name.upper()}"] = str(value)
        return env

    @property
    def openbao_dir(self) -> Path:
        return self.home / "openbao"

    @property
    def openbao_init_file(self) -> Path:
        """Unseal key and root token of the dev OpenBao (mode 0600, development only)."""
        return self.openbao_dir / "init.json"

    def resolved_vault_token(self) -> str:
        """The configured token, else the dev stack's root token, else empty."""
        if self.vault_token:
            return self.vault_token
        try:
            data = json.loads(self.openbao_init_file.read_text())
        except (OSError, ValueError):
            return ""
        token = data.get("root_token", "")
        return token if isinstance(token, str) else ""


_HOST: Final = re.compile(r"[A-Za-z0-9._-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\]")


def _shown(value: str) -> str:
    return repr(value[:80] + "…") if len(value) > 80 else repr(value)


def check_endpoint_url(name: str, value: str) -> str:
    """An endpoint setting (``vault_addr``, ``aws_endpoint``, ``azure_vault_url``): an
    ``http://`` or ``https://`` URL with a host and at most a port and a path; `ConfigError`
    naming the setting otherwise (an SDK would fail later with a message that names neither)."""
    try:
        parsed = urlsplit(value)
    except ValueError:  # an unclosed "[" of an IPv6 address
        parsed = urlsplit("")
    try:
        port = parsed.port
    except ValueError:  # not a number, or out of range
        port = -1
    host = parsed.netloc.rsplit(":", 1)[0] if port is not None else parsed.netloc
    if (
        parsed.scheme not in ("http", "https")
        or not _HOST.fullmatch(host)
        or not (port is None or 0 < port < 65536)
        or parsed.query
        or parsed.fragment
        or "@" in parsed.netloc
        or not value.isprintable()
        or " " in value
    ):
        raise ConfigError(f"{name} {_shown(value)} is not an http:// or https:// URL with a host (and port)")
    return value


def check_temporal_address(value: str) -> str:
    """``temporal_address``: ``host:port``; `ConfigError` otherwise."""
    host, sep, port = value.rpartition(":")
    if not (sep and _HOST.fullmatch(host) and port.isdigit() and port.isascii() and 0 < int(port) < 65536):
        raise ConfigError(f"temporal_address {_shown(value)} is not host:port (e.g. 127.0.0.1:7233)")
    return value


_REGION: Final = re.compile(r"(?![0-9]+$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


_MOUNT: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}(?:/[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}){0,7}")
_NAMESPACE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")


def check_temporal_namespace(value: str) -> str:
    """``temporal_namespace``: letters, digits, ``.``, ``_`` and ``-`` (``name.account`` on
    Temporal Cloud); `ConfigError` otherwise (the SDK would log the value unescaped)."""
    if not _NAMESPACE.fullmatch(value):
        raise ConfigError(f"temporal_namespace {_shown(value)} is not a namespace name (e.g. default)")
    return value


def check_aws_region(value: str) -> str:
    """``aws_region``: a non-empty host label; `ConfigError` otherwise. botocore raises its own
    InvalidRegionError for other text when it makes a client, and sends requests for an empty
    region that the endpoint cannot route (moto answers 500)."""
    if not _REGION.fullmatch(value):
        raise ConfigError(f"aws_region {_shown(value)} is not a region name (e.g. us-east-1)")
    return value


_TOKEN: Final = re.compile(r"[\x21-\x7e]*")


def check_token(name: str, value: str) -> str:
    """A token setting: empty, or printable ASCII without spaces (it travels in an HTTP
    header). `ConfigError` otherwise; the message never shows the value, which is a secret."""
    if not _TOKEN.fullmatch(value):
        raise ConfigError(
            f"{name} must be printable ASCII without spaces ({len(value)} characters given; not shown)"
        )
    return value


SIGNING_KEY_BACKENDS = ("vault", "aws")


def check_signing_key(value: object) -> str:
    """A ``signing_key`` setting: ``file``, ``vault:NAME`` or ``aws:KEYID`` (safe names, as key
    refs); `ConfigError` otherwise."""
    if value == "file":
        return "file"
    if isinstance(value, str):
        backend, sep, _name = value.partition(":")
        if sep and backend in SIGNING_KEY_BACKENDS:
            try:
                return str(KeyRef.parse(value))
            except InvalidKeyRef as exc:
                raise ConfigError(f"signing_key: {exc}") from None
    shown = value[:80] if isinstance(value, str) else value
    raise ConfigError(f"signing_key {shown!r} is not 'file', 'vault:NAME' or 'aws:KEYID'")


_PREFIX = re.compile(r"[A-Za-z0-9_./-]{0,128}")


def check_allowed_pattern(pattern: object) -> str:
    """An ``allowed_keys`` entry: a key ref, or ``backend:`` + a safe name prefix + ``*``."""
    if not isinstance(pattern, str):
        raise ConfigError(f"allowed_keys entries must be strings, got {pattern!r}")
    if pattern.endswith("*"):
        backend, sep, prefix = pattern[:-1].partition(":")
        if sep and backend in BACKENDS and _PREFIX.fullmatch(prefix):
            return pattern
        raise ConfigError(f"allowed_keys entry {pattern!r} is not a key ref or 'backend:prefix*'")
    try:
        KeyRef.parse(pattern)
    except InvalidKeyRef as exc:
        raise ConfigError(f"allowed_keys entry is not a key ref: {exc}") from None
    return pattern


_TUPLE_CHECKS = {"allowed_keys": check_allowed_pattern, "trusted_key_fingerprints": check_fingerprint}
_FIELD_TYPES = {f.name: f.type for f in fields(Settings)}
_FIELD_NAMES = [name for name in _FIELD_TYPES if name != "home"]


def _coerce(name: str, value: Any, source: str) -> Any:
    kind = _FIELD_TYPES[name]
    if kind == "int":
        try:
            port = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: {name} must be an integer, got {value!r}") from None
        if name.endswith("_port") and not 0 < port < 65536:
            raise ConfigError(f"{source}: {name} must be a port number (1-65535), got {port}")
        if name == "codec_min_format" and port not in (1, 2, 3):
            raise ConfigError(f"{source}: {name} must be 1, 2 or 3, got {port}")
        if name == "max_blob_bytes" and not 1 <= port <= MAX_BLOB_BYTES:
            raise ConfigError(f"{source}: {name} must be 1 to {MAX_BLOB_BYTES} (bytes), got {port}")
        return port
    if kind == "Path":
        return Path(str(value))
    if kind == "tuple[str, ...]":
        items = [part.strip() for part in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, list | tuple):
            raise ConfigError(f"{source}: {name} must be a list of strings, got {value!r}")
        check = _TUPLE_CHECKS[name]
        try:
            return tuple(check(item) for item in items if item != "")
        except (ConfigError, SigningError) as exc:
            raise ConfigError(f"{source}: {exc}") from None
    if not isinstance(value, str):
        raise ConfigError(f"{source}: {name} must be a string, got {value!r}")
    return value


ENV_PREFIX: Final = "REKEY_"
OTHER_VARIABLES: Final = frozenset({"REKEY_HOME"})
"""The ``REKEY_*`` variables that are not a setting's ``REKEY_<FIELD>``: only the home."""

_SETTING_LIKE = re.compile(r"REKEY_[A-Z0-9_]+")


def _closest(name: str, known: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to ``name``, or nothing."""
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f"; did you mean {match[0]!r}?" if match else ""


def check_environment(environ: Mapping[str, str]) -> None:
    """`ConfigError` for a variable that looks like a setting and is none: every name of the
    form ``REKEY_`` + upper-case letters, digits and ``_`` must be ``REKEY_<FIELD>`` of a field
    of `Settings` or ``REKEY_HOME`` (a typo such as ``REKEY_VAULT_ADR`` would else be ignored).
    Other names (lower or mixed case, no ``REKEY_`` prefix) are never read, so never checked."""
    known = [f"{ENV_PREFIX}{name.upper()}" for name in _FIELD_NAMES] + sorted(OTHER_VARIABLES)
    for variable in sorted(environ):
        if _SETTING_LIKE.fullmatch(variable) and variable not in known:
            raise ConfigError(f"unknown setting variable {variable}{_closest(variable, known)}")


def load_settings(
    home: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build settings for ``home`` (else ``REKEY_HOME``, else ``./.rekey``), which is created 0700
    if missing and refused (``InsecureHome``) if other users can write it (``secure_home``)."""
    env = os.environ if environ is None else environ
    home_path = Path(home) if home is not None else Path(env.get("REKEY_HOME", str(DEFAULT_HOME)))
    secure_home(home_path)
    values: dict[str, Any] = {}
    config_path = home_path / CONFIG_FILE
    if config_path.exists():
        try:
            document = tomllib.loads(config_path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"{config_path}: cannot read settings: {exc}") from None
        for key, value in document.items():
            if key == "home":
                raise ConfigError(
                    f"{config_path}: home cannot be set in {CONFIG_FILE} (use --home or REKEY_HOME)"
                )
            if key not in _FIELD_NAMES:
                raise ConfigError(f"{config_path}: unknown setting {key!r}{_closest(key, _FIELD_NAMES)}")
            values[key] = _coerce(key, value, str(config_path))
    check_environment(env)
    for name in _FIELD_TYPES:
        if name == "home":
            continue
        env_name = f"REKEY_{name.upper()}"
        if env_name in env:
            values[name] = _coerce(name, env[env_name], env_name)
    for name, value in overrides.items():
        if value is not None:
            values[name] = _coerce(name, value, f"--{name.replace('_', '-')}")
    return Settings(home=home_path, **values)
