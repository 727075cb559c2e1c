"""The flows' Prefect artifacts: the metrics table and the promotion decisions (pure builders, then the task that
publishes them)."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE


def _fmt(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value


def metrics_table(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per architecture (failed ones included, with their error) for a Prefect table artifact; DSC in %
    to one decimal and HD95 to two with its unit, as reports/comparison.md shows them."""
    rows = []
    for arch, res in results.items():
        dsc = res.get("mean_dsc")
        rows.append(
            {
                "architecture": arch,
                "status": res.get("status", "unknown"),
                "test_dsc_percent": round(dsc * 100, 1) if isinstance(dsc, float) else None,
                "test_hd95": _fmt(res.get("mean_hd95"), 2),
                "test_nsd_percent": _fmt(100 * res["mean_nsd"], 1) if isinstance(res.get("mean_nsd"), float) else None,
                "hd95_unit": res.get("hd95_unit"),
                "protocol": res.get("protocol"),
                "onnx_parity": res.get("parity_passed"),
                "model_version": res.get("version"),
                "model_uri": res.get("model_uri"),
                "mlflow": res.get("model_version_url") or res.get("mlflow_run_url") or res.get("run_id"),
                "error": (res.get("error") or "")[:200],
            }
        )
    return rows


def promotion_markdown(decisions: dict[str, dict[str, Any]], dataset_version_id: str | None = None) -> str:
    """The promotion decisions as markdown (one line per architecture, with the gate's reason)."""
    lines = ["# medseg promotion decisions", ""]
    if dataset_version_id:
        lines += [f"Dataset version: `{dataset_version_id}`", ""]
    lines += ["| architecture | model | decision | reason |", "|---|---|---|---|"]
    for arch, dec in decisions.items():
        reason = str(dec.get("reason", "")).replace("\n", " ").replace("|", "\\|")
        model = dec.get("model_name", "")
        if dec.get("model_version_url"):  # a link to the version in MLflow's UI (tracking server stores)
            model = f"[{model}]({dec['model_version_url']})"
        lines.append(f"| {arch} | {model} | **{dec.get('decision', '')}** | {reason} |")
    promoted = [a for a, d in decisions.items() if d.get("decision") == "promoted"]
    lines += ["", f"Promoted to `champion`: {', '.join(promoted) if promoted else 'none'}."]
    return "\n".join(lines) + "\n"


METRICS_ARTIFACT_KEY = "medseg-metrics"
PROMOTION_ARTIFACT_KEY = "medseg-promotion"


@task(name="publish-artifacts", cache_policy=NO_CACHE)
def publish_artifacts(
    results: dict[str, dict[str, Any]], decisions: dict[str, dict[str, Any]], dataset_version_id: str | None
) -> None:
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_table_artifact(
        table=metrics_table(results),
        key=METRICS_ARTIFACT_KEY,
        description="Test-set DSC / HD95 per architecture (medseg evaluate stage)",
    )
    create_markdown_artifact(
        markdown=promotion_markdown(decisions, dataset_version_id),
        key=PROMOTION_ARTIFACT_KEY,
        description="Champion gate decisions (medseg.tracking.promotion.promote)",
    )
