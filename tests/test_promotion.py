"""Promotion rules: champion moves only to a parity-passed challenger that beats it on the same test split.

Most tests create model versions straight in a local sqlite registry with the tags register_model_version sets
(promotion only reads tags and aliases); the last one goes through register_model_version end to end.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.errors import PromotionRefused

from conftest import seed_store

_names = itertools.count()


@pytest.fixture(scope="module")
def client(tmp_path_factory, mlflow_db_template):
    from medseg.tracking.store import connect

    root = tmp_path_factory.mktemp("promotion")
    seed_store(root, mlflow_db_template)
    return connect(f"sqlite:///{root / 'mlflow.db'}", retries=0)


@pytest.fixture()
def name(client) -> str:
    """A fresh registered model per test, in the module's store (creating a sqlite store takes seconds)."""
    model = f"medseg-test-promo-{next(_names)}"
    client.create_registered_model(model)
    return model


def add_challenger(client, name: str, dsc: float, parity: bool = True, split: str = "split-a",
                   protocol: str = "mm", data: str | None = None) -> str:
    tags = {"test_dsc": repr(dsc), "parity_passed": str(parity).lower(), "test_cases_sha256": split,
            "protocol": protocol, "artifact_sha256": f"sha-{dsc}-{parity}-{split}-{data}"}
    if data:
        tags.update(test_data_sha256=f"content-{data}", dataset_version=data)
    version = client.create_model_version(name, source=Path("/nonexistent/model").as_uri(), tags=tags)
    client.set_registered_model_alias(name, "challenger", version.version)
    return str(version.version)


def alias(client, name: str, which: str) -> str | None:
    from medseg.tracking.registry import alias_version

    return alias_version(client, name, which)


def test_first_challenger_with_parity_becomes_champion(client, name):
    from medseg.tracking.promotion import promote

    v1 = add_challenger(client, name, 0.6)
    result = promote(name, client=client)
    assert result["decision"] == "promoted"
    assert result["champion_version"] == v1 and result["challenger_dsc"] == pytest.approx(0.6)
    assert result["champion_dsc"] is None
    assert alias(client, name, "champion") == v1
    assert alias(client, name, "challenger") is None, "the promoted challenger is no longer a challenger"
    # Nothing new registered: a second promotion has nothing to do, and says so (not a refusal).
    again = promote(name, client=client)
    assert (again["decision"], again["code"], again["champion_version"]) == ("unchanged", "already-champion", v1)
    assert f"version {v1} is already the champion" in again["reason"]
    assert alias(client, name, "champion") == v1


def test_better_challenger_replaces_champion(client, name):
    from medseg.tracking.promotion import promote

    v1 = add_challenger(client, name, 0.6)
    promote(name, client=client)
    v2 = add_challenger(client, name, 0.65)
    result = promote(name, client=client)
    assert result["decision"] == "promoted"
    assert (result["champion_version"], result["previous_champion_version"]) == (v2, v1)
    assert result["champion_dsc"] == pytest.approx(0.6) and result["challenger_dsc"] == pytest.approx(0.65)
    assert alias(client, name, "champion") == v2
    assert client.get_model_version(name, v2).tags["promoted_from_champion"] == v1


@pytest.mark.parametrize(
    "challenger, reason",
    [
        ({"dsc": 0.55}, "does not beat champion"),
        ({"dsc": 0.60}, "does not beat champion"),  # equal is not better
        ({"dsc": 0.90, "parity": False}, "failed the ONNX parity check"),
        ({"dsc": 0.90, "split": "split-b"}, "different test sets are not comparable"),
        ({"dsc": 0.90, "protocol": "transunet"}, "empty-mask rules differ"),
    ],
    ids=["lower-dsc", "equal-dsc", "failed-parity", "different-split", "different-protocol"],
)
def test_refusals_leave_aliases_untouched(client, name, challenger, reason):
    from medseg.tracking.promotion import promote

    v1 = add_challenger(client, name, 0.60)
    promote(name, client=client)
    v2 = add_challenger(client, name, **challenger)
    with pytest.raises(PromotionRefused, match=reason) as info:
        promote(name, client=client)
    assert info.value.result["decision"] == "refused"
    assert info.value.result["challenger_version"] == v2 and info.value.result["champion_version"] == v1
    assert alias(client, name, "champion") == v1
    assert alias(client, name, "challenger") == v2


