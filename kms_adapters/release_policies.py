"""Release policies derived from registered generations, and how a generation migration changes
them: widen (the old and the new generation both obtain DEKs), narrow (only the new one), and
back (what the migration added is taken out again).

Each change applies to the key's current policy and touches only what the migration is about:
widening adds one measurement rule for the new generation (none if the policy admits it
already); narrowing takes the old generation's admission out and nothing else; taking back
removes exactly the rules widening added (`without_rules`). Rules naming other builds are kept
as they are. A signer rule (signer + product + minimum SVN) that admits the old generation is
raised to a minimum SVN above the old one when the new generation's SVN is higher; with equal
SVNs it cannot tell them apart and is replaced by the new generation's measurement rule. Either
way the rule would stop admitting builds it admitted before: every registered generation it
admitted, other than the old one, is kept with its own measurement rule (``registered``), so
narrowing never drops a sibling build (another measurement at the same SVN) that is not being
migrated. Builds nobody registered are not kept: they need a policy of their own.
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

__all__ = [
    "added_rules",
    "admits",
    "narrowed",
    "policy_for_generations",
    "same_rule",
    "widened",
    "without_rules",
]


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


def same_rule(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two rule documents are the same rule (as parsed: defaults filled in)."""
    try:
        return Rule.model_validate(a) == Rule.model_validate(b)
    except ValueError:
        return False


def widened(before: ReleasePolicy, old: GenerationManifest, new: GenerationManifest) -> ReleasePolicy:
    """``before`` admitting ``new`` as well (unchanged if it does already): one rule added."""
    if admits(before, new):
        return before
    rules = [_rule_document(r) for r in before.policy.rules] + [generation_rule(new)]
    return _policy(before.id, rules, before)


def added_rules(before: ReleasePolicy, after: ReleasePolicy) -> list[dict[str, Any]]:
    """The rules of ``after`` that ``before`` does not have (what a change added)."""
    kept = [_rule_document(r) for r in before.policy.rules]
    return [
        _rule_document(r)
        for r in after.policy.rules
        if not any(same_rule(_rule_document(r), k) for k in kept)
    ]


def without_rules(current: ReleasePolicy, rules: Sequence[dict[str, Any]]) -> ReleasePolicy:
    """``current`` without ``rules`` (those it does not have are ignored; unchanged if none)."""
    kept = [
        _rule_document(r)
        for r in current.policy.rules
        if not any(same_rule(_rule_document(r), gone) for gone in rules)
    ]
    if len(kept) == len(current.policy.rules):
        return current
    if not kept:
        raise InvalidRequest(
            f"release policy {current.id} would admit nothing once this migration's rules are taken out"
        )
    return _policy(current.id, kept, current)


def narrowed(
    before: ReleasePolicy,
    old: GenerationManifest,
    new: GenerationManifest,
    registered: Sequence[GenerationManifest] = (),
) -> ReleasePolicy:
    """``before`` admitting ``new`` and no longer ``old``, and still every generation of
    ``registered`` it admitted but ``old`` (see the module)."""
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
    for sibling in sorted(registered, key=lambda m: m.id):
        if sibling.id == old.id or sibling.measurement == old.measurement or not admits(before, sibling):
            continue
        if not any(rule_admits(Rule.model_validate(r), sibling) for r in rules):
            rules.append(generation_rule(sibling))
    result = _policy(before.id, rules, before)
    if admits(result, old):  # cannot happen by construction; a policy that still admits it is never written
        raise InvalidRequest(f"release policy {before.id} cannot be narrowed to exclude {old.id}")
    return result
