"""The Grad-CAM overlays of a volume's top slices as a DICOM Secondary Capture series (highdicom), beside the SR.

Each capture is the slice as the model saw it (the card's framing, grey) with the Grad-CAM map of the predicted
class blended over it (`crosssite.gradcam.overlay`), enlarged to `DISPLAY_SIZE` pixels for reading, RGB. It
cites its source slice (Source Image Sequence), says what it is in Image Comments (P(COVID), research use only)
and copies the patient and study attributes from the source slice, as highdicom does; its UIDs are new.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DISPLAY_SIZE", "SERIES_DESCRIPTION", "build_captures"]

DISPLAY_SIZE = 256
SERIES_DESCRIPTION = "crosssite Grad-CAM - research use only"


def build_captures(top: Sequence[tuple[Any, float, Path]], *, series_number: int = 9902) -> list[Any]:
    """One `highdicom.sc.SCImage` per ``(source header, P(COVID), overlay PNG)``, all in one new series."""
    import highdicom as hd
    from PIL import Image
    from pydicom.dataset import Dataset

    series_uid = hd.UID()
    captures = []
    for k, (source, p, png) in enumerate(top):
        with Image.open(png) as image:
            rgb = np.asarray(image.convert("RGB").resize((DISPLAY_SIZE, DISPLAY_SIZE), Image.BILINEAR), np.uint8)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=source, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
            coordinate_system="PATIENT", patient_orientation=("L", "P"), series_instance_uid=series_uid,
            series_number=series_number, sop_instance_uid=hd.UID(), instance_number=k + 1,
            manufacturer="crosssite", series_description=SERIES_DESCRIPTION,
            transfer_syntax_uid="1.2.840.10008.1.2.1",
        )
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
        sc.SourceImageSequence = [ref]
        sc.ImageComments = (f"Grad-CAM of the predicted class; P(COVID) {p:.4f}; research result, not for "
                            "diagnosis")[:10240]
        captures.append(sc)
    return captures
