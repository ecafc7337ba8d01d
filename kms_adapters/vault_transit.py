"""Vault / OpenBao Transit as a ``KmsAdapter`` (hvac).

Wrapped DEKs are Transit ciphertexts (``vault:v<N>:<base64>``) stored as ASCII bytes; the
prefix names the key version, so ``version_of`` needs no server call. Re-wrap is Transit's
server-side ``rewrap``: a rotation never holds plaintext DEKs. Batch re-wrap sends at most
``BATCH_ITEMS`` items per request (OpenBao >= 2.5 refuses request bodies of more than 1,000
JSON strings) and reads each item's error, because a batch answers HTTP 200 even when items
fail.

Version states come from the key's metadata: below ``min_available_version`` a version is
destroyed (trimmed), below ``min_decryption_version`` disabled. Transit disables by raising
that minimum, so disabling version N disables every version up to N.

hvac has no retries and drops response headers (so a 429's Retry-After is not visible);
every call goes through the endpoint's governor, which owns retries. Errors are mapped onto
``kms_adapters.errors`` with messages of our own (hvac's embed URLs). A failure after the
request may have reached the server (a read timeout, the connection reset or closed before the
answer, a 5xx) is ``AnswerLost``; only a request that was never sent (connection refused, DNS, a
failed TLS handshake, a malformed URL) is a plain ``Unavailable``. Mutations (create, rotate,
the key configuration, trim) are sent with ``idempotent=False``: the governor does not resend
them after a lost answer.

Key names and the mount go into URL paths (``/v1/<mount>/decrypt/<name>``). hvac quotes them but
leaves ``/`` unescaped, and the HTTP stack collapses ``..``: a name ``x/../../../sys/seal`` once
reached ``/v1/sys/seal``. So the adapter accepts only a name that is one safe segment (see
``kms_adapters.keyref``) and a mount of safe ``/``-separated segments, each of which is its own
percent-encoding (``quote(segment, safe="")``) and never ``.`` or ``..``: whatever hvac then
quotes is exactly the percent-encoded segment, and no segment can climb out of the key's path.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast
from urllib.parse import quote

import hvac
import hvac.exceptions
import requests
import urllib3.exceptions

from kms_adapters.contract import KeyInfo, KeyVersionInfo, RewrapOutcome, RotationMode, VersionState
from kms_adapters.errors import (
    AnswerLost,
    InvalidCiphertext,
    InvalidRequest,
    KmsError,
    NotFound,
    PermissionDenied,
    Throttled,
    Unavailable,
    VersionDisabled,
)
from kms_adapters.governor import Governor, governor_for
from kms_adapters.keyref import check_name
from kms_adapters.release import ReleaseGate, ReleasePolicyStore
from sealing.keywrap import WrappedKey

BATCH_ITEMS = 490
T = TypeVar("T")

_MOUNT_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)*")


def path_segment(segment: str) -> str:
    """``segment`` percent-encoded for a URL path, refused (``InvalidRequest``) unless that is the
    segment itself and not a dot segment, so hvac's own quoting (which keeps ``/``) cannot differ."""
    if not segment or segment in (".", "..") or quote(segment, safe="") != segment:
        raise InvalidRequest(f"{segment!r} is not a safe URL path segment for OpenBao/Vault")
    return segment


def checked_mount(mount_point: str) -> str:
    """A Transit mount path: ``/``-separated safe segments, no empty, ``.`` or ``..`` segment."""
    if len(mount_point) > 256 or not all(
        _MOUNT_SEGMENT.fullmatch(part) and path_segment(part) for part in mount_point.split("/")
    ):
        raise InvalidRequest(
            f"transit mount {mount_point!r} must be '/'-separated segments of letters, digits, _ - ."
            " (no empty, '.' or '..' segment)"
        )
    return mount_point


def _message(exc: hvac.exceptions.VaultError) -> str:
    errors = getattr(exc, "errors", None)
    if isinstance(errors, list) and errors:
        return "; ".join(str(e) for e in errors)
    return str(exc).split(", on ")[0]


def classify(message: str, key: str, action: str) -> KmsError:
    """Map a Transit error text (request error or batch item error) onto the taxonomy."""
    if "encryption key not found" in message or "key not found" in message:
        return NotFound(f"transit key {key!r} does not exist")
    if "disallowed by policy" in message:
        return VersionDisabled(
            f"that version of transit key {key!r} is disabled (below its minimum decryption version)"
        )
    if "version is too new" in message:
        return InvalidCiphertext(f"wrapped key names a version transit key {key!r} never had")
    if "ciphertext" in message or "authentication failed" in message or "decode" in message:
        return InvalidCiphertext(f"wrapped key is not a valid ciphertext of transit key {key!r}")
    if "rate limit" in message:
        return Throttled(f"OpenBao/Vault throttled {action} on transit key {key!r}")
    return InvalidRequest(f"OpenBao/Vault refused to {action} with key {key!r}: {message}")


