"""How the Transit adapter reads a batch rewrap's answer, item by item (a stub in place of hvac:
the shapes a real server sends are covered in tests/integration/test_vault_transit.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from kms_adapters.errors import InvalidCiphertext, Unavailable, VersionDisabled
from kms_adapters.governor import Governor
from kms_adapters.release import MemoryReleasePolicyStore
from kms_adapters.vault_transit import VaultTransitAdapter


def _adapter(answer: Any) -> tuple[VaultTransitAdapter, list[list[dict[str, str]]]]:
    sent: list[list[dict[str, str]]] = []

    def rewrap_data(**kwargs: Any) -> Any:
        sent.append(kwargs["batch_input"])
        return answer(kwargs["batch_input"])

    client = SimpleNamespace(
        url="http://127.0.0.1:1", secrets=SimpleNamespace(transit=SimpleNamespace(rewrap_data=rewrap_data))
    )
    governor = Governor("stub", max_attempts=1)
    adapter = VaultTransitAdapter(client, "k", release_store=MemoryReleasePolicyStore(), governor=governor)  # type: ignore[arg-type]
    return adapter, sent


def test_items_keep_their_positions_and_errors() -> None:
    def answer(batch: list[dict[str, str]]) -> Any:
        results: list[Any] = []
        for item in batch:
            if item["ciphertext"].endswith("old"):
                results.append({"error": "ciphertext or signature version is disallowed by policy (too old)"})
            else:
                results.append({"ciphertext": item["ciphertext"].replace("vault:v1:", "vault:v2:")})
        return {"data": {"batch_results": results}}

    adapter, sent = _adapter(answer)
    outcomes = adapter.rewrap_batch([b"vault:v1:aaa", b"not-transit", b"vault:v1:old", b"vault:v1:bbb"])
    assert [o.index for o in outcomes] == [0, 1, 2, 3]
    assert outcomes[0].wrapped is not None and outcomes[0].wrapped.ciphertext == b"vault:v2:aaa"
    assert outcomes[0].wrapped.key_version == 2
    assert isinstance(outcomes[1].error, InvalidCiphertext)  # never sent
    assert isinstance(outcomes[2].error, VersionDisabled)
    assert outcomes[3].wrapped is not None and outcomes[3].wrapped.ciphertext == b"vault:v2:bbb"
    assert [i["ciphertext"] for i in sent[0]] == ["vault:v1:aaa", "vault:v1:old", "vault:v1:bbb"]


@pytest.mark.parametrize(
    "results",
    [
        [{"ciphertext": "vault:v2:ok"}],  # one result for two items
        [{"ciphertext": "vault:v2:ok"}, {"ciphertext": "v2:not-transit"}],
        [{"ciphertext": "vault:v2:ok"}, {"ciphertext": "vault:v2:\u00e9"}],
        [{"ciphertext": "vault:v2:ok"}, {"ciphertext": 42}],
    ],
)
def test_a_malformed_answer_fails_the_batch_as_unavailable(results: list[Any]) -> None:
    adapter, _ = _adapter(lambda _batch: {"data": {"batch_results": results}})
    with pytest.raises(Unavailable, match="batch rewrap"):
        adapter.rewrap_batch([b"vault:v1:a", b"vault:v1:b"])
