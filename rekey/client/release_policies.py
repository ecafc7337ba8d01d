"""Release policies of KMS keys, derived from registered generations, and release tokens for an
enclave agent: what ``rekey key release-policy`` and ``rekey state get --agent`` use.

A key's release policy names the attestation results it trusts (this installation's verifier
key, ``<home>/verifier/es256.pem``, and rekey's release audience) and the generations whose
enclaves may obtain its DEKs, one measurement rule per generation, built from the registered
manifest. A generation migration widens and narrows it (`kms_adapters.release_policies`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kms_adapters.release import ReleasePolicy
from kms_adapters.release_policies import admits, policy_for_generations
from rekey.agent_sealer import AgentSealer
from rekey.backends import known_key_ref, release_store, release_token_signer, sim_verifiers
from rekey.client.errors import RekeyClientError
from rekey.config import Settings
from sealing.errors import SealingError
from sealing.generation import GenerationManifest
from sealing.kms_migration import attested_token
from sealing.migration import manifest_of
from sealing.state import EnclaveRefused
from sealing.store import SealedStateStore

__all__ = [
    "ReleasePolicyProblem",
    "admitted_generations",
    "agent_release_token",
    "release_policy",
    "set_release_policy",
]


class ReleasePolicyProblem(RekeyClientError):
    """A release policy cannot be set or shown (unknown generation, no policy)."""

    exit_code = 2


def _manifests(store: SealedStateStore, generations: Sequence[str]) -> list[GenerationManifest]:
    try:
        return [manifest_of(store, g) for g in generations]
    except SealingError as exc:
        raise ReleasePolicyProblem(f"{exc} (rekey generation register MANIFEST)") from None


def set_release_policy(
    settings: Settings, store: SealedStateStore, key_ref: str, generations: Sequence[str]
) -> ReleasePolicy:
    """Give ``key_ref`` a release policy that admits exactly ``generations`` (registered ones),
    trusting this installation's verifier key; the policy it replaces is gone."""
    ref = str(known_key_ref(settings, key_ref))
    if not generations:
        raise ReleasePolicyProblem("give at least one --generation")
    manifests = _manifests(store, list(dict.fromkeys(generations)))
    policy = policy_for_generations(manifests, release_token_signer(settings).public_pem(), f"release:{ref}")
    release_store(settings).put(ref, policy)
    return policy


def release_policy(settings: Settings, key_ref: str) -> ReleasePolicy:
    ref = str(known_key_ref(settings, key_ref))
    policy = release_store(settings).get(ref)
    if policy is None:
        raise ReleasePolicyProblem(
            f"key {ref} has no release policy (rekey key release-policy set {ref} --generation GEN)"
        )
    return policy


def admitted_generations(store: SealedStateStore, policy: ReleasePolicy) -> list[str]:
    """The registered generations ``policy`` admits."""
    found = []
    for generation, _document, _registered in store.list_generations():
        try:
            manifest = manifest_of(store, generation)
        except SealingError:
            continue
        if admits(policy, manifest):
            found.append(generation)
    return found


def agent_release_token(settings: Settings, store: SealedStateStore) -> Callable[[AgentSealer], str]:
    """How a release token is made for an agent: it attests over a fresh nonce, the evidence is
    verified against its (simulated) host and must be its registered generation's; the token is
    signed with this installation's verifier key. Whether the key releases to it is the key's
    release policy's decision, at the gate."""

    def token(sealer: AgentSealer) -> str:
        try:
            return attested_token(
                sealer.attest,
                sim_verifiers(settings)(sealer.host_id),
                release_token_signer(settings),
                manifest_of(store, sealer.generation),
            )
        except (SealingError, ValueError) as exc:
            raise EnclaveRefused(f"no release token for {sealer.where}: {exc}") from None

    return token
