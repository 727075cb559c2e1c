"""The champion gate's rules (medseg.gate.decide) on plain values: no MLflow."""

from __future__ import annotations

import pytest

from medseg.gate import VersionFacts, decide


def facts(version="2", dsc=0.8, test_cases="cases-a", protocol="mm", parity=True) -> VersionFacts:
    return VersionFacts(version=version, dsc=dsc, test_cases=test_cases, protocol=protocol, parity=parity)


def test_first_parity_passed_challenger_is_promoted():
    decision = decide(facts(), None)
    assert decision.outcome == "promoted" and "first champion" in decision.reason


def test_better_challenger_on_the_same_cases_and_protocol_replaces_the_champion():
    decision = decide(facts(dsc=0.81), facts(version="1", dsc=0.80))
    assert decision.outcome == "promoted" and "replaces champion 1" in decision.reason


@pytest.mark.parametrize("challenger,champion,why", [
    (facts(parity=False), None, "parity"),
    (facts(dsc=None), None, "no finite test_dsc"),
    (facts(dsc=0.9, test_cases="cases-b"), facts(version="1", dsc=0.5), "different test sets"),
    (facts(dsc=0.9, test_cases=None), facts(version="1", dsc=0.5, test_cases=None), "different test sets"),
    (facts(dsc=0.9, protocol="transunet"), facts(version="1", dsc=0.5), "protocol"),
    (facts(dsc=0.9), facts(version="1", dsc=None), "champion 1 has no finite"),
    (facts(dsc=0.8), facts(version="1", dsc=0.8), "does not beat"),  # a tie is not an improvement
    (facts(dsc=0.7), facts(version="1", dsc=0.8), "does not beat"),
])
def test_refusals_name_the_rule(challenger, champion, why):
    decision = decide(challenger, champion)
    assert decision.outcome == "refused"
    assert why in decision.reason


def test_min_improvement_is_a_strict_margin():
    champion = facts(version="1", dsc=0.80)
    assert decide(facts(dsc=0.815), champion, min_improvement=0.02).outcome == "refused"
    assert decide(facts(dsc=0.83), champion, min_improvement=0.02).outcome == "promoted"


def test_the_champion_itself_is_unchanged_even_if_it_would_fail_a_rule():
    same = facts(version="3", parity=False)
    assert decide(same, same).outcome == "unchanged"


def test_promote_reads_the_test_case_fingerprint_of_versions_registered_before_the_rename():
    from types import SimpleNamespace

    from medseg.registry import _version_facts

    old = SimpleNamespace(version=4, tags={"test_dsc": "0.5", "parity_passed": "true", "split_sha256": "cases-a",
                                           "protocol": "mm"})
    new = SimpleNamespace(version=5, tags={"test_dsc": "0.6", "parity_passed": "true",
                                           "test_cases_sha256": "cases-a", "protocol": "mm"})
    assert _version_facts(old).test_cases == _version_facts(new).test_cases == "cases-a"
    assert decide(_version_facts(new), _version_facts(old)).outcome == "promoted"
