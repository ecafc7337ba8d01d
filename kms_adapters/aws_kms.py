"""AWS KMS as a ``KmsAdapter`` (boto3) for ``aws:NAME``.

Two rotation modes, chosen per key at ``create`` and recorded on the KMS key(s) as tags, so any
worker reads it back (``rekey:key-ref``, ``rekey:rotation-mode``, ``rekey:version``):

``key-per-version`` (default)
    One SYMMETRIC_DEFAULT KMS key per version. ``alias/rekey/NAME`` points at the primary; each
    version also has its own alias ``alias/rekey-version/NAME/N``, so finding a version's key is
    one ``DescribeKey`` (which also returns its state) instead of listing every key in the account
    and reading each one's tags. (The version aliases live under their own prefix: with
    ``alias/rekey/NAME/vN`` the key named ``orders/v2`` would collide with version 2 of ``orders``.)
    ``rotate`` creates key N+1, aliases it, and moves the primary alias; ``disable_version`` is
    ``DisableKey``; ``destroy_below`` schedules deletion (7 days, ``cancel_destroy`` undoes it).

``native``
    One KMS key; ``rotate`` is ``RotateKeyOnDemand`` (at most 25 per key) and the version is
    1 + the number of rotations. KMS decrypts with old key material forever and cannot disable it,
    so ``disable_version`` and ``destroy_below`` of an old version are refused.

Wrapped DEKs are ``aws:v<N>:<base64 CiphertextBlob>``. In native mode KMS does not reveal which
rotation a ciphertext used; the prefix records the primary version read before the call (so it
can only understate the version, which at worst re-wraps a DEK once more).

Every SDK call goes through the endpoint's governor, which owns retries (boto3 retries are off);
SDK errors are mapped onto ``kms_adapters.errors`` with messages of our own. botocore's
``ConnectionError`` family (``EndpointConnectionError``, ``ConnectTimeoutError``, ``SSLError``,
``ProxyConnectionError``) means nothing was sent: ``Unavailable``. Its ``HTTPClientError`` family
(``ReadTimeoutError``, ``ConnectionClosedError``, ``ResponseStreamingError``), any other failure
after sending, and a 5xx may have been applied: ``AnswerLost``. Mutations (``CreateKey``,
``CreateAlias``, ``UpdateAlias``, ``RotateKeyOnDemand``, ``EnableKey``, ``DisableKey``,
``ScheduleKeyDeletion``, ``CancelKeyDeletion``) are sent with ``idempotent=False``: the governor
does not resend them after a lost answer. (A ``CreateKey`` whose answer was lost leaves an
unaliased, tagged KMS key behind; a resent ``CreateAlias`` would have found its own alias and
discarded the key it points at.)

The adapter also checks a version's key state itself before decrypting (cached for ``state_ttl``
seconds, refreshed by this adapter's own state changes): real KMS refuses a disabled or
pending-deletion key anyway, but emulators (moto) do not.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import boto3
from botocore.config import Config

from attestation.nitro import NitroVerifier
from kms_adapters.accounting import sdk_answered, sdk_sent
from kms_adapters.aws_errors import AlreadyExists, is_throttle_code, map_aws_error
from kms_adapters.aws_nitro import (
    NitroRelease,
    check_document,
    recipient_parameter,
    recipient_statement,
    release_from_answer,
    with_recipient_statement,
)
from kms_adapters.contract import (
    KeyInfo,
    KeyVersionInfo,
    RewrapOutcome,
    RotationMode,
    VersionState,
    rewrap_each,
)
from kms_adapters.errors import (
    AnswerLost,
    InvalidCiphertext,
    InvalidRequest,
    KmsError,
    NotFound,
    Unavailable,
    VersionDisabled,
)
from kms_adapters.governor import Governor, governor_for
from kms_adapters.keyref import InvalidKeyRef, check_name
from kms_adapters.release import (
    ReleaseGate,
    ReleasePolicy,
    ReleasePolicyStore,
    check_release,
)
from sealing.errors import InvalidWrappedKey
from sealing.keywrap import WrappedKey, parse_versioned_prefix

TAG_KEY_REF = "rekey:key-ref"
TAG_MODE = "rekey:rotation-mode"
TAG_VERSION = "rekey:version"
PENDING_WINDOW_DAYS = 7
MAX_ON_DEMAND_ROTATIONS = 25
MAX_PLAINTEXT = 4096  # KMS Encrypt limit

NATIVE_NOTE = (
    "native rotation cannot retire old key material: KMS decrypts with every earlier version for as "
    "long as the key exists, so old versions cannot be disabled or destroyed "
    "(create the key with rotation mode key-per-version to retire versions)"
)


_STATES: dict[str, VersionState] = {
    "Enabled": "enabled",
    "Disabled": "disabled",
    "PendingDeletion": "pending_deletion",
    "PendingReplicaDeletion": "pending_deletion",
}
_STATE_TEXT: dict[str, str] = {
    "disabled": "disabled",
    "pending_deletion": "scheduled for deletion",
    "destroyed": "destroyed",
}


@dataclass(frozen=True)
class _Version:
    version: int
    key_id: str
    arn: str
    state: VersionState
    created_at: datetime | None


@dataclass(frozen=True)
class _Primary:
    mode: RotationMode
    key_id: str
    arn: str
    version: int
    key_spec: str
    state: VersionState
    created_at: datetime | None
    rotation_dates: tuple[datetime | None, ...] = ()  # native: one per rotation, oldest first
    on_demand_rotations: int = 0


class AwsKmsAdapter(ReleaseGate):
    """``KmsAdapter`` over AWS KMS (or moto) for one key ``aws:NAME``."""

    backend = "aws"

    def __init__(
        self,
        name: str,
        *,
        endpoint_url: str | None,
        region: str,
        release_store: ReleasePolicyStore,
        credentials: dict[str, str] | None = None,
        governor: Governor | None = None,
        state_ttl: float = 5.0,
        batch_workers: int = 8,
        sdk_retries: bool = False,
        nitro_verifier: NitroVerifier | None = None,
    ) -> None:
        """``nitro_verifier``: what ``release_for_nitro`` checks documents with (default: one
        trusting the pinned AWS Nitro root).

        ``sdk_retries=True`` turns botocore's own ``standard`` retries back on (3 attempts,
        exponential backoff): only for measuring the governor against (``rekey stress run
        --strategy sdk-default``), paired with a ``PassThroughGovernor``; each HTTP attempt is
        reported to ``governor.accounting()``."""
        # AWS alias names allow [A-Za-z0-9:/_-]; ours are kms_adapters.keyref's safe names (no '.',
        # no empty segment, no leading or trailing '/', fullmatch so no trailing newline).
        try:
            check_name("aws", name)
        except InvalidKeyRef:
            raise InvalidRequest(
                f"aws key name {name!r} must be 1-128 of letters, digits, _ - in '/'-separated"
                " segments (AWS alias characters)"
            ) from None
        self.name = name
        self.key_ref = f"aws:{name}"
        self.release_store = release_store
        self._nitro = nitro_verifier or NitroVerifier()
        self.alias = f"alias/rekey/{name}"
        self._endpoint = endpoint_url or f"https://kms.{region}.amazonaws.com"
        self.governor = governor or governor_for(self._endpoint)
        self._state_ttl = state_ttl
        self._batch_workers = max(1, batch_workers)
        config = Config(
            retries={"mode": "standard"} if sdk_retries else {"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            max_pool_connections=max(10, self._batch_workers * 2),
        )
        self._client: Any = boto3.session.Session().client(
            "kms", region_name=region, endpoint_url=endpoint_url, config=config, **(credentials or {})
        )
        if sdk_retries:
            events = self._client.meta.events
            events.register("before-send.kms", _sdk_sent)
            events.register_first("needs-retry.kms", _sdk_answered)
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._primary_cache: tuple[_Primary, float] | None = None
        self._versions: dict[int, tuple[_Version, float]] = {}
        self._tags_by_arn: dict[str, dict[str, str]] = {}

    def version_alias(self, version: int) -> str:
        return f"alias/rekey-version/{self.name}/{version}"

    # ------------------------------------------------------------------ SDK plumbing

    def _call(self, op: str, *, idempotent: bool = True, **kwargs: Any) -> dict[str, Any]:
        """One SDK call through the governor; raises taxonomy errors only. ``idempotent=False``
        for mutations: never resent after an answer that may have been lost after applying."""
        method: Callable[..., Any] = getattr(self._client, op)

        def attempt() -> dict[str, Any]:
            try:
                response = method(**kwargs)
            except Exception as exc:  # every SDK failure becomes one of ours, without chaining
                raise map_aws_error(exc, op, self.key_ref) from None
            if not isinstance(response, dict):
                raise AnswerLost(f"AWS KMS gave an unexpected answer to {op.replace('_', ' ')}")
            return response

        return self.governor.call(attempt, op=f"kms:{op}", idempotent=idempotent)

    def _tags(self, key: str) -> dict[str, str]:
        """The tags of a KMS key (by id or ARN), cached: rekey's tags never change."""
        with self._lock:
            cached = self._tags_by_arn.get(key)
        if cached is not None:
            return cached
        tags: dict[str, str] = {}
        marker: str | None = None
        while True:
            kwargs: dict[str, Any] = {"KeyId": key}
            if marker:
                kwargs["Marker"] = marker
            page = self._call("list_resource_tags", **kwargs)
            for tag in page.get("Tags") or []:
                tags[str(tag.get("TagKey"))] = str(tag.get("TagValue", ""))
            marker = page.get("NextMarker") if page.get("Truncated") else None
            if not marker:
                break
        with self._lock:
            self._tags_by_arn[key] = tags
        return tags

    def _check_owner(self, tags: dict[str, str], what: str) -> None:
        if tags.get(TAG_KEY_REF) != self.key_ref:
            raise InvalidRequest(f"{what} points at a KMS key that rekey did not create for {self.key_ref}")

    def _fresh(self, at: float) -> bool:
        return time.monotonic() - at < self._state_ttl

    # ------------------------------------------------------------------ lookups

    def _primary(self, *, fresh: bool = False) -> _Primary:
        with self._lock:
            cached = self._primary_cache
        if cached is not None and not fresh:
            if self._fresh(cached[1]):
                return cached[0]
            # One thread refreshes an expired entry; the others keep using it meanwhile, so 16
            # threads do not spend 16 requests of a throttled quota on the same lookup.
            if not self._refresh_lock.acquire(blocking=False):
                return cached[0]
            try:
                return self._load_primary()
            finally:
                self._refresh_lock.release()
        return self._load_primary()

    def _load_primary(self) -> _Primary:
        meta = self._call("describe_key", KeyId=self.alias)["KeyMetadata"]
        arn, key_id = str(meta["Arn"]), str(meta["KeyId"])
        tags = self._tags(arn)
        self._check_owner(tags, self.alias)
        mode = tags.get(TAG_MODE)
        state = _STATES.get(str(meta.get("KeyState")), "disabled")
        common: dict[str, Any] = {
            "key_id": key_id,
            "arn": arn,
            "key_spec": str(meta.get("KeySpec") or meta.get("CustomerMasterKeySpec") or "SYMMETRIC_DEFAULT"),
            "state": state,
            "created_at": meta.get("CreationDate"),
        }
        if mode == "key-per-version":
            try:
                version = int(tags[TAG_VERSION])
            except (KeyError, ValueError):
                raise InvalidRequest(f"the primary KMS key of {self.key_ref} has no version tag") from None
            primary = _Primary(mode="key-per-version", version=version, **common)
        elif mode == "native":
            rotations = self._rotations(key_id)
            primary = _Primary(
                mode="native",
                version=1 + len(rotations),
                rotation_dates=tuple(r.get("RotationDate") for r in rotations),
                on_demand_rotations=sum(1 for r in rotations if r.get("RotationType") == "ON_DEMAND"),
                **common,
            )
        else:
            raise InvalidRequest(f"the KMS key of {self.key_ref} has no valid {TAG_MODE} tag")
        with self._lock:
            self._primary_cache = (primary, time.monotonic())
        return primary

    def _rotations(self, key_id: str) -> list[dict[str, Any]]:
        rotations: list[dict[str, Any]] = []
        marker: str | None = None
        while True:
            kwargs: dict[str, Any] = {"KeyId": key_id}
            if marker:
                kwargs["Marker"] = marker
            page = self._call("list_key_rotations", **kwargs)
            rotations.extend(page.get("Rotations") or [])
            marker = page.get("NextMarker") if page.get("Truncated") else None
            if not marker:
                break
        rotations.sort(
            key=lambda r: d.timestamp() if isinstance(d := r.get("RotationDate"), datetime) else 0.0
        )
        return rotations

    def _mode(self) -> RotationMode:
        return self._primary().mode  # immutable per key; the cached value is always right

    def _resolve(
        self, version: int, *, fresh: bool = False, primary_version: int | None = None
    ) -> _Version | None:
        """key-per-version: the KMS key of ``version``, or None if the key never had it.
        A version at or below the primary whose alias is gone was deleted: state ``destroyed``."""
        with self._lock:
            hit = self._versions.get(version)
        if hit is not None and not fresh:
            if self._fresh(hit[1]):
                return hit[0]
            if not self._refresh_lock.acquire(blocking=False):
                return hit[0]  # another thread is refreshing (see _primary)
            try:
                return self._load_version(version, hit, primary_version)
            finally:
                self._refresh_lock.release()
        return self._load_version(version, hit, primary_version)

    def _load_version(
        self, version: int, hit: tuple[_Version, float] | None, primary_version: int | None
    ) -> _Version | None:
        try:
            meta = self._call("describe_key", KeyId=self.version_alias(version))["KeyMetadata"]
        except NotFound:
            known = primary_version if primary_version is not None else self._primary(fresh=True).version
            if version > known:
                return None
            entry = _Version(version, "", "", "destroyed", None)
        else:
            arn = str(meta["Arn"])
            if hit is None or hit[0].arn != arn:
                tags = self._tags(arn)
                self._check_owner(tags, self.version_alias(version))
                if tags.get(TAG_VERSION) != str(version):
                    raise InvalidRequest(
                        f"{self.version_alias(version)} points at a KMS key not tagged as version {version}"
                    )
            entry = _Version(
                version,
                str(meta["KeyId"]),
                arn,
                _STATES.get(str(meta.get("KeyState")), "disabled"),
                meta.get("CreationDate"),
            )
        self._remember(entry)
        return entry

    def _remember(self, entry: _Version) -> None:
        with self._lock:
            self._versions[entry.version] = (entry, time.monotonic())

    def _version_of_arn(self, arn: str) -> int:
        tags = self._tags(arn)
        self._check_owner(tags, "the KMS answer")
        try:
            return int(tags[TAG_VERSION])
        except (KeyError, ValueError):
            raise InvalidRequest(f"a KMS key of {self.key_ref} has no version tag") from None

    def _source(self, version: int) -> str:
        """The ARN to decrypt ``version`` with; refuses versions that are not usable."""
        if self._mode() == "native":
            primary = self._primary()
            if version > primary.version:
                primary = self._primary(fresh=True)
            if version > primary.version:
                raise InvalidCiphertext(
                    f"wrapped key names version {version}, which {self.key_ref} never had"
                )
            if primary.state != "enabled":
                raise VersionDisabled(
                    f"the KMS key of {self.key_ref} is {_STATE_TEXT.get(primary.state, primary.state)}"
                )
            return primary.arn
        entry = self._resolve(version)
        if entry is None:
            raise InvalidCiphertext(f"wrapped key names version {version}, which {self.key_ref} never had")
        if entry.state != "enabled":
            raise VersionDisabled(
                f"version {version} of {self.key_ref} is {_STATE_TEXT.get(entry.state, entry.state)}"
            )
        return entry.arn

    # ------------------------------------------------------------------ wrapped-DEK format

    def _format(self, version: int, blob: Any) -> WrappedKey:
        if not isinstance(blob, (bytes, bytearray)) or not blob:
            raise Unavailable("AWS KMS returned no ciphertext")
        return WrappedKey(b"aws:v%d:" % version + base64.b64encode(bytes(blob)), version)

    @staticmethod
    def _parse(wrapped: bytes) -> tuple[int, bytes]:
        try:
            version, body = parse_versioned_prefix(bytes(wrapped), "aws")
            blob = base64.b64decode(body, validate=True)
        except (InvalidWrappedKey, binascii.Error, TypeError, ValueError):
            raise InvalidCiphertext("wrapped key is not an 'aws:v<N>:<base64>' ciphertext") from None
        if not blob:
            raise InvalidCiphertext("wrapped key has an empty ciphertext")
        return version, blob

    # ------------------------------------------------------------------ KeyWrapper

    def version_of(self, wrapped: bytes) -> int:
        return self._parse(wrapped)[0]

    def wrap(self, dek: bytes) -> WrappedKey:
        if not 1 <= len(dek) <= MAX_PLAINTEXT:
            raise InvalidRequest(f"a DEK must be 1-{MAX_PLAINTEXT} bytes")
        primary = self._primary()
        response = self._call("encrypt", KeyId=self.alias, Plaintext=bytes(dek))
        if primary.mode == "native":
            version = primary.version  # read before the call: never overstates the version
        else:
            version = self._version_of_arn(str(response.get("KeyId", "")))
        return self._format(version, response.get("CiphertextBlob"))

    def _decrypt(self, wrapped: bytes, **extra: Any) -> dict[str, Any]:
        version, blob = self._parse(wrapped)
        arn = self._source(version)
        response = self._call("decrypt", CiphertextBlob=blob, KeyId=arn, **extra)
        if str(response.get("KeyId", "")) != arn:
            raise InvalidCiphertext(f"wrapped key is not a ciphertext of {self.key_ref} version {version}")
        return response

    def unwrap(self, wrapped: bytes) -> bytes:
        plaintext = self._decrypt(wrapped).get("Plaintext")
        if not isinstance(plaintext, (bytes, bytearray)):
            raise Unavailable("AWS KMS returned no plaintext")
        return bytes(plaintext)

    def rewrap(self, wrapped: bytes) -> WrappedKey:
        version, blob = self._parse(wrapped)
        source = self._source(version)
        primary = self._primary()
        response = self._call(
            "re_encrypt", CiphertextBlob=blob, SourceKeyId=source, DestinationKeyId=self.alias
        )
        if str(response.get("SourceKeyId", "")) != source:
            # Real KMS refuses this itself (IncorrectKeyException); moto ignores SourceKeyId.
            raise InvalidCiphertext(f"wrapped key is not a ciphertext of {self.key_ref} version {version}")
        if primary.mode == "native":
            new_version = primary.version
        else:
            new_version = self._version_of_arn(str(response.get("KeyId", "")))
        return self._format(new_version, response.get("CiphertextBlob"))

    def rewrap_batch(self, wrapped: Sequence[bytes]) -> list[RewrapOutcome]:
        """KMS has no batch API: one ``ReEncrypt`` per item (see ``rewrap_each``)."""
        return rewrap_each(self.rewrap, wrapped, workers=self._batch_workers)

    # ------------------------------------------------------------------ key management

    def list_names(self) -> list[str]:
        """Names of every rekey-managed key in this account and region (by primary alias)."""
        names: list[str] = []
        marker: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Marker": marker} if marker else {}
            response = self._call("list_aliases", **kwargs)
            for alias in response.get("Aliases", []):
                name = str(alias.get("AliasName", ""))
                if name.startswith("alias/rekey/"):
                    names.append(name.removeprefix("alias/rekey/"))
            marker = response.get("NextMarker")
            if not response.get("Truncated") or not marker:
                return sorted(names)

    def describe(self) -> KeyInfo:
        primary = self._primary(fresh=True)
        policy = self.release_store.get(self.key_ref)
        versions: list[KeyVersionInfo] = []
        notes: list[str] = []
        if primary.mode == "native":
            dates = (primary.created_at, *primary.rotation_dates)
            for number in range(1, primary.version + 1):
                versions.append(
                    KeyVersionInfo(
                        number, primary.state, number == primary.version, dates[number - 1], primary.key_id
                    )
                )
            notes.append(NATIVE_NOTE)
        else:
            number = 1
            while True:
                entry = self._resolve(number, fresh=True, primary_version=primary.version)
                if entry is None:
                    break
                versions.append(
                    KeyVersionInfo(
                        number, entry.state, number == primary.version, entry.created_at, entry.key_id
                    )
                )
                if number > primary.version:
                    notes.append(
                        f"version {number} exists but is not primary (an interrupted rotation);"
                        " the next rotate makes it primary"
                    )
                number += 1
        return KeyInfo(
            key_ref=self.key_ref,
            key_type=primary.key_spec,
            rotation_mode=primary.mode,
            versions=tuple(versions),
            notes=tuple(notes),
            release_policy_id=policy.id if policy is not None else None,
        )

    def _new_key(self, mode: RotationMode, version: int | None) -> dict[str, Any]:
        tags = [{"TagKey": TAG_KEY_REF, "TagValue": self.key_ref}, {"TagKey": TAG_MODE, "TagValue": mode}]
        description = f"rekey {self.key_ref} ({mode})"
        if version is not None:
            tags.append({"TagKey": TAG_VERSION, "TagValue": str(version)})
            description = f"rekey {self.key_ref} v{version} ({mode})"
        meta: dict[str, Any] = self._call(
            "create_key",
            idempotent=False,
            Description=description,
            KeyUsage="ENCRYPT_DECRYPT",
            KeySpec="SYMMETRIC_DEFAULT",
            Tags=tags,
        )["KeyMetadata"]
        with self._lock:
            self._tags_by_arn[str(meta["Arn"])] = {t["TagKey"]: t["TagValue"] for t in tags}
        return meta

    def _discard(self, key_id: str) -> None:
        """Schedule deletion of a key we created but lost a race with (best effort)."""
        with contextlib.suppress(KmsError):
            self._call(
                "schedule_key_deletion",
                KeyId=key_id,
                PendingWindowInDays=PENDING_WINDOW_DAYS,
                idempotent=False,
            )

    def _ensure_version_key(self, version: int, primary_version: int) -> _Version:
        """key-per-version: the KMS key of ``version``, creating key and alias if missing. An
        existing alias (an interrupted or concurrent rotation) is adopted, not duplicated."""
        existing = self._resolve(version, fresh=True, primary_version=primary_version)
        if existing is not None:
            if existing.state != "enabled":
                raise InvalidRequest(
                    f"version {version} of {self.key_ref} exists but is {_STATE_TEXT[existing.state]}"
                )
            self._recipient_statement_on(existing.key_id)  # a retried rotation may have missed it
            return existing
        meta = self._new_key("key-per-version", version)
        key_id = str(meta["KeyId"])
        try:
            self._call(
                "create_alias", AliasName=self.version_alias(version), TargetKeyId=key_id, idempotent=False
            )
        except AlreadyExists:
            self._discard(key_id)
            adopted = self._resolve(version, fresh=True, primary_version=version)
            if adopted is None or adopted.state != "enabled":
                raise InvalidRequest(
                    f"version {version} of {self.key_ref} is being created elsewhere"
                ) from None
            return adopted
        entry = _Version(version, key_id, str(meta["Arn"]), "enabled", meta.get("CreationDate"))
        self._remember(entry)
        self._recipient_statement_on(key_id)
        return entry

    def _recipient_statement_on(self, key_id: str) -> None:
        """The release policy's ``recipient_statement`` on a version's new KMS key (idempotent)."""
        policy = self.release_store.get(self.key_ref)
        if policy is not None and recipient_statement(policy.policy) is not None:
            self._apply_recipient_statement(key_id, policy)

    def create(self, *, rotation_mode: RotationMode | None = None) -> tuple[KeyInfo, bool]:
        try:
            existing = self._primary(fresh=True)
        except NotFound:
            existing = None
        if existing is not None:
            if rotation_mode is not None and rotation_mode != existing.mode:
                raise InvalidRequest(
                    f"{self.key_ref} exists with rotation mode {existing.mode}, not {rotation_mode}"
                )
            return self.describe(), False
        mode: RotationMode = rotation_mode or "key-per-version"
        if mode == "key-per-version":
            target = self._ensure_version_key(1, primary_version=0).key_id
        else:
            target = str(self._new_key("native", None)["KeyId"])
        try:
            self._call("create_alias", AliasName=self.alias, TargetKeyId=target, idempotent=False)
        except AlreadyExists:  # another worker created it first
            if mode == "native":
                self._discard(target)
            return self.describe(), False
        with self._lock:
            self._primary_cache = None
        return self.describe(), True

    def rotate(self) -> KeyInfo:
        primary = self._primary(fresh=True)
        if primary.mode == "native":
            if primary.on_demand_rotations >= MAX_ON_DEMAND_ROTATIONS:
                raise InvalidRequest(
                    f"{self.key_ref} has had the maximum of {MAX_ON_DEMAND_ROTATIONS} on-demand rotations"
                )
            self._call("rotate_key_on_demand", KeyId=primary.key_id, idempotent=False)
        else:
            entry = self._ensure_version_key(primary.version + 1, primary_version=primary.version)
            self._call("update_alias", AliasName=self.alias, TargetKeyId=entry.key_id, idempotent=False)
        with self._lock:
            self._primary_cache = None
        return self.describe()

    def _retirable(self, action: str) -> _Primary:
        primary = self._primary(fresh=True)
        if primary.mode == "native":
            raise InvalidRequest(f"cannot {action} of {self.key_ref}: {NATIVE_NOTE}")
        return primary

    def _existing(self, version: int, primary: _Primary) -> _Version:
        entry = self._resolve(version, fresh=True, primary_version=primary.version)
        if entry is None:
            raise InvalidRequest(f"{self.key_ref} has no version {version}")
        return entry

    def _set_state(self, entry: _Version, state: VersionState) -> None:
        self._remember(_Version(entry.version, entry.key_id, entry.arn, state, entry.created_at))

    def disable_version(self, version: int) -> KeyInfo:
        primary = self._retirable(f"disable version {version}")
        if version == primary.version:
            raise InvalidRequest(f"version {version} is the primary version of {self.key_ref}; rotate first")
        entry = self._existing(version, primary)
        if entry.state == "enabled":
            self._call("disable_key", KeyId=entry.key_id, idempotent=False)
            self._set_state(entry, "disabled")
        return self.describe()

    def enable_version(self, version: int) -> KeyInfo:
        """Undo ``disable_version``."""
        primary = self._retirable(f"enable version {version}")
        entry = self._existing(version, primary)
        if entry.state in ("pending_deletion", "destroyed"):
            raise InvalidRequest(
                f"version {version} of {self.key_ref} is {_STATE_TEXT[entry.state]}; use cancel_destroy"
            )
        if entry.state != "enabled":
            self._call("enable_key", KeyId=entry.key_id, idempotent=False)
            self._set_state(entry, "enabled")
        return self.describe()

    def destroy_below(self, version: int) -> KeyInfo:
        if version <= 1:  # nothing below version 1
            return self.describe()
        primary = self._retirable(f"destroy versions below {version}")
        if version > primary.version:
            raise InvalidRequest(
                f"destroying below version {version} would destroy the primary version {primary.version}"
                f" of {self.key_ref}"
            )
        for number in range(1, version):
            entry = self._resolve(number, fresh=True, primary_version=primary.version)
            if entry is None or entry.state in ("pending_deletion", "destroyed"):
                continue
            self._call(
                "schedule_key_deletion",
                KeyId=entry.key_id,
                PendingWindowInDays=PENDING_WINDOW_DAYS,
                idempotent=False,
            )
            self._set_state(entry, "pending_deletion")
        return self.describe()

    def cancel_destroy(self, version: int) -> KeyInfo:
        """Roll back ``destroy_below`` for ``version`` while its deletion is pending:
        ``CancelKeyDeletion`` (which leaves the key disabled), then ``EnableKey``."""
        primary = self._retirable(f"restore version {version}")
        entry = self._existing(version, primary)
        if entry.state == "destroyed":
            raise InvalidRequest(f"version {version} of {self.key_ref} is deleted and cannot be restored")
        if entry.state == "pending_deletion":
            self._call("cancel_key_deletion", KeyId=entry.key_id, idempotent=False)
            self._set_state(entry, "disabled")
        self._call("enable_key", KeyId=entry.key_id, idempotent=False)
        self._set_state(entry, "enabled")
        return self.describe()

    # ------------------------------------------------------------------ attestation-gated release

    def set_release_policy(self, policy: ReleasePolicy) -> None:
        """Store the policy, then bring every version key's KMS key policy in line with its Nitro
        rules (``recipient_statement``): KMS itself then refuses to decrypt for a Nitro
        ``Recipient`` whose image is not allowed, whatever asks it."""
        super().set_release_policy(policy)
        primary = self._primary(fresh=True)
        if primary.mode == "native":
            self._apply_recipient_statement(primary.key_id, policy)
            return
        for number in range(1, primary.version + 1):
            entry = self._resolve(number, fresh=True, primary_version=primary.version)
            if entry is not None and entry.state in ("enabled", "disabled"):
                self._apply_recipient_statement(entry.key_id, policy)

    def _apply_recipient_statement(self, key_id: str, policy: ReleasePolicy | None) -> None:
        """Replace rekey's statement in the key's ``default`` key policy (and nothing else of it)."""
        current = self._call("get_key_policy", KeyId=key_id, PolicyName="default")["Policy"]
        updated = with_recipient_statement(current, policy)
        if updated is not None:
            self._call("put_key_policy", KeyId=key_id, PolicyName="default", Policy=updated)

    def release_for_nitro(
        self,
        wrapped: bytes,
        attestation_result: str,
        recipient_public_key: bytes,
        attestation_document: bytes,
        *,
        now: datetime | None = None,
    ) -> NitroRelease:
        """``release`` for a Nitro Enclave that sends its attestation document: the document is
        bound to the result before any KMS call (`kms_adapters.aws_nitro.check_document`), then
        KMS decrypts with it as ``Recipient`` (and enforces ``recipient_statement`` itself)."""
        when = now or datetime.now(UTC)
        policy = self.release_store.get(self.key_ref)
        result = check_release(policy, attestation_result, recipient_public_key, now=when)
        assert policy is not None  # check_release refuses a key without one  # nosec B101
        check_document(policy, result, recipient_public_key, attestation_document, self._nitro, when)
        response = self._decrypt(wrapped, Recipient=recipient_parameter(attestation_document))
        return release_from_answer(response, recipient_public_key)


def _sdk_sent(**_kwargs: Any) -> None:
    sdk_sent()


def _sdk_answered(response: Any = None, **_kwargs: Any) -> None:
    """botocore's ``needs-retry`` hook: called after every attempt's answer (or failure)."""
    code = ""
    if isinstance(response, tuple) and len(response) == 2 and isinstance(response[1], dict):
        code = str(response[1].get("Error", {}).get("Code", ""))
    sdk_answered(throttled=is_throttle_code(code))