# requests raises these before anything is sent.
_UNSENT_REQUESTS = (
    requests.exceptions.ConnectTimeout,
    requests.exceptions.SSLError,  # the TLS handshake (urllib3 verifies while connecting)
    requests.exceptions.ProxyError,
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidHeader,
    requests.exceptions.URLRequired,
)
# urllib3 reasons inside requests' ConnectionError(MaxRetryError(reason)) that mean "not connected"
# (NewConnectionError covers refused connections and NameResolutionError).
_UNSENT_REASONS = (
    urllib3.exceptions.NewConnectionError,
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.SSLError,
    urllib3.exceptions.ProxyError,
)


def request_not_sent(exc: requests.exceptions.RequestException) -> bool:
    """Whether requests failed before the request could reach the server. Everything else
    (``ReadTimeout``, ``ConnectionError`` from a ``ProtocolError`` such as a reset or a closed
    connection, ``ChunkedEncodingError`` ...) may have been applied."""
    if isinstance(exc, _UNSENT_REQUESTS):
        return True
    if isinstance(exc, requests.exceptions.ConnectionError) and exc.args:
        cause = exc.args[0]
        if isinstance(cause, urllib3.exceptions.MaxRetryError):
            return isinstance(cause.reason, _UNSENT_REASONS)
        return isinstance(cause, _UNSENT_REASONS)
    return False


def _transport_error(exc: requests.exceptions.RequestException, addr: str, action: str) -> Unavailable:
    if request_not_sent(exc):
        return Unavailable(f"cannot reach OpenBao/Vault at {addr} to {action}")
    what = "read timeout" if isinstance(exc, requests.exceptions.Timeout) else "connection lost"
    return AnswerLost(
        f"no answer from OpenBao/Vault at {addr} to {action} ({what}): the request may have been applied"
    )


