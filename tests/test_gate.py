"""The champion gate's rules (medseg.tracking.gate.decide) on plain values: no MLflow."""

from __future__ import annotations

import pytest

from medseg.tracking.gate import VersionFacts, decide


def facts(version="2", dsc=0.8, test_cases="cases-a", protocol="mm", parity=True, test_data=None,
          dataset_version=None) -> VersionFacts:
    return VersionFacts(version=version, dsc=dsc, test_cases=test_cases, protocol=protocol, parity=parity,
                        test_data=test_data, dataset_version=dataset_version)


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

    from medseg.tracking.promotion import _version_facts

    old = SimpleNamespace(version=4, tags={"test_dsc": "0.5", "parity_passed": "true", "split_sha256": "cases-a",
                                           "protocol": "mm"})
    new = SimpleNamespace(version=5, tags={"test_dsc": "0.6", "parity_passed": "true",
                                           "test_cases_sha256": "cases-a", "protocol": "mm"})
    assert _version_facts(old).test_cases == _version_facts(new).test_cases == "cases-a"
    assert decide(_version_facts(new), _version_facts(old)).outcome == "promoted"


def test_same_case_ids_with_new_content_are_other_test_data():
    """After a re-ingest that changed the scans under the same ids, a champion measured on the old content is not
    compared with a challenger measured on the new: refused, naming both dataset versions; with the same content
    the gate compares as usual; a version without the content tag cannot be compared with one that has it."""
    champion = facts(version="1", dsc=0.9, test_data="old", dataset_version="aaaa11112222")
    decision = decide(facts(dsc=0.5, test_data="new", dataset_version="bbbb33334444"), champion)
    assert (decision.outcome, decision.code) == ("refused", "different-test-data")
    assert "same case ids but different content" in decision.reason and "aaaa11112222" in decision.reason
    assert "bbbb33334444" in decision.reason
    assert decide(facts(dsc=0.95, test_data="old"), champion).code == "better"
    unknown = decide(facts(dsc=0.95, test_data="new"), facts(version="1", dsc=0.9))
    assert (unknown.outcome, unknown.code) == ("refused", "unknown-test-data") and "champion 1" in unknown.reason


def test_every_decision_names_its_rule():
    assert decide(facts(), None).code == "first-champion"
    assert decide(facts(dsc=0.7), facts(version="1", dsc=0.8)).code == "worse"
    assert decide(facts(parity=False), None).code == "parity-failed"
    assert decide(facts(protocol="transunet"), facts(version="1")).code == "different-protocol"
    assert decide(facts(test_cases="b"), facts(version="1")).code == "different-test-data"