def test_parity_failure_blocks_even_the_first_champion(client, name):
    from medseg.tracking.promotion import promote

    v1 = add_challenger(client, name, 0.8, parity=False)
    with pytest.raises(PromotionRefused, match="parity"):
        promote(name, client=client)
    assert alias(client, name, "champion") is None and alias(client, name, "challenger") == v1


def test_min_improvement_is_a_margin(client, name):
    from medseg.tracking.promotion import promote

    v1 = add_challenger(client, name, 0.60)
    promote(name, client=client)
    add_challenger(client, name, 0.62)
    with pytest.raises(PromotionRefused, match="by more than 0.05"):
        promote(name, client=client, min_improvement=0.05)
    v3 = add_challenger(client, name, 0.70)
    assert promote(name, client=client, min_improvement=0.05)["champion_version"] == v3 != v1


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.floats(0, 1, allow_nan=False), st.booleans(), st.sampled_from(["a", "b"])),
                min_size=1, max_size=5))
def test_champion_never_gets_worse(client, challengers):
    """Whatever sequence of challengers arrives, the champion's DSC only goes up, on one split, parity passed."""
    from medseg.tracking.promotion import promote

    name = f"medseg-test-prop-{next(_names)}"
    client.create_registered_model(name)
    best: tuple[float, str] | None = None
    for dsc, parity, split in challengers:
        add_challenger(client, name, dsc, parity, split)
        try:
            promote(name, client=client)
        except PromotionRefused:
            pass
        champion = alias(client, name, "champion")
        if champion is None:
            continue
        tags = client.get_model_version(name, champion).tags
        assert tags["parity_passed"] == "true"
        current = (float(tags["test_dsc"]), tags["test_cases_sha256"])
        if best is not None:
            assert current[1] == best[1] and current[0] >= best[0]
        best = current


def test_register_then_promote_end_to_end(tmp_path, monkeypatch, mlflow_db_template):
    from test_registry import fabricate_outputs, registry_params

    from medseg.tracking.promotion import promote_from_params
    from medseg.tracking.registry import register_model_version

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    seed_store(tmp_path, mlflow_db_template)
    params = registry_params(tmp_path)
    fabricate_outputs(tmp_path, "unet", seed=0, mean_dsc=0.7)
    first = register_model_version(params, "unet", tmp_path)
    assert promote_from_params(params, "unet", tmp_path)["champion_version"] == first["version"]

    # Re-registering the champion's own file does not make it a challenger again.
    assert register_model_version(params, "unet", tmp_path)["created"] is False
    assert promote_from_params(params, "unet", tmp_path)["code"] == "already-champion"

    fabricate_outputs(tmp_path, "unet", seed=1, mean_dsc=0.65)  # a retrained but worse model
    second = register_model_version(params, "unet", tmp_path)
    with pytest.raises(PromotionRefused, match="does not beat"):
        promote_from_params(params, "unet", tmp_path)
    from medseg.tracking.store import connect

    client = connect(first["tracking_uri"], retries=0)
    assert alias(client, first["model_name"], "champion") == first["version"]
    assert alias(client, first["model_name"], "challenger") == second["version"]


