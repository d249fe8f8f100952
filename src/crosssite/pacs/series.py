"""A CT series written from 2D slices: grey images become Hounsfield units, stored as a conformant CT Image
Storage series (one file per slice) that a PACS accepts. For demonstrations, tests and benchmarks: the real
public data sets hold PNG / JPEG slices only, and a PACS needs DICOM.

The grey value g in [0, 1] maps to HU = level - width / 2 + g * width under the lung window crosssite reads DICOM
with (`crosssite.data.LUNG_WINDOW`), so reading the series back gives the slices again (to 12-bit precision).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crosssite.data import LUNG_WINDOW

__all__ = ["write_ct_series"]


def write_ct_series(images: Sequence[np.ndarray], folder: Path, *, patient_name: str = "Anonymous^Research",
                    patient_id: str = "CROSSSITE-0001", study_uid: str | None = None,
                    series_uid: str | None = None, series_number: int = 1, thickness_mm: float = 5.0,
                    modality: str = "CT", description: str = "chest CT (written by crosssite)") -> list[Path]:
    """Write ``images`` (grey (H, W) in [0, 1]) as one CT series into ``folder``; return the files in slice order.
    Slices of different sizes are written as they are (each file holds its own Rows / Columns)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    level, width = LUNG_WINDOW
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    today = dt.date.today().strftime("%Y%m%d")
    paths = []
    for k, image in enumerate(images):
        hu = level - width / 2 + np.clip(np.asarray(image, np.float64), 0, 1) * width
        stored = np.round(hu + 2048).astype(np.uint16)  # (H, W); the lung window lies within 12 bits above -2048 HU
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = today
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = modality, "crosssite", description
        ds.SeriesNumber, ds.InstanceNumber = series_number, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(k * thickness_mm)]
        ds.SliceThickness, ds.PixelSpacing, ds.KVP = thickness_mm, [0.7, 0.7], 120
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = stored.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -2048, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = level, width
        ds.PixelData = stored.tobytes()
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
