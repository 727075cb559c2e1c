"""The champion gate's rules, as a pure function: may a challenger model version replace the champion?

`medseg.tracking.promotion.promote` reads the two versions' tags from MLflow into `VersionFacts`, asks `decide`, and moves
the aliases only on "promoted". Nothing here talks to MLflow, so every rule is tested on plain values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["promoted", "unchanged", "refused"]


@dataclass(frozen=True)
class VersionFacts:
    """What the gate knows about one registered version (from its tags)."""

    version: str
    dsc: float | None  # mean test DSC, None when not a finite number
    test_cases: str | None  # sha256 of the sorted test case ids the DSC was measured on
    protocol: str | None  # evaluation protocol ("mm", "transunet"): the empty-mask rules behind the DSC
    parity: bool  # the ONNX export matched PyTorch
    test_data: str | None = None  # sha256 of the test cases' ids and content (None: registered before it existed)
    dataset_version: str | None = None  # the ingested dataset's content version, for the messages


@dataclass(frozen=True)
class Decision:
    """The gate's answer. `code` names the rule that decided, one per distinct case, for scripts and flows:
    promoted: first-champion, better; unchanged: already-champion; refused: parity-failed, no-dsc,
    different-test-data, unknown-test-data, different-protocol, champion-no-dsc, worse (and, from `promote`,
    no-challenger)."""

    outcome: Outcome
    reason: str
    code: str = ""


def decide(challenger: VersionFacts, champion: VersionFacts | None, min_improvement: float = 0.0) -> Decision:
    """Promote only a challenger whose ONNX parity passed and, with a champion present, that was tested on the same
    test cases with the same content (test_data) under the same protocol and whose DSC is strictly greater than
    the champion's + min_improvement."""
    c, v = challenger, challenger.version
    if champion is not None and champion.version == v:
        return Decision("unchanged", f"version {v} is already the champion", "already-champion")
    if not c.parity:
        return Decision("refused", f"version {v} failed the ONNX parity check (tag parity_passed != true)",
                        "parity-failed")
    if c.dsc is None:
        return Decision("refused", f"version {v} has no finite test_dsc tag", "no-dsc")
    if champion is None:
        return Decision("promoted", f"version {v} (DSC {c.dsc:.4f}, parity passed) first champion", "first-champion")
    w = champion.version
    if not c.test_cases or c.test_cases != champion.test_cases:
        return Decision("refused", f"version {v} was tested on split {c.test_cases} but champion {w} on "
                                   f"{champion.test_cases}: DSCs on different test sets are not comparable",
                        "different-test-data")
    if c.test_data != champion.test_data:
        if not (c.test_data and champion.test_data):
            missing = ", ".join(f"{n} {x.version}" for n, x in (("challenger", c), ("champion", champion))
                                if not x.test_data)
            return Decision("refused", f"{missing} has no test_data_sha256 tag (registered before medseg recorded "
                                       f"the test data's content), so whether both were tested on the same scans "
                                       f"cannot be told; re-register it from a current evaluation to compare",
                            "unknown-test-data")
        return Decision("refused", f"version {v} and champion {w} were tested on the same case ids but different "
                                   f"content (dataset version {c.dataset_version or '?'} vs "
                                   f"{champion.dataset_version or '?'}: the data changed since the champion was "
                                   f"measured); evaluate the champion's checkpoint on the current data and register "
                                   f"it again to compare like with like", "different-test-data")
    if c.protocol != champion.protocol:
        return Decision("refused", f"version {v} was evaluated under protocol {c.protocol} but champion {w} under "
                                   f"{champion.protocol}: the empty-mask rules differ, DSCs are not comparable",
                        "different-protocol")
    if champion.dsc is None:
        return Decision("refused", f"champion {w} has no finite test_dsc tag, so the challenger cannot be compared",
                        "champion-no-dsc")
    if not c.dsc > champion.dsc + float(min_improvement):
        margin = f" by more than {min_improvement}" if min_improvement else ""
        return Decision("refused", f"challenger {v} test DSC {c.dsc:.4f} does not beat champion {w} DSC "
                                   f"{champion.dsc:.4f}{margin}", "worse")
    return Decision("promoted", f"version {v} (DSC {c.dsc:.4f}, parity passed) replaces champion {w} "
                                f"(DSC {champion.dsc:.4f})", "better")
