"""Secure Key Release: release policies (validation and evaluation against a token's claims), the
attestation token checks, and the released key as a signed JWS (see
docs/azure-keyvault-emulator.md)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap_with_padding

from emulators.azure_keyvault import render
from emulators.azure_keyvault.state import KeyMaterial, KeyStore, KeyVersion
from emulators.azure_keyvault.throttle import Throttle
from emulators.azure_keyvault.wire import ApiError, b64u, unb64u, unix_now

__all__ = ["AttestationVerifier", "KeyRelease", "load_verifier", "parse_release_policy", "satisfies"]

#: The public key that signs the attestation tokens the emulator trusts.
AttestationVerifier = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

_POLICY_CONTENT_TYPE = "application/json; charset=utf-8"
_RELEASE_ENC: dict[str, hashes.HashAlgorithm] = {
    "CKM_RSA_AES_KEY_WRAP": hashes.SHA1(),  # noqa: S303 - PKCS#11's CKM_RSA_AES_KEY_WRAP is OAEP-SHA1  # nosec B303
    "RSA_AES_KEY_WRAP_256": hashes.SHA256(),
    "RSA_AES_KEY_WRAP_384": hashes.SHA384(),
}


# ---------------------------------------------------------------------------------------------
# Release policies
# ---------------------------------------------------------------------------------------------


def _validate_policy(node: object, depth: int = 0) -> None:
    if depth > 8:
        raise ValueError("nested too deeply")
    if not isinstance(node, dict):
        raise ValueError("every rule must be an object")
    if "claim" in node:
        if not isinstance(node["claim"], str) or not node["claim"]:
            raise ValueError("claim must be a non-empty string")
        if "equals" not in node:
            raise ValueError(f"condition on {node['claim']!r} needs 'equals' (the only operator supported)")
        return
    groups = [key for key in ("anyOf", "allOf") if key in node]
    if len(groups) != 1 or not isinstance(node[groups[0]], list) or not node[groups[0]]:
        raise ValueError("a rule needs exactly one non-empty anyOf or allOf list, or a claim condition")
    if "authority" in node and not isinstance(node["authority"], str):
        raise ValueError("authority must be a string")
    for child in node[groups[0]]:
        _validate_policy(child, depth + 1)


def parse_release_policy(policy: object) -> dict[str, Any]:
    """Validate a release policy as sent on the wire (``{"contentType", "data", "immutable"}``)."""
    if not isinstance(policy, dict):
        raise ApiError(400, "BadParameter", "release_policy must be an object")
    raw = unb64u(policy.get("data"), "release_policy.data")
    try:
        document = json.loads(raw)
        if not isinstance(document, dict) or not isinstance(document.get("version"), str):
            raise ValueError("the policy needs a version string")
        _validate_policy({k: v for k, v in document.items() if k != "version"})
    except ValueError as exc:
        raise ApiError(400, "BadParameter", f"Invalid key release policy: {exc}") from None
    return {
        "contentType": str(policy.get("contentType") or _POLICY_CONTENT_TYPE),
        "data": b64u(raw),
        "immutable": bool(policy.get("immutable", False)),
    }


def _claim(claims: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    if name in claims:
        return True, claims[name]
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return isinstance(expected, bool) and isinstance(actual, bool) and expected is actual
    return bool(expected == actual)


def satisfies(node: Mapping[str, Any], claims: Mapping[str, Any], reasons: list[str]) -> bool:
    """Whether ``claims`` satisfy the policy rule ``node``; why not is appended to ``reasons``."""
    if "claim" in node:
        found, value = _claim(claims, node["claim"])
        if not found:
            reasons.append(f"claim {node['claim']} is missing")
            return False
        if not _same(node["equals"], value):
            reasons.append(f"claim {node['claim']} is {value!r}, not {node['equals']!r}")
            return False
        return True
    authority = node.get("authority")
    if isinstance(authority, str):
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or issuer.rstrip("/") != authority.rstrip("/"):
            reasons.append(f"token issuer {issuer!r} is not the authority {authority!r}")
            return False
    if "anyOf" in node:
        return any(satisfies(child, claims, reasons) for child in node["anyOf"])
    return all(satisfies(child, claims, reasons) for child in node["allOf"])


def load_verifier(source: str | os.PathLike[str] | bytes | None) -> AttestationVerifier | None:
    """The attestation verifier from a PEM file or PEM bytes (None: check no signatures)."""
    if source is None:
        return None
    pem = source if isinstance(source, bytes) else Path(source).read_bytes()
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise ValueError("the attestation verifier key must be an EC or RSA public key (PEM)")
    return key


# ---------------------------------------------------------------------------------------------
# The release operation
# ---------------------------------------------------------------------------------------------


class KeyRelease:
    """``POST /keys/{name}/{version}/release``: checks the target token against the key's policy
    and answers the key as a JWS signed by the emulator's release-signing key."""

    def __init__(self, store: KeyStore, throttle: Throttle, verifier: AttestationVerifier | None) -> None:
        self.verifier = verifier
        self._store = store
        self._throttle = throttle
        self._signing_key: rsa.RSAPrivateKey | None = None
        self._signing_chain: list[str] = []

    def load_signing_key(self, key_file: Path, cert_file: Path) -> None:
        """Sign releases with this RSA key; ``cert_file`` holds its certificate and the CA."""
        signing = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(signing, rsa.RSAPrivateKey):
            raise RuntimeError("the release-signing key is not an RSA key")
        self._signing_key = signing
        self._signing_chain = [
            base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")
            for cert in x509.load_pem_x509_certificates(cert_file.read_bytes())
        ]

    def release(
        self, name: str, version: str, body: dict[str, Any], base: str, api_version: str
    ) -> dict[str, Any]:
        with self._store.lock:
            v = self._store.lookup(name, version)
            key = self._store.material(v)
        self._throttle.take("release")
        if not v.enabled:
            raise ApiError(
                403, "Forbidden", "Operation release is not allowed on a disabled key.", inner="KeyDisabled"
            )
        if not v.exportable:
            raise ApiError(
                400,
                "BadParameter",
                f"Key {name}/{v.id} is not exportable; only exportable keys are released.",
            )
        if v.release_policy is None:
            raise ApiError(400, "BadParameter", f"Key {name}/{v.id} has no release policy.")
        claims = self._target_claims(body.get("target"))
        policy = json.loads(unb64u(v.release_policy["data"], "release policy"))
        reasons: list[str] = []
        if not satisfies({k: x for k, x in policy.items() if k != "version"}, claims, reasons):
            raise ApiError(
                403,
                "Forbidden",
                "Target environment attestation statement does not satisfy the key release policy: "
                + "; ".join(reasons[:5]),
            )
        enc = body.get("enc") or "CKM_RSA_AES_KEY_WRAP"
        if enc not in _RELEASE_ENC:
            raise ApiError(400, "BadParameter", f"enc {enc!r} is not supported")
        released_jwk = self._released_jwk(name, v, key, base, claims, str(enc))
        request: dict[str, Any] = {"api-version": api_version, "enc": enc, "kid": released_jwk["kid"]}
        if body.get("nonce"):
            request["nonce"] = body["nonce"]
        released: dict[str, Any] = {
            "key": released_jwk,
            "attributes": render.attributes(v),
            "release_policy": v.release_policy,
        }
        if v.tags:
            released["tags"] = dict(v.tags)
        payload = {"request": request, "response": {"key": released}, "iat": unix_now()}
        assert self._signing_key is not None  # typing only  # nosec B101
        cert_der = base64.b64decode(self._signing_chain[0])
        headers = {
            "x5c": self._signing_chain,
            "x5t#S256": b64u(hashlib.sha256(cert_der).digest()),
            "kid": b64u(hashlib.sha256(cert_der).digest()),
        }
        return {"value": jwt.encode(payload, self._signing_key, algorithm="RS256", headers=headers)}

    def _target_claims(self, token: object) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise ApiError(400, "BadParameter", "target (the attestation token) is required")
        options: Any = {
            "verify_aud": False,
            "verify_iat": False,
            "verify_exp": True,
            "verify_nbf": True,
        }
        verifier = self.verifier
        try:
            if verifier is None:
                unsigned: Any = {**options, "verify_signature": False}
                claims = jwt.decode(token, options=unsigned, leeway=60)
            else:
                header = jwt.get_unverified_header(token)
                allowed = (
                    ["ES256", "ES384", "ES512"]
                    if isinstance(verifier, ec.EllipticCurvePublicKey)
                    else ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
                )
                if header.get("alg") not in allowed:
                    raise jwt.InvalidAlgorithmError(f"algorithm {header.get('alg')!r} is not allowed")
                claims = jwt.decode(token, verifier, algorithms=allowed, options=options, leeway=60)
        except jwt.PyJWTError as exc:
            raise ApiError(
                403, "Forbidden", f"Target environment attestation statement cannot be verified: {exc}"
            ) from None
        if not isinstance(claims, dict):
            raise ApiError(403, "Forbidden", "Target environment attestation statement is not a JSON object.")
        return claims

    def _released_jwk(
        self,
        name: str,
        v: KeyVersion,
        key: KeyMaterial,
        base: str,
        claims: Mapping[str, Any],
        enc: str,
    ) -> dict[str, Any]:
        runtime = claims.get("x-ms-runtime")
        target: dict[str, Any] | None = None
        if isinstance(runtime, dict) and isinstance(runtime.get("keys"), list):
            target = next(
                (
                    k
                    for k in runtime["keys"]
                    if isinstance(k, dict) and k.get("kty") == "RSA" and "n" in k and "e" in k
                ),
                None,
            )
        if target is None:  # no key to wrap to: the material goes out in the clear (emulator only)
            return render.jwk(name, v, key, base, private=True)
        try:
            public = rsa.RSAPublicNumbers(
                int.from_bytes(unb64u(target["e"], "e"), "big"),
                int.from_bytes(unb64u(target["n"], "n"), "big"),
            ).public_key()
        except ValueError:
            raise ApiError(400, "BadParameter", "x-ms-runtime.keys holds an invalid RSA key") from None
        if isinstance(key, rsa.RSAPrivateKey):
            material = key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        else:
            material = key
        digest = _RELEASE_ENC[enc]
        transport = secrets.token_bytes(32)
        wrapped = public.encrypt(
            transport, padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)
        ) + aes_key_wrap_with_padding(transport, material)
        blob = {
            "schema_version": "1.0",
            "header": {"kid": str(target.get("kid", "")), "alg": "dir", "enc": enc},
            "ciphertext": b64u(wrapped),
            "generator": "rekey Azure Key Vault emulator",
        }
        answer = render.jwk(name, v, key, base)
        answer["key_hsm"] = b64u(json.dumps(blob).encode())
        return answer