def test_promote_tells_each_case_apart_with_its_own_message_and_exit_code(client, name, capsys, monkeypatch):
    """`medseg promote`: no such model (error, 2), a model with no challenger (refused, 3), the challenger already
    champion (unchanged, 0), worse / different test data / parity failed (refused, 3, each its own reason)."""
    from medseg import cli
    from medseg.tracking.promotion import promote

    uri = client.tracking_uri
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def run(model: str) -> tuple[int, str]:
        code = cli.main(["promote", model, "--tracking-uri", uri])
        out = capsys.readouterr()
        return code, out.out + out.err

    code, text = run("medseg-test-promo-never-registered")
    assert code == 2 and "no registered model named 'medseg-test-promo-never-registered'" in text and name in text
    code, text = run(name)  # registered, nothing in it yet
    assert code == 3 and "none is champion" in text
    reasons = {}
    for dsc, parity, split, rule in ((0.7, True, "split-a", "first-champion"), (0.6, True, "split-a", "worse"),
                                     (0.9, True, "split-b", "different-test-data"),
                                     (0.9, False, "split-a", "parity-failed")):
        add_challenger(client, name, dsc, parity=parity, split=split)
        code, text = run(name)
        assert code == (0 if rule == "first-champion" else 3), text
        try:
            reasons[rule] = promote(name, client=client)["code"]
        except PromotionRefused as exc:
            reasons[rule] = exc.result["code"]
            assert exc.result["reason"] in text
    assert reasons == {"first-champion": "already-champion", "worse": "worse",
                       "different-test-data": "different-test-data", "parity-failed": "parity-failed"}
    client.delete_registered_model_alias(name, "challenger")
    code, text = run(name)
    assert code == 0 and '"already-champion"' in text


def test_a_champion_measured_on_old_content_is_not_compared_with_new_data(client, name):
    """Same test case ids, new scans (a re-ingest): the retrain's worse-looking DSC is not judged against a
    champion measured on the old data; the refusal says why and leaves the aliases alone."""
    from medseg.tracking.promotion import promote

    v1 = add_challenger(client, name, 0.9, data="v1data")
    promote(name, client=client)
    add_challenger(client, name, 0.5, data="v2data")
    with pytest.raises(PromotionRefused, match="same case ids but different content") as info:
        promote(name, client=client)
    assert info.value.result["code"] == "different-test-data" and "v1data" in info.value.result["reason"]
    assert alias(client, name, "champion") == v1
    v3 = add_challenger(client, name, 0.95, data="v1data")  # measured on the champion's data: compared
    assert promote(name, client=client)["code"] == "better" and alias(client, name, "champion") == v3


@pytest.mark.parametrize("remeasured_dsc, outcome", [(0.4, "better"), (0.6, "worse")])
def test_a_champion_on_old_data_is_compared_after_its_reevaluation(client, name, remeasured_dsc, outcome):
    """The champion (0.9 on the old scans) is measured again on the challenger's new scans: the challenger's 0.5
    beats a champion that scores 0.4 there, and loses to one that scores 0.6."""
    from medseg.tracking.gate import VersionFacts
    from medseg.tracking.promotion import promote

    v1 = add_challenger(client, name, 0.9, data="v1data")
    promote(name, client=client)
    v2 = add_challenger(client, name, 0.5, data="v2data")
    asked = []

    def reevaluate(champion: VersionFacts, challenger: VersionFacts) -> VersionFacts:
        asked.append((champion.version, challenger.version, challenger.test_data))
        return VersionFacts(version=champion.version, dsc=remeasured_dsc, test_cases=challenger.test_cases,
                            protocol="mm", parity=True, test_data=challenger.test_data, dataset_version="v2data")

    if outcome == "better":
        result = promote(name, client=client, reevaluate=reevaluate)
        assert result["code"] == "better" and alias(client, name, "champion") == v2
    else:
        with pytest.raises(PromotionRefused, match="does not beat") as info:
            promote(name, client=client, reevaluate=reevaluate)
        result = info.value.result
        assert result["code"] == "worse" and alias(client, name, "champion") == v1
    assert asked == [(v1, v2, "content-v2data")]
    assert result["champion_dsc"] == remeasured_dsc and result["champion_reevaluated"] is True
    assert f"champion {v1} re-evaluated on the challenger's test data (dataset version v2data): " \
           f"DSC {remeasured_dsc:.4f}, DSC 0.9000 on the data it was registered with" in result["reason"]


