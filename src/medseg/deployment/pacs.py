"""A PACS round trip over DICOMweb: find a study's image series (QIDO-RS), retrieve each (WADO-RS), segment it with
a model (`medseg predict`: a DICOM SEG), store the SEG back into the study (STOW-RS), and check that the PACS lists
it. The protocol is DICOMweb's, through dicomweb-client (Orthanc's DICOMweb plugin, dcm4chee, Google Healthcare,
...): no home-made server.

Idempotent: a series that already has a SEG from the same model (algorithm name and version) in the study is not
segmented again. The source images are only read: a SEG is added to the study, nothing is changed or deleted.
A store the PACS refuses (an HTTP error, or a STOW-RS response listing the SEG as failed) and a SEG the PACS does
not list afterwards are errors (PacsError), never skipped silently. What is reported and logged names series by
their UIDs and never carries a patient attribute.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError

_log = logging.getLogger(__name__)

IMAGE_MODALITIES = ("CT", "MR")  # the series a volume model segments (a SEG, SR or RTSTRUCT series is not one)
STUDY_UID, SERIES_UID, MODALITY, SOP_UID = "0020000D", "0020000E", "00080060", "00080018"


class PacsError(MedsegError):
    """The PACS refused or lost something: the message says what, by UIDs."""


@dataclass(frozen=True)
class SeriesOutcome:
    series_uid: str
    status: str  # stored | already there
    seg_series_uid: str | None = None
    seg_sop_uid: str | None = None
    frames: int | None = None


def _value(dataset: dict[str, Any], tag: str) -> str:
    """The first value of `tag` in a DICOM JSON dataset (QIDO-RS / metadata answers), '' where absent."""
    values = (dataset.get(tag) or {}).get("Value") or [""]
    return str(values[0])


CREDENTIAL_ENV = ("DICOMWEB_TOKEN", "DICOMWEB_USER", "DICOMWEB_PASSWORD")


def client_for(url: str, timeout: float = 120) -> Any:
    """A DICOMweb client for `url`, authenticated from the environment (never from arguments, which process lists
    show): DICOMWEB_TOKEN (an OAuth bearer token), else DICOMWEB_USER + DICOMWEB_PASSWORD (HTTP basic)."""
    import os

    from medseg.data.clinical import require

    web = require("dicomweb_client")
    token, user, password = (os.environ.get(k) for k in CREDENTIAL_ENV)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    session = None
    if user and not token:
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(user, password or "")
    return web.DICOMwebClient(url=url.rstrip("/"), session=session, headers=headers, timeout=timeout)


def segment_study(url: str, study_uid: str, predictor: Any, *, model_version: str, client: Any = None,
                  modalities: tuple[str, ...] = IMAGE_MODALITIES, tta: bool | None = None) -> list[SeriesOutcome]:
    """Segment every image series of `study_uid` on the DICOMweb server at `url` with `predictor`
    (medseg.deployment.predict.Predictor) and store each SEG back into the study; one outcome per series."""
    client = client or client_for(url)
    card = predictor.card
    series = _search(client, "series", study_uid)
    images = [s for s in series if _value(s, MODALITY) in modalities]
    if not images:
        found = sorted({_value(s, MODALITY) for s in series}) or ["none"]
        raise PacsError(f"study {study_uid} on {url}: no {'/'.join(modalities)} series to segment (series found: "
                        f"{', '.join(found)})")
    done = _segmented_series(client, study_uid, series, f"medseg {card.arch}", model_version)
    outcomes = []
    for entry in images:
        series_uid = _value(entry, SERIES_UID)
        if series_uid in done:
            _log.info("series %s: a SEG of medseg %s version %s is in the study already", series_uid, card.arch,
                      model_version)
            outcomes.append(SeriesOutcome(series_uid, "already there", done[series_uid]))
            continue
        outcomes.append(_segment_series(client, url, study_uid, series_uid, predictor, model_version, tta))
    return outcomes


def _search(client: Any, level: str, study_uid: str) -> list[dict[str, Any]]:
    try:
        if level == "series":
            return list(client.search_for_series(study_instance_uid=study_uid))
        return list(client.search_for_instances(study_instance_uid=study_uid))
    except Exception as exc:  # requests' HTTPError / ConnectionError: the PACS's answer, as it gave it
        raise PacsError(f"QIDO-RS search of study {study_uid} failed: {_first_line(exc)}") from exc


def _segmented_series(client: Any, study_uid: str, series: list[dict[str, Any]], algorithm: str,
                      version: str) -> dict[str, str]:
    """{source series UID: SEG series UID} for the SEGs of this algorithm and version already in the study."""
    from medseg.data.clinical import require

    pydicom = require("pydicom")
    done: dict[str, str] = {}
    for entry in series:
        if _value(entry, MODALITY) != "SEG":
            continue
        seg_series = _value(entry, SERIES_UID)
        try:
            metadata = client.retrieve_series_metadata(study_instance_uid=study_uid, series_instance_uid=seg_series)
        except Exception as exc:
            raise PacsError(f"WADO-RS metadata of SEG series {seg_series} failed: {_first_line(exc)}") from exc
        for instance in metadata:
            ds = pydicom.Dataset.from_json(instance, bulk_data_uri_handler=lambda *args: b"")
            algorithms = {(str(a.get("AlgorithmName", "")), str(a.get("AlgorithmVersion", "")))
                          for segment in ds.get("SegmentSequence", [])
                          for a in segment.get("SegmentationAlgorithmIdentificationSequence", [])}
            if (algorithm, version) in algorithms:
                for reference in ds.get("ReferencedSeriesSequence", []):
                    done[str(reference.SeriesInstanceUID)] = seg_series
    return done


def _segment_series(client: Any, url: str, study_uid: str, series_uid: str, predictor: Any, model_version: str,
                    tta: bool | None) -> SeriesOutcome:
    from medseg.data.clinical import require
    from medseg.deployment.predict import predict_files

    pydicom = require("pydicom")
    with tempfile.TemporaryDirectory(prefix="medseg-pacs-") as tmp:
        folder = Path(tmp) / "series"
        folder.mkdir()
        try:
            # as stored (transfer-syntax=*): medseg decodes JPEG / JPEG 2000 itself, where a PACS may not transcode
            instances = client.retrieve_series(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                               media_types=(("application/dicom", "*"),))
        except Exception as exc:
            raise PacsError(f"WADO-RS retrieve of series {series_uid} failed: {_first_line(exc)}") from exc
        for i, instance in enumerate(instances):
            instance.save_as(folder / f"{i:05d}.dcm", enforce_file_format=True)
        _log.info("series %s: %d instances retrieved, segmenting", series_uid, len(instances))
        (summary,) = predict_files(predictor, folder, Path(tmp) / "out", tta=tta, algorithm_version=model_version)
        seg = pydicom.dcmread(summary["output"])
    response = _store(client, study_uid, seg)
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reasons = ", ".join(str(item.get("FailureReason", "?")) for item in failed)
        raise PacsError(f"STOW-RS refused the SEG {seg.SOPInstanceUID} of series {series_uid} (failure reason "
                        f"{reasons})")
    listed = {_value(s, SOP_UID) for s in _search(client, "instances", study_uid)}
    if str(seg.SOPInstanceUID) not in listed:
        raise PacsError(f"STOW-RS: the PACS took the SEG {seg.SOPInstanceUID} of series {series_uid} without an "
                        f"error, but study {study_uid} does not list it (refused or dropped by the PACS)")
    _log.info("series %s: SEG %s stored (series %s, %d frames)", series_uid, seg.SOPInstanceUID,
              seg.SeriesInstanceUID, int(seg.NumberOfFrames))
    return SeriesOutcome(series_uid, "stored", str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID),
                         int(seg.NumberOfFrames))


def _store(client: Any, study_uid: str, seg: Any) -> Any:
    try:
        return client.store_instances(datasets=[seg], study_instance_uid=study_uid)
    except Exception as exc:  # an HTTP error status: the PACS refused the whole request
        raise PacsError(f"STOW-RS of the SEG {seg.SOPInstanceUID} into study {study_uid} failed: "
                        f"{_first_line(exc)}") from exc


def outcomes_as_rows(outcomes: list[SeriesOutcome]) -> list[dict[str, Any]]:
    return [asdict(o) for o in outcomes]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
