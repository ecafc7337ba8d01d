"""Request routing: which operation answers a method and path of the REST API, and the
``/_emulator/*`` endpoints (stats, health, config) that need no token."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from emulators.azure_keyvault.crypto import CRYPTO_OPERATIONS, CryptoOperations
from emulators.azure_keyvault.keys import KeyOperations
from emulators.azure_keyvault.release import KeyRelease
from emulators.azure_keyvault.throttle import SustainedLoad, Throttle
from emulators.azure_keyvault.wire import ApiError

__all__ = ["Answer", "Router"]

#: An answer before it goes on the wire: HTTP status and JSON body (None: no body).
Answer = tuple[int, dict[str, Any] | None]

_KEY_NAME = re.compile(r"[0-9A-Za-z-]{1,127}")


def _bad_method(method: str) -> ApiError:
    return ApiError(405, "MethodNotAllowed", f"The requested method {method} is not allowed here.")


def _expect(method: str, wanted: str, fn: Callable[[], dict[str, Any] | Answer]) -> Answer:
    if method != wanted:
        raise _bad_method(method)
    result = fn()
    return result if isinstance(result, tuple) else (200, result)


def _json(body: bytes) -> dict[str, Any]:
    if not body:
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise ApiError(400, "BadParameter", "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ApiError(400, "BadParameter", "The request body must be a JSON object.")
    return data


class Router:
    """Maps a request (method, decoded path segments, query, body) to one operation's answer."""

    def __init__(
        self, keys: KeyOperations, crypto: CryptoOperations, release: KeyRelease, throttle: Throttle
    ) -> None:
        self._keys = keys
        self._crypto = crypto
        self._release = release
        self._throttle = throttle

    def route(
        self,
        method: str,
        seg: list[str],
        query: Mapping[str, list[str]],
        body: bytes,
        base: str,
        api_version: str,
    ) -> Answer:
        """The answer to an authorised REST request; raises :class:`ApiError` for error answers."""
        keys = self._keys
        n = len(seg)
        if seg[:1] == ["rng"] and n == 1:
            return _expect(method, "POST", lambda: self._crypto.random_bytes(_json(body)))
        if seg[:1] == ["keys"]:
            if n == 1:
                return _expect(method, "GET", lambda: keys.list_keys(query, base, api_version))
            name = seg[1]
            if not _KEY_NAME.fullmatch(name):
                raise ApiError(400, "BadParameter", f"The request URI contains an invalid name: {name}")
            if n == 2:
                if method == "DELETE":
                    return 200, keys.delete(name, base)
                if method == "GET":
                    return 200, keys.get(name, "", base)
                if method == "PUT":
                    raise ApiError(400, "BadParameter", "import is not supported by this emulator")
                raise _bad_method(method)
            action = seg[2]
            if n == 3:
                if action == "create":
                    return _expect(method, "POST", lambda: keys.create(name, _json(body), base))
                if action == "rotate":
                    return _expect(method, "POST", lambda: keys.rotate(name, base))
                if action == "versions":
                    return _expect(method, "GET", lambda: keys.list_versions(name, query, base, api_version))
                if action == "rotationpolicy":
                    if method == "GET":
                        return 200, keys.get_rotation_policy(name, base)
                    if method == "PUT":
                        return 200, keys.put_rotation_policy(name, _json(body), base)
                    raise _bad_method(method)
                if action in ("backup", "restore"):
                    raise ApiError(400, "BadParameter", f"{action} is not supported by this emulator")
                if method == "GET":
                    return 200, keys.get(name, action, base)
                if method == "PATCH":
                    return 200, keys.update(name, action, _json(body), base)
                raise _bad_method(method)
            if n == 4:
                op = seg[3].lower()
                if op in CRYPTO_OPERATIONS:
                    return _expect(
                        method, "POST", lambda: self._crypto.run(name, action, op, _json(body), base)
                    )
                if op == "release":
                    return _expect(
                        method,
                        "POST",
                        lambda: self._release.release(name, action, _json(body), base, api_version),
                    )
                raise ApiError(400, "BadParameter", f"operation {seg[3]} is not supported by this emulator")
        if seg[:1] == ["deletedkeys"]:
            if n == 1:
                return _expect(method, "GET", lambda: keys.list_deleted(query, base, api_version))
            name = seg[1]
            if n == 2:
                if method == "GET":
                    return 200, keys.get_deleted(name, base)
                if method == "DELETE":
                    return keys.purge(name)
                raise _bad_method(method)
            if n == 3 and seg[2] == "recover":
                return _expect(method, "POST", lambda: keys.recover(name, base))
        raise ApiError(404, "NotFound", f"no such resource: /{'/'.join(seg)}")

    def admin(self, method: str, segments: list[str], body: bytes) -> Answer:
        """``/_emulator/{stats,stats/reset,config,health}``; raises :class:`ApiError` otherwise.

        ``POST /_emulator/config`` takes ``{"limits": {CLASS: N}, "retry_after": bool,
        "sustained": {PARAM: N} | null}`` (each optional)."""
        route = "/".join(segments)
        if method == "GET" and route == "stats":
            return 200, self._throttle.stats()
        if method == "GET" and route == "health":
            return 200, {"status": "ok"}
        if method == "POST" and route == "stats/reset":
            self._throttle.reset_stats()
            return 200, self._throttle.stats()
        if method == "POST" and route == "config":
            try:
                config = json.loads(body or b"{}")
                if not isinstance(config, dict):
                    raise ValueError("the body must be a JSON object")
                if "limits" in config:
                    self._throttle.set_limits({str(k): float(v) for k, v in dict(config["limits"]).items()})
                if "retry_after" in config:
                    self._throttle.retry_after = bool(config["retry_after"])
                if "sustained" in config:
                    sustained = config["sustained"]
                    if sustained is not None and not isinstance(sustained, dict):
                        raise ValueError("sustained must be a JSON object of parameters or null")
                    self._throttle.set_sustained(
                        None if sustained is None else SustainedLoad.from_mapping(sustained)
                    )
            except (ValueError, TypeError) as exc:
                raise ApiError(400, "BadParameter", str(exc)) from None
            return 200, self._throttle.stats()
        raise ApiError(404, "NotFound", f"no emulator endpoint {method} /_emulator/{route}")
