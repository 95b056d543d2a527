"""`radixserve audit-isolation` against real servers: it finds the cross-tenant leak of a shared
prefix cache (by timing and by usage.cached_tokens) and finds none with per-key namespaces.

The statistical verdict is the feature under test: TTFT of probes that would hit another
tenant's planted prefix vs probes that cannot hit. 192-token random prompts make a cold prefill
of the embedded model on CPU several times slower than a hit (a few new tokens), so the hit and
miss TTFTs do not overlap at all (D = 1). 8 trials are the fewest that separate D = 1 from chance
with a margin at alpha 0.001 (the exact p of D = 1 is 2 / C(2n, n): 1.6e-4 at n = 8, 2.2e-3 at
n = 6); without a leak the verdict is wrong with probability alpha whatever n. A 512-block pool
holds everything the audit plants (each server allocates its KV pool up front).
"""

from __future__ import annotations

import json

import pytest

from radixserve.cli import main
from radixserve.server import ServerConfig
from tests.server.conftest import start_server

KEY_A, KEY_B = "sk-victim", "sk-attacker"
AUDIT = ["--trials", "8", "--prompt-tokens", "192", "--warmup", "1", "--alpha", "0.001", "--json", "--quiet"]


def _audit(capsys, base_url: str) -> tuple[int, dict]:
    code = main(["audit-isolation", "--base-url", base_url, "--key", KEY_A, "--key", KEY_B, *AUDIT])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.slow
def test_audit_finds_the_leak_of_a_shared_cache_and_none_with_per_key_namespaces(embedded_model, capsys):
    isolated = ServerConfig(api_keys=[KEY_A, KEY_B], namespace_from_api_key=True)
    with start_server(embedded_model, isolated, num_blocks=512) as server:
        code, result = _audit(capsys, server.base_url)
    assert code == 0, result["verdict"]
    assert not result["timing_leak"] and not result["cached_tokens_oracle"]
    assert result["cached_tokens_reported"] and result["oracle_trials"] == 0

    shared = ServerConfig(api_keys=[KEY_A, KEY_B])  # keys without namespaces: the shared default
    with start_server(embedded_model, shared, num_blocks=512) as server:
        code, result = _audit(capsys, server.base_url)
    assert code == 1
    assert result["timing_leak"] and result["pvalue"] < 0.001, result["verdict"]
    assert result["cached_tokens_oracle"] and result["oracle_trials"] == 8
    assert "LEAK" in result["verdict"]


def test_audit_reports_an_unreachable_server_as_an_error(capsys):
    code = main(["audit-isolation", "--base-url", "http://127.0.0.1:9", "--key", "a", "--key", "b", "--quiet",
                 "--timeout", "5"])
    assert code == 2
    assert "could not run" in capsys.readouterr().err