def _mapped(addr: str, key: str, action: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except requests.exceptions.RequestException as exc:
        raise _transport_error(exc, addr, action) from None
    except hvac.exceptions.Forbidden:
        raise PermissionDenied(
            f"OpenBao/Vault denied {action} on transit key {key!r} (check the token)"
        ) from None
    except hvac.exceptions.InvalidPath:
        raise NotFound(f"transit key {key!r} does not exist") from None
    except hvac.exceptions.RateLimitExceeded:
        raise Throttled(f"OpenBao/Vault throttled {action} on transit key {key!r}") from None
    except (
        hvac.exceptions.VaultDown,
        hvac.exceptions.InternalServerError,
        hvac.exceptions.BadGateway,
    ) as exc:  # a 5xx: the server may have applied the request before failing
        raise AnswerLost(
            f"OpenBao/Vault failed to {action} ({type(exc).__name__}): the request may have been applied"
        ) from None
    except hvac.exceptions.InvalidRequest as exc:
        raise classify(_message(exc), key, action) from None
    except hvac.exceptions.VaultError as exc:
        raise InvalidRequest(
            f"OpenBao/Vault could not {action} with key {key!r}: {type(exc).__name__}"
        ) from None


class VaultTransitAdapter(ReleaseGate):
    """``KmsAdapter`` over one Transit key (``vault:NAME``)."""

    backend = "vault"

    def __init__(
        self,
        client: hvac.Client,
        name: str,
        *,
        mount_point: str = "transit",
        release_store: ReleasePolicyStore,
        governor: Governor | None = None,
    ) -> None:
        self._client = client
        self.name = path_segment(check_name("vault", name))
        self.key_ref = f"vault:{name}"
        self._mount = checked_mount(mount_point)
        self.release_store = release_store
        self.governor = governor or governor_for(str(client.url))
        self._checked = False

    # ----------------------------------------------------------------------------- plumbing

    def _call(self, action: str, fn: Callable[[], T], *, idempotent: bool = True) -> T:
        return self.governor.call(
            lambda: _mapped(self._client.url, self.name, action, fn), op=action, idempotent=idempotent
        )

    def _data(self, action: str, fn: Callable[[], Any]) -> dict[str, Any]:
        response = self._call(action, fn)
        data = response.get("data") if isinstance(response, dict) else None
        if not isinstance(data, dict):
            raise Unavailable(f"OpenBao/Vault gave an unexpected answer to {action}")
        return data

    @property
    def _transit(self) -> Any:
        return self._client.secrets.transit

    def _ensure_exists(self) -> None:
        # Transit's encrypt endpoint creates missing keys on the fly; a typo in a key ref
        # must be an error, not a new key.
        if not self._checked:
            self.describe()
            self._checked = True

    def _wrapped(self, ciphertext: Any) -> WrappedKey:
        raw = str(ciphertext).encode("ascii")
        return WrappedKey(raw, self.version_of(raw))

    # ---------------------------------------------------------------------------- KeyWrapper

    def version_of(self, wrapped: bytes) -> int:
        # ``vault:v<N>:`` with N in 1..9999999999, as parse_versioned_prefix checks it, without
        # the regex and the copy of the rest: a re-wrap sweep calls this twice per blob.
        end = wrapped.find(b":", 7)
        if wrapped[:7] == b"vault:v" and end > 7:
            digits = wrapped[7:end]
            if len(digits) <= 10 and digits.isdigit() and digits[:1] != b"0":
                return int(digits)
        raise InvalidCiphertext("wrapped key is not a 'vault:v<N>:' ciphertext")

    def wrap(self, dek: bytes) -> WrappedKey:
        self._ensure_exists()
        plaintext = base64.b64encode(dek).decode("ascii")
        data = self._data(
            "wrap",
            lambda: self._transit.encrypt_data(name=self.name, plaintext=plaintext, mount_point=self._mount),
        )
        return self._wrapped(data["ciphertext"])

    def unwrap(self, wrapped: bytes) -> bytes:
        self.version_of(wrapped)
        text = wrapped.decode("ascii", errors="replace")
        data = self._data(
            "unwrap",
            lambda: self._transit.decrypt_data(name=self.name, ciphertext=text, mount_point=self._mount),
        )
        try:
            return base64.b64decode(str(data["plaintext"]), validate=True)
        except (KeyError, binascii.Error):
            raise Unavailable("OpenBao/Vault returned a malformed plaintext") from None

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        self.version_of(wrapped)
        text = wrapped.decode("ascii", errors="replace")
        data = self._data(
            "rewrap",
            lambda: self._transit.rewrap_data(name=self.name, ciphertext=text, mount_point=self._mount),
        )
        return self._wrapped(data["ciphertext"])

    def rewrap_batch(self, wrapped: Sequence[bytes]) -> list[RewrapOutcome]:
        # A re-wrap sweep spends a good part of its CPU here: one pass per item each way.
        outcomes: list[RewrapOutcome | None] = [None] * len(wrapped)
        version_of = self.version_of
        for start in range(0, len(wrapped), BATCH_ITEMS):
            batch: list[dict[str, str]] = []
            positions: list[int] = []
            for index in range(start, min(start + BATCH_ITEMS, len(wrapped))):
                item = wrapped[index]
                try:
                    version_of(item)
                except InvalidCiphertext as exc:
                    outcomes[index] = RewrapOutcome(index, error=exc)
                    continue
                batch.append({"ciphertext": item.decode("ascii", errors="replace")})
                positions.append(index)
            if not batch:
                continue
            data = self._data(
                "rewrap batch",
                lambda batch=batch: self._transit.rewrap_data(  # type: ignore[misc]
                    name=self.name, ciphertext="", batch_input=batch, mount_point=self._mount
                ),
            )
            results = data.get("batch_results")
            if not isinstance(results, list) or len(results) != len(batch):
                raise Unavailable("OpenBao/Vault answered a batch rewrap with the wrong number of results")
            for index, result in zip(positions, results, strict=True):
                text = result.get("ciphertext") if isinstance(result, dict) else None
                if not text:
                    message = (
                        str(result.get("error", "unknown error")) if isinstance(result, dict) else "bad item"
                    )
                    outcomes[index] = RewrapOutcome(index, error=classify(message, self.name, "rewrap"))
                    continue
                raw = text.encode("ascii") if isinstance(text, str) and text.isascii() else b""
                try:
                    outcomes[index] = RewrapOutcome(index, wrapped=WrappedKey(raw, version_of(raw)))
                except InvalidCiphertext:
                    raise Unavailable(
                        "OpenBao/Vault answered a batch rewrap with a malformed ciphertext"
                    ) from None
        return cast(list[RewrapOutcome], outcomes)

    # ------------------------------------------------------------------------ key management

    def list_names(self) -> list[str]:
        """Names of every Transit key on this mount (not only this adapter's)."""
        try:
            data = self._data("list keys", lambda: self._transit.list_keys(mount_point=self._mount))
        except NotFound:  # Transit answers 404 when the mount holds no keys
            return []
        return sorted(str(k) for k in data.get("keys", []))

    def describe(self) -> KeyInfo:
        data = self._data("read key", lambda: self._transit.read_key(name=self.name, mount_point=self._mount))
        latest = int(data["latest_version"])
        min_decrypt = int(data.get("min_decryption_version") or 1)
        min_available = int(data.get("min_available_version") or 0)
        created = data.get("keys", {})
        versions = []
        for version in range(1, latest + 1):
            state: VersionState
            if version < min_available:
                state = "destroyed"
            elif version < min_decrypt:
                state = "disabled"
            else:
                state = "enabled"
            stamp = created.get(str(version))
            # Symmetric keys report Unix seconds, asymmetric ones an RFC 3339 time.
            created_at = (
                datetime.fromtimestamp(stamp, UTC)
                if isinstance(stamp, int)
                else datetime.fromisoformat(stamp)
                if isinstance(stamp, str)
                else None
            )
            versions.append(KeyVersionInfo(version, state, version == latest, created_at))
        policy = self.release_store.get(self.key_ref)
        return KeyInfo(
            key_ref=self.key_ref,
            key_type=str(data.get("type", "")),
            rotation_mode="native",
            versions=tuple(versions),
            notes=("disabling version N disables every version up to N (min_decryption_version)",),
            release_policy_id=policy.id if policy else None,
        )

    def create(self, *, rotation_mode: RotationMode | None = None) -> tuple[KeyInfo, bool]:
        if rotation_mode not in (None, "native"):
            raise InvalidRequest("Transit keys rotate natively; rotation mode key-per-version is for AWS KMS")
        try:
            return self.describe(), False
        except NotFound:
            pass
        self._call(
            "create key",
            lambda: self._transit.create_key(
                name=self.name, key_type="aes256-gcm96", mount_point=self._mount
            ),
            idempotent=False,
        )
        return self.describe(), True

    def rotate(self) -> KeyInfo:
        self._call(
            "rotate key",
            lambda: self._transit.rotate_key(name=self.name, mount_point=self._mount),
            idempotent=False,
        )
        return self.describe()

    def _configure(self, action: str, **settings: int) -> None:
        self._call(
            action,
            lambda: self._transit.update_key_configuration(
                name=self.name, mount_point=self._mount, **settings
            ),
            idempotent=False,
        )

    def disable_version(self, version: int) -> KeyInfo:
        info = self.describe()
        if version >= info.primary_version:
            raise InvalidRequest(
                f"cannot disable the primary version {info.primary_version} of {self.key_ref}"
            )
        current = min((v.version for v in info.versions if v.state == "enabled"), default=version + 1)
        if version + 1 > current:
            # Transit refuses a min_decryption_version above a min_encryption_version that is
            # set (destroy_below pins it): a rotation after a destroy could never retire.
            data = self._data(
                "read key", lambda: self._transit.read_key(name=self.name, mount_point=self._mount)
            )
            if 0 < int(data.get("min_encryption_version") or 0) < version + 1:
                self._configure("pin encryption version", min_encryption_version=info.primary_version)
            self._configure("disable version", min_decryption_version=version + 1)
        return self.describe()

    def destroy_below(self, version: int) -> KeyInfo:
        info = self.describe()
        if version > info.primary_version:
            raise InvalidRequest(
                f"cannot destroy the primary version {info.primary_version} of {self.key_ref}"
            )
        # trim needs both minimums set and at or above the trim point. Two calls: hvac refuses
        # min_encryption_version == min_decryption_version in one call, which the server allows.
        first_enabled = next(v.version for v in info.versions if v.state == "enabled")
        self._configure("disable versions", min_decryption_version=max(version, first_enabled))
        self._configure("pin encryption version", min_encryption_version=info.primary_version)
        self._call(
            "trim key",
            lambda: self._transit.trim_key(name=self.name, min_version=version, mount_point=self._mount),
            idempotent=False,
        )
        return self.describe()

    def enable_version(self, version: int) -> KeyInfo:
        """Make ``version`` decryptable again: lower ``min_decryption_version`` to it (which
        enables every version from it on, the way disabling disables every version up to N).
        Refused for a destroyed (trimmed) version."""
        info = self.describe()
        state = info.state_of(version)
        if state is None:
            raise InvalidRequest(f"{self.key_ref} has no version {version}")
        if state == "destroyed":
            raise InvalidRequest(f"version {version} of {self.key_ref} is destroyed (trimmed)")
        if state == "disabled":
            self._configure("enable version", min_decryption_version=version)
            return self.describe()
        return info
