"""A DICOM series' predicted classes as a DICOM Segmentation object (highdicom), as MONAI Deploy's DICOM SEG writer
gives it to a PACS: one segment per foreground class of the model card (its name, a display colour), the algorithm
identified (the model and its version), the source series and its frame of reference referenced, one frame per
source slice that holds a segment. The SEG belongs to the source study (highdicom copies the patient and study
modules from the source images, as a PACS expects); it is a new series, and nothing of the source is changed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg import __version__
from medseg.deployment.card import ModelCard
from medseg.errors import PredictError

SERIES_NUMBER = 9901  # a number PACS viewers sort after the acquisitions
REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "FrameOfReferenceUID")


def write_segmentation(path: Path, classes_xyz: np.ndarray, series_folder: Path, card: ModelCard, version: str,
                       content_description: str) -> None:
    """Class indices (x, y, z) in the voxel order medseg.data.clinical reads the series in (x: column, y: row,
    z: slices along the normal) as a SEG at `path` referencing that series; `version` names the model's version
    in the algorithm identification."""
    from medseg.data.clinical import require, series_headers

    hd = require("highdicom")
    require("pydicom")
    from pydicom.sr.codedict import codes

    # the slices' headers in the order the classes' z axis has (no pixel decoded: predict has read them)
    sources = [ds for _, ds in series_headers(series_folder)[0]]
    missing = sorted({k for ds in sources for k in REQUIRED_UIDS if not str(ds.get(k, "") or "")})
    if missing:
        raise PredictError(series_folder, f"the series has no {', '.join(missing)}: a DICOM SEG must reference its "
                                          "source images by these UIDs (give the series its UIDs, as a PACS does)")
    frames = np.ascontiguousarray(np.asarray(classes_xyz, dtype=np.uint8).transpose(2, 1, 0))  # (slices, rows, cols)
    algorithm = hd.AlgorithmIdentificationSequence(name=f"medseg {card.arch}"[:64], version=str(version)[:64],
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=k, segment_label=str(name)[:64], segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm, tracking_uid=hd.UID(), tracking_id=str(name)[:64],
            display_color=hd.color.CIELabColor.from_rgb(*card.colour_of(k)))
        for k, name in enumerate(card.class_names) if k > 0]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medseg",
        manufacturer_model_name=f"medseg {card.arch}"[:64], software_versions=__version__, device_serial_number="0",
        content_description=content_description[:64], content_label="MEDSEG",
        series_description=f"medseg {card.arch} segmentation"[:64],
        omit_empty_frames=bool((frames > 0).any()))  # an empty prediction keeps its (empty) frames: a SEG needs one
    seg.save_as(path, enforce_file_format=True)


def read_segmentation(path: Path, series_folder: Path) -> np.ndarray:
    """The class indices (x, y, z) a SEG holds, in the voxel order of its source series (the inverse of
    write_segmentation): for checks and tests."""
    from medseg.data.clinical import read_dicom_series, read_seg_labels

    return read_seg_labels(path, read_dicom_series(series_folder))
