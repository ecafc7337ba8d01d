"""Release policies derived from registered generations, and how a generation migration changes
them: widen (the old and the new generation both obtain DEKs), narrow (only the new one), and
back (the policy recorded before widening).

Both changes derive from the policy the key had before the migration, never from the current
one, so each is idempotent: a retried step writes the same policy again. Rules naming other
builds are kept as they are. A signer rule (signer + product + minimum SVN) that admits the old
generation is raised to a minimum SVN above the old one when the new generation's SVN is
higher; with equal SVNs it cannot tell them apart and is replaced by the new generation's
measurement rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attestation.errors import AttestationError
from attestation.policy import Rule, parse_policy
from kms_adapters.errors import InvalidRequest
from kms_adapters.release import ReleasePolicy
from sealing.generation import GenerationManifest
from sealing.kms_migration import RELEASE_AUDIENCE, generation_rule, rule_admits

__all__ = ["admits", "narrowed", "policy_for_generations", "widened"]


def _rule_document(rule: Rule) -> dict[str, Any]:
    return rule.model_dump(exclude_none=True)


def _policy(policy_id: str, rules: Sequence[dict[str, Any]], base: ReleasePolicy) -> ReleasePolicy:
    try:
        parsed = parse_policy({"id": policy_id, "rules": list(rules)})
    except AttestationError as exc:
        raise InvalidRequest(f"release policy {policy_id} cannot be derived: {exc}") from None
    return ReleasePolicy(parsed, base.verifier_public_key_pem, base.audience)


def policy_for_generations(
    generations: Sequence[GenerationManifest], verifier_public_key_pem: bytes, policy_id: str
) -> ReleasePolicy:
    """A release policy that admits exactly ``generations`` (one measurement rule each), for
    result tokens signed by ``verifier_public_key_pem`` with rekey's release audience."""
    if not generations:
        raise InvalidRequest("a release policy needs at least one generation")
    try:
        parsed = parse_policy({"id": policy_id, "rules": [generation_rule(m) for m in generations]})
    except AttestationError as exc:
        raise InvalidRequest(f"release policy {policy_id}: {exc}") from None
    return ReleasePolicy(parsed, verifier_public_key_pem, RELEASE_AUDIENCE)


def admits(policy: ReleasePolicy, manifest: GenerationManifest) -> bool:
    """Whether some rule of ``policy`` admits ``manifest``'s build."""
    return any(rule_admits(rule, manifest) for rule in policy.policy.rules)


def widened(before: ReleasePolicy, old: GenerationManifest, new: GenerationManifest) -> ReleasePolicy:
    """``before`` admitting ``new`` as well (unchanged if it does already)."""
    if admits(before, new):
        return before
    rules = [_rule_document(r) for r in before.policy.rules] + [generation_rule(new)]
    return _policy(before.id, rules, before)


def narrowed(before: ReleasePolicy, old: GenerationManifest, new: GenerationManifest) -> ReleasePolicy:
    """``before`` admitting ``new`` and no longer ``old`` (see the module)."""
    rules: list[dict[str, Any]] = []
    for rule in before.policy.rules:
        document = _rule_document(rule)
        if not rule_admits(rule, old):
            rules.append(document)
        elif rule.measurements is not None:
            left = [m for m in rule.measurements if m != old.measurement]
            if left:
                rules.append(document | {"measurements": left})
        elif new.svn > old.svn:
            rules.append(document | {"min_svn": max(rule.min_svn or 0, old.svn + 1)})
    if not any(rule_admits(Rule.model_validate(r), new) for r in rules):
        rules.append(generation_rule(new))
    result = _policy(before.id, rules, before)
    if admits(result, old):  # cannot happen by construction; a policy that still admits it is never written
        raise InvalidRequest(f"release policy {before.id} cannot be narrowed to exclude {old.id}")
    return result