def test_a_champion_that_cannot_be_reevaluated_keeps_the_refusal_with_the_reason(client, name):
    from medseg.errors import ConfigError
    from medseg.tracking.promotion import promote

    v1 = add_challenger(client, name, 0.9, data="v1data")
    promote(name, client=client)
    add_challenger(client, name, 0.95, data="v2data")

    def reevaluate(champion, challenger):
        raise ConfigError("data/ingested/x: this checkout's test data is not the data expected")

    with pytest.raises(PromotionRefused, match="Re-evaluating champion .* failed: data/ingested/x") as info:
        promote(name, client=client, reevaluate=reevaluate)
    assert info.value.result["code"] == "different-test-data" and alias(client, name, "champion") == v1


def test_promote_reevaluates_the_registered_champion_on_new_scans_with_the_same_ids(tiny_project, tmp_path,
                                                                                     mlflow_db_template, monkeypatch):
    """End to end: a champion registered from the phantom, then new scans under the same case ids (a re-ingest),
    a retrained challenger: `promote` downloads the champion's model.onnx, scores it on the new test scans as the
    evaluate stage scores a checkpoint (the DSC evaluate_model gives for the champion's checkpoint on them), keeps
    the score on the champion's version, and decides on it."""
    import shutil

    import yaml

    import medseg.deployment.onnx_eval as onnx_eval
    from medseg.data.ingest import ingest_from_params
    from medseg.data.phantom import generate_from_params
    from medseg.deployment.export import export_model
    from medseg.evaluation.evaluate import evaluate_model
    from medseg.tracking.promotion import promote_from_params
    from medseg.tracking.registry import register_model_version
    from medseg.training.trainer import train_model

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "project"
    shutil.copytree(tiny_project, root)
    seed_store(root, mlflow_db_template)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["train"].update(max_steps_per_epoch=2)
    params["register"].update(retries=0)

    def train_evaluate_export_register(seed: int) -> dict:
        params["seed"] = seed
        train_model(params, "unet", root)
        evaluate_model(params, "unet", root)
        export_model(params, "unet", root)
        return register_model_version(params, "unet", root)

    first = train_evaluate_export_register(0)
    assert promote_from_params(params, "unet", root)["code"] == "first-champion"
    champion_checkpoint = tmp_path / "champion.pt"
    shutil.copy2(root / "models" / "unet" / "checkpoint.pt", champion_checkpoint)

    params["phantom"]["seed"] = 7  # new scans, same ids: what the gate once compared with the old DSC
    generate_from_params(params, root)
    ingest_from_params(params, root)
    second = train_evaluate_export_register(1)
    new_metrics = json.loads((root / "reports" / "unet" / "metrics.json").read_text())

    # what the evaluate stage says of the champion's checkpoint on the new scans
    shutil.copy2(champion_checkpoint, root / "models" / "unet" / "checkpoint.pt")
    expected = evaluate_model(params, "unet", root)["mean_dsc"]
    assert expected != pytest.approx(first["test_dsc"], abs=1e-6)  # the data did change the champion's score

    try:
        decision = promote_from_params(params, "unet", root)
    except PromotionRefused as exc:
        decision = exc.result
    assert decision["champion_reevaluated"] is True
    assert decision["champion_dsc"] == pytest.approx(expected, abs=2e-3)  # ONNX Runtime vs PyTorch, same rules
    assert decision["code"] == ("better" if new_metrics["mean_dsc"] > decision["champion_dsc"] else "worse")
    assert "re-evaluated on the challenger's test data" in decision["reason"]

    # the champion's new score is kept: deciding again does not evaluate again
    from medseg.tracking.store import connect

    client = connect(f"sqlite:///{root / 'mlflow.db'}", retries=0)
    champion = client.get_model_version(first["model_name"], first["version"])
    keys = [k for k in champion.tags if k.startswith("reevaluated.") and k.endswith(".test_dsc")]
    assert len(keys) == 1 and float(champion.tags[keys[0]]) == pytest.approx(decision["champion_dsc"])
    if decision["code"] == "worse":
        monkeypatch.setattr(onnx_eval, "evaluate_onnx", lambda *a, **k: pytest.fail("evaluated twice"))
        with pytest.raises(PromotionRefused):
            promote_from_params(params, "unet", root)
    assert second["version"] != first["version"]
