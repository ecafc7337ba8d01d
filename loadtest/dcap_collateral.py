"""A cost model for the attestation benchmark: the collateral an Intel DCAP quote verifier checks.

The sim platform's chain is one certificate signed by one P-256 root, about 0.1 ms to verify:
cheaper than the per-evidence work (the evidence signature and a result token), so caching it can
never make a storm more than about twice as fast. A DCAP (SGX, TDX) quote verifier without a chain
cache checks, for every quote, besides the quote's own signature by the attestation key:

1. the Intel SGX Root CA: the pinned certificate, and its self-signature;
2. the PCK Platform CA certificate, signed by the root;
3. the PCK certificate (the platform's key, carried in the quote), signed by the Platform CA;
4. the TCB Signing certificate, signed by the root;
5. the root CA's CRL, signed by the root: neither the Platform CA nor the TCB Signing certificate
   is revoked;
6. the PCK Platform CA's CRL, signed by the Platform CA: the PCK certificate is not revoked;
7. the TCB Info document (JSON, about 18 KB for an SGX FMSPC with 14 TCB levels), signed by the
   TCB Signing key, not past its ``nextUpdate``; the quote's CPU SVN then picks a TCB level;
8. the QE Identity document (JSON), signed by the TCB Signing key: the quoting enclave's
   MRSIGNER, product id and ISV SVN are the ones Intel lists;
9. the QE report, signed by the PCK key, which certifies the attestation key.

All of them are ECDSA P-256 with SHA-256, as Intel's are. ``HostCollateral`` is that set for one
sim host, generated with real keys; ``HostCollateral.check`` performs checks 1-8 for real (the
signatures, the validity periods, the CRL look-ups, the JSON parsing and the QE Identity
comparison) and returns the parsed TCB levels; the sim platform certificate, signed by the host's
root and certifying the key that signs evidence, stands in for check 9. ``tcb_status`` matches a
CPU SVN against the levels, per evidence (on DCAP the CPU SVN is in each quote).

What is not modelled: fetching collateral (PCCS or Intel PCS round trips, which a verifier without
a cache pays per quote and which cost far more than the signatures), and the SGX PCK certificate's
SGX extensions (FMSPC, PCE id), whose parsing costs microseconds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from attestation.errors import ChainInvalid

__all__ = ["HostCollateral", "TcbLevel", "make_collateral", "make_root", "tcb_status"]

TCB_LEVELS = 14  # an SGX FMSPC's TCB Info lists about this many
QE_MRSIGNER = bytes.fromhex("8c4f5775d796503e96137f77c68a829a0056ac8ded70140b081b094490c57bff")
QE_PRODUCT_ID = 1
QE_SVN = 8
_VALIDITY = timedelta(days=365)
_ECDSA = ec.ECDSA(hashes.SHA256())


@dataclass(frozen=True)
class TcbLevel:
    cpu_svn: bytes  # 16 component SVNs
    status: str


@dataclass(frozen=True)
class HostCollateral:
    """DER certificates and CRLs, signed JSON documents and a signed QE report, for one host."""

    root_der: bytes
    platform_ca_der: bytes
    pck_der: bytes
    tcb_signing_der: bytes
    root_crl_der: bytes
    pck_crl_der: bytes
    tcb_info: bytes
    tcb_info_signature: bytes
    qe_identity: bytes
    qe_identity_signature: bytes

    def check(self, trusted_root_der: bytes, at: datetime) -> tuple[tuple[TcbLevel, ...], datetime]:
        """Checks 1-8 (module docstring) at ``at``; returns the TCB levels and when the collateral
        stops being valid. Raises ``ChainInvalid``."""
        if self.root_der != trusted_root_der:
            raise ChainInvalid("the collateral's root is not the trusted root")
        try:
            root, platform_ca, pck, tcb_signing = (
                x509.load_der_x509_certificate(der)
                for der in (self.root_der, self.platform_ca_der, self.pck_der, self.tcb_signing_der)
            )
        except ValueError:
            raise ChainInvalid("a collateral certificate cannot be read") from None
        try:
            root.verify_directly_issued_by(root)
            platform_ca.verify_directly_issued_by(root)
            pck.verify_directly_issued_by(platform_ca)
            tcb_signing.verify_directly_issued_by(root)
        except (InvalidSignature, ValueError, TypeError):
            raise ChainInvalid("a collateral certificate does not chain to the root") from None
        for cert in (root, platform_ca, pck, tcb_signing):
            if not cert.not_valid_before_utc <= at <= cert.not_valid_after_utc:
                raise ChainInvalid("a collateral certificate is not valid now")
        not_after = min(c.not_valid_after_utc for c in (root, platform_ca, pck, tcb_signing))
        for crl_der, issuer, subjects in (
            (self.root_crl_der, root, (platform_ca, tcb_signing)),
            (self.pck_crl_der, platform_ca, (pck,)),
        ):
            try:
                crl = x509.load_der_x509_crl(crl_der)
            except ValueError:
                raise ChainInvalid("a CRL cannot be read") from None
            public_key = issuer.public_key()
            if not isinstance(public_key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(
                public_key
            ):
                raise ChainInvalid("a CRL is not signed by its issuer")
            next_update = crl.next_update_utc
            if next_update is None or at > next_update:
                raise ChainInvalid("a CRL is out of date")
            not_after = min(not_after, next_update)
            for subject in subjects:
                if crl.get_revoked_certificate_by_serial_number(subject.serial_number) is not None:
                    raise ChainInvalid("a collateral certificate is revoked")
        signing_key = tcb_signing.public_key()
        if not isinstance(signing_key, ec.EllipticCurvePublicKey):
            raise ChainInvalid("the TCB Signing key is not an EC key")
        try:
            signing_key.verify(self.tcb_info_signature, self.tcb_info, _ECDSA)
            signing_key.verify(self.qe_identity_signature, self.qe_identity, _ECDSA)
        except InvalidSignature:
            raise ChainInvalid("TCB Info or QE Identity is not signed by the TCB Signing key") from None
        tcb_info = json.loads(self.tcb_info)["tcbInfo"]
        next_update = datetime.fromisoformat(tcb_info["nextUpdate"])
        if at > next_update:
            raise ChainInvalid("the TCB Info is out of date")
        qe = json.loads(self.qe_identity)["enclaveIdentity"]
        if (bytes.fromhex(qe["mrsigner"]), qe["isvprodid"], qe["tcbLevels"][0]["tcb"]["isvsvn"]) != (
            QE_MRSIGNER,
            QE_PRODUCT_ID,
            QE_SVN,
        ):
            raise ChainInvalid("the quoting enclave is not the one Intel lists")
        levels = tuple(
            TcbLevel(
                bytes(c["svn"] for c in level["tcb"]["sgxtcbcomponents"]),
                level["tcbStatus"],
            )
            for level in tcb_info["tcbLevels"]
        )
        return levels, min(not_after, next_update)


def tcb_status(levels: tuple[TcbLevel, ...], cpu_svn: bytes) -> str:
    """The status of the first (highest) level whose every component SVN the CPU SVN reaches."""
    for level in levels:
        if all(have >= need for have, need in zip(cpu_svn, level.cpu_svn, strict=True)):
            return level.status
    return "Revoked"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    now: datetime,
    *,
    ca: bool,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(issuer_key, hashes.SHA256())
    )


def _crl(issuer: x509.Certificate, key: ec.EllipticCurvePrivateKey, now: datetime, revoked: int) -> bytes:
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer.subject)
        .last_update(now - timedelta(hours=1))
        .next_update(now + timedelta(days=30))
    )
    for _ in range(revoked):  # other platforms' revoked certificates, so look-ups are not trivial
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(x509.random_serial_number())
            .revocation_date(now - timedelta(days=2))
            .build()
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _tcb_info(cpu_svn: bytes, now: datetime) -> bytes:
    levels = []
    for index in range(TCB_LEVELS):  # the host's CPU SVN is the top level, older ones below
        svns = [max(svn - index, 0) for svn in cpu_svn]
        levels.append(
            {
                "tcb": {
                    "sgxtcbcomponents": [
                        {"svn": svn, "category": "BIOS", "type": "Early Microcode Update"} for svn in svns
                    ],
                    "pcesvn": 13 - min(index, 13),
                },
                "tcbDate": (now - timedelta(days=90 * index)).isoformat(),
                "tcbStatus": "UpToDate" if index == 0 else "OutOfDate",
                "advisoryIDs": [f"INTEL-SA-{600 + index * 7 + k:05d}" for k in range(min(index, 6))],
            }
        )
    document = {
        "tcbInfo": {
            "id": "SGX",
            "version": 3,
            "issueDate": now.isoformat(),
            "nextUpdate": (now + timedelta(days=30)).isoformat(),
            "fmspc": os.urandom(6).hex(),
            "pceId": "0000",
            "tcbType": 0,
            "tcbEvaluationDataNumber": 17,
            "tcbLevels": levels,
        }
    }
    return json.dumps(document).encode()


def _qe_identity(now: datetime) -> bytes:
    document = {
        "enclaveIdentity": {
            "id": "QE",
            "version": 2,
            "issueDate": now.isoformat(),
            "nextUpdate": (now + timedelta(days=30)).isoformat(),
            "tcbEvaluationDataNumber": 17,
            "miscselect": "00000000",
            "miscselectMask": "FFFFFFFF",
            "attributes": "11000000000000000000000000000000",
            "attributesMask": "FBFFFFFFFFFFFFFF0000000000000000",
            "mrsigner": QE_MRSIGNER.hex(),
            "isvprodid": QE_PRODUCT_ID,
            "tcbLevels": [
                {"tcb": {"isvsvn": QE_SVN - i}, "tcbDate": now.isoformat(), "tcbStatus": "UpToDate"}
                for i in range(3)
            ],
        }
    }
    return json.dumps(document).encode()


def make_collateral(
    root_key: ec.EllipticCurvePrivateKey, root: x509.Certificate, cpu_svn: bytes
) -> HostCollateral:
    """One host's collateral under a root shared by the fleet (Intel's root is one for all)."""
    now = datetime.now(UTC)
    ca_key, pck_key, tcb_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    platform_ca = _cert("PCK Platform CA", ca_key, root, root_key, now, ca=True)
    pck = _cert("PCK Certificate", pck_key, platform_ca, ca_key, now, ca=False)
    tcb_signing = _cert("TCB Signing", tcb_key, root, root_key, now, ca=False)
    tcb_info, qe_identity = _tcb_info(cpu_svn, now), _qe_identity(now)
    der = serialization.Encoding.DER
    return HostCollateral(
        root_der=root.public_bytes(der),
        platform_ca_der=platform_ca.public_bytes(der),
        pck_der=pck.public_bytes(der),
        tcb_signing_der=tcb_signing.public_bytes(der),
        root_crl_der=_crl(root, root_key, now, revoked=2),
        pck_crl_der=_crl(platform_ca, ca_key, now, revoked=40),
        tcb_info=tcb_info,
        tcb_info_signature=tcb_key.sign(tcb_info, _ECDSA),
        qe_identity=qe_identity,
        qe_identity_signature=tcb_key.sign(qe_identity, _ECDSA),
    )


def make_root() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _cert("Intel SGX Root CA (model)", key, None, key, datetime.now(UTC), ca=True)
