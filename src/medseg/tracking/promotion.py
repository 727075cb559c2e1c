"""The champion gate on the MLflow registry: `promote` moves alias `champion` to the `challenger` version only when
it beats the champion on the same test data under the same protocol with a passed ONNX parity check (the rules are
medseg.tracking.gate.decide's); it never moves the champion to a worse model. A champion measured on other test data is
first re-evaluated on the challenger's (champion_reevaluator, from a project checkout).

Apart from medseg.tracking.registry so that the register stage, which only registers, does not depend on the scoring code
(medseg.deployment.onnx_eval and what it imports) that re-evaluation needs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from medseg.config import PARAMS_FILE, disable_telemetry, load_params, settings
from medseg.errors import MedsegError, PromotionRefused, error_message
from medseg.evaluation.metrics import finite_or_none
from medseg.tracking.gate import Decision, VersionFacts, decide
from medseg.tracking.registry import CHALLENGER, CHAMPION, alias_version, model_name
from medseg.tracking.store import connect, resolve_tracking_uri


def _require_registered_model(client, name: str) -> None:
    """MedsegError (an error, not a refusal: exit 2) when no model of that name is registered at all."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise
        names = sorted(m.name for m in client.search_registered_models(max_results=50))
        where = getattr(client, "tracking_uri", None) or getattr(client._tracking_client, "tracking_uri", "?")
        raise MedsegError(f"no registered model named {name!r} at {where}; registered: "
                          f"{', '.join(names) or 'none'} (the register stage creates <prefix>-<dataset>-<arch>)"
                          ) from exc


LOCK_DIR_ENV = "MEDSEG_LOCK_DIR"  # default: $XDG_CACHE_HOME/medseg/locks (~/.cache/medseg/locks)


def _store_uri(client) -> str:
    """The registry URI a client talks to, sqlite paths resolved (two spellings of one file are one store)."""
    uri = str(getattr(client, "_registry_uri", None) or getattr(client, "tracking_uri", None) or "default")
    if uri.startswith("sqlite:///"):
        uri = "sqlite:///" + os.path.realpath(uri[len("sqlite:///"):])
    return uri


@contextlib.contextmanager
def promotion_lock(client, name: str) -> Iterator[None]:
    """One promotion of `name` in a store at a time on this machine: an advisory lock (flock) on a file named
    after the store and the model. The decision reads the aliases and moves them; two at once could both read
    "no champion" and both promote (MLflow has no compare-and-set on aliases). Promotions from several machines
    go through one Prefect deployment with a concurrency limit (docs/mlflow.md)."""
    import fcntl

    folder = Path(os.environ.get(LOCK_DIR_ENV)
                  or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "medseg" / "locks")
    folder.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{_store_uri(client)}\n{name}".encode()).hexdigest()[:24]
    with open(folder / f"promote-{key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the other promotion is done; released on close or exit
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _version_facts(version) -> VersionFacts:
    tags = version.tags or {}
    return VersionFacts(
        version=str(version.version),
        dsc=finite_or_none(tags.get("test_dsc")),
        # versions registered before the rename carry the same value as `split_sha256`
        test_cases=tags.get("test_cases_sha256") or tags.get("split_sha256") or None,
        test_data=tags.get("test_data_sha256") or None,
        dataset_version=tags.get("dataset_version") or tags.get("medseg.dataset_version") or None,
        protocol=tags.get("protocol") or None,
        parity=str(tags.get("parity_passed", "")).lower() == "true",
    )


# A champion measured on other test data than the challenger's is measured again on the challenger's (promote's
# `reevaluate`); the result is kept on the champion's version under these tags, keyed by that data's sha256.
REEVALUATED_TAG = "reevaluated.{data}.{key}"
REEVALUABLE = ("different-test-data", "unknown-test-data")


def champion_reevaluator(client, params: dict[str, Any], root: str | Path, name: str, tracking_uri: str):
    """promote()'s `reevaluate` for a checkout: the champion version's registered model.onnx, scored on this
    checkout's test split (medseg.deployment.onnx_eval.evaluate_onnx) when that is the challenger's test data; the scores
    are tagged on the champion version so the next challenger on the same data does not pay for them again."""

    def reevaluate(champion: VersionFacts, challenger: VersionFacts) -> VersionFacts:
        try:
            from medseg.deployment.onnx_eval import evaluate_onnx
        except ModuleNotFoundError as exc:  # a lean install: the scoring code needs the train extra
            raise MedsegError(f"scoring a model needs {exc.name} (pip install 'medseg[train]')") from exc

        data = str(challenger.test_data)
        tags = client.get_model_version(name, champion.version).tags or {}
        tag = lambda key: REEVALUATED_TAG.format(data=data[:16], key=key)  # noqa: E731
        if tag("test_dsc") not in tags:
            scores = evaluate_onnx(params, f"models:/{name}/{champion.version}", root, tracking_uri=tracking_uri,
                                   expect_test_data=data)
            for key in ("test_dsc", "test_cases_sha256", "protocol", "dataset_version"):
                value = scores["mean_dsc" if key == "test_dsc" else key]
                client.set_model_version_tag(name, champion.version, tag(key), "" if value is None else str(value))
            tags = client.get_model_version(name, champion.version).tags or {}
        return VersionFacts(version=champion.version, dsc=finite_or_none(tags.get(tag("test_dsc"))),
                            test_cases=tags.get(tag("test_cases_sha256")) or None, test_data=data,
                            protocol=tags.get(tag("protocol")) or None, parity=champion.parity,
                            dataset_version=tags.get(tag("dataset_version")) or None)

    return reevaluate


def promote(
    model_name: str, tracking_uri: str | None = None, min_improvement: float = 0.0, client=None,
    reevaluate: Callable[[VersionFacts, VersionFacts], VersionFacts] | None = None,
) -> dict[str, Any]:
    """Move alias `champion` to the `challenger` version if it earned it; raise PromotionRefused otherwise.

    Rules: the challenger's ONNX parity passed; with a champion present, both were tested on the same split
    (test_cases_sha256) under the same evaluation protocol, and the challenger's test DSC is strictly greater than the
    champion's + min_improvement.
    On refusal the aliases are left untouched. `tracking_uri` defaults to MLFLOW_TRACKING_URI, else the store
    ./params.yaml names (register.tracking_uri), else MLflow's default. PromotionRefused carries `.result`.
    `reevaluate(champion, challenger)`: when the two were tested on different data, the champion's facts measured
    on the challenger's test data (champion_reevaluator), so the decision compares like with like; a MedsegError
    from it keeps the refusal, with its reason.
    """
    from mlflow import MlflowClient

    disable_telemetry()
    if client is None:
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri and Path(PARAMS_FILE).is_file():  # run from a project root: the store params.yaml names
            uri = resolve_tracking_uri(load_params(PARAMS_FILE), ".")
        client = connect(uri, retries=0) if uri else MlflowClient()
    try:
        with promotion_lock(client, model_name):
            return _promote(client, model_name, min_improvement, reevaluate)
    except MedsegError:
        raise
    except Exception as exc:  # noqa: BLE001 - a store error names the model, once, without a traceback
        message = error_message(exc)
        if message is None:
            raise
        raise MedsegError(f"{model_name}: {message}") from exc


def _promote(client, model_name: str, min_improvement: float,
             reevaluate: Callable[[VersionFacts, VersionFacts], VersionFacts] | None) -> dict[str, Any]:
    result: dict[str, Any] = {
        "model_name": model_name,
        "decision": "refused",
        "reason": "",
        "champion_version": None,
        "challenger_version": None,
        "challenger_dsc": None,
        "champion_dsc": None,
        "code": "",  # the rule that decided (medseg.tracking.gate.Decision.code)
    }

    def refuse(reason: str, code: str):
        result.update(reason=reason, code=code)
        error = PromotionRefused(f"{model_name}: {reason}")
        error.result = result  # type: ignore[attr-defined]  # the caller can still report the numbers
        return error

    _require_registered_model(client, model_name)
    challenger_v = alias_version(client, model_name, CHALLENGER)
    champion_v = alias_version(client, model_name, CHAMPION)
    if challenger_v is None and champion_v is not None:
        # promoting moves the challenger alias to champion: asking again is a no-op, not a refusal
        result.update(decision="unchanged", code="already-champion", champion_version=champion_v,
                      reason=f"no challenger: version {champion_v} is already the champion (register a new "
                             f"version to challenge it)")
        return result
    if challenger_v is None:
        raise refuse(f"no version has alias '{CHALLENGER}' and none is champion (the register stage sets "
                     f"'{CHALLENGER}' on the version it registers)", "no-challenger")
    challenger = _version_facts(client.get_model_version(model_name, challenger_v))
    champion = _version_facts(client.get_model_version(model_name, champion_v)) if champion_v else None
    result.update(challenger_version=challenger.version, challenger_dsc=challenger.dsc,
                  champion_version=champion_v, champion_dsc=champion.dsc if champion else None)

    decision = decide(challenger, champion, min_improvement)
    if decision.code in REEVALUABLE and champion is not None and challenger.test_data and reevaluate is not None:
        try:
            remeasured = reevaluate(champion, challenger)
        except MedsegError as exc:
            decision = Decision(decision.outcome, f"{decision.reason}. Re-evaluating champion {champion.version} "
                                                  f"on the challenger's test data failed: {exc}", decision.code)
        else:
            was = "no DSC" if champion.dsc is None else f"DSC {champion.dsc:.4f}"
            dsc = "no DSC" if remeasured.dsc is None else f"DSC {remeasured.dsc:.4f}"
            then = decide(challenger, remeasured, min_improvement)
            decision = Decision(then.outcome, f"champion {champion.version} re-evaluated on the challenger's test "
                                              f"data (dataset version {remeasured.dataset_version or '?'}): {dsc}, "
                                              f"{was} on the data it was registered with; {then.reason}", then.code)
            result.update(champion_dsc=remeasured.dsc, champion_reevaluated=True)
    result["code"] = decision.code
    if decision.outcome == "unchanged":
        result.update(decision="unchanged", reason=decision.reason)
        return result
    if decision.outcome == "refused":
        raise refuse(decision.reason, decision.code)

    client.set_registered_model_alias(model_name, CHAMPION, challenger_v)
    # The challenger has become the champion: a later `promote` without a new registration has nothing to do.
    client.delete_registered_model_alias(model_name, CHALLENGER)
    client.set_model_version_tag(model_name, challenger_v, "promoted_from_champion", champion_v or "none")
    result.update(decision="promoted", champion_version=challenger_v, reason=decision.reason)
    result["previous_champion_version"] = champion_v
    return result


def promote_in_project(params: dict[str, Any], name: str, root: str | Path = ".", tracking_uri: str | None = None,
                       min_improvement: float = 0.0) -> dict[str, Any]:
    """promote() of `name` on `tracking_uri` (else the store params.yaml points at) from the project at `root`: a
    champion tested on other data is re-evaluated on this checkout's test split (champion_reevaluator)."""
    reg = settings(params).register
    uri = tracking_uri or resolve_tracking_uri(params, root)
    client = connect(uri, reg.retries, reg.backoff_s)
    return promote(name, min_improvement=min_improvement, client=client,
                   reevaluate=champion_reevaluator(client, params, root, name, uri))


def promote_from_params(params: dict[str, Any], arch: str, root: str | Path = ".",
                        min_improvement: float = 0.0) -> dict[str, Any]:
    """promote() for `<prefix>-<dataset>-<arch>` on the store params.yaml points at."""
    return promote_in_project(params, model_name(params, arch), root, min_improvement=min_improvement)
