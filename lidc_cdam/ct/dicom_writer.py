"""A CT volume written as a DICOM series (one CT image file per slice), with its geometry kept exact.

:func:`write_ct_series` stores HU as unsigned 16-bit with RescaleIntercept -1024 and every decimal (positions,
orientation, spacing) as the closest DICOM decimal string (``format_number_as_ds``), so reading the series back
gives the volume's HU and geometry. UIDs are derived from the patient id (the same id gives the same series:
fixtures rebuilt alike) unless ``fresh_uids`` asks for new ones (a new study, e.g. to upload to a PACS).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lidc_cdam.ct.volume import CTVolume
from lidc_cdam.io import atomic_write

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def ds_value(value: float) -> str:
    """A decimal string (DS, at most 16 characters) as close to ``value`` as DICOM allows."""
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value) + 0.0)  # + 0.0: no "-0"


def write_ct_series(volume: CTVolume, folder: str | Path, patient_id: str | None = None, *, fresh_uids: bool = False,
                    study_date: str | None = None, accession: str | None = None, study_description: str = "",
                    series_description: str = "") -> Path:
    """``volume`` (axial) as a CT DICOM series in ``folder`` (``0001.dcm``...); returns ``folder``.

    ``fresh_uids``: new Study, Series, Frame of Reference and SOP Instance UIDs (else derived from the patient id).
    ``study_date`` (``YYYYMMDD``), ``accession`` and the descriptions fill the study and series attributes a PACS
    search shows."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    patient_id = patient_id or volume.meta.get("patient_id", "ANONYMOUS")

    def uid(*parts: str) -> str:
        return generate_uid() if fresh_uids else generate_uid(entropy_srcs=list(parts))

    study = uid(patient_id, "study")
    series = uid(patient_id, "series")
    frame = uid(study, "frame")
    stored = np.clip(volume.hu.astype(np.int32) + 1024, 0, 65535).astype(np.uint16)
    d = volume.dmat
    for k in range(volume.shape[0]):
        pos = volume.index_to_world(np.array([k, 0, 0]))
        sop = uid(series, str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CT_IMAGE_STORAGE, sop, "CT"
        ds.PatientID = ds.PatientName = patient_id
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame
        if study_date:
            ds.StudyDate = study_date
        if accession:
            ds.AccessionNumber = accession
        if study_description:
            ds.StudyDescription = study_description
        if series_description:
            ds.SeriesDescription = series_description
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageComments = str(volume.meta.get("note", ""))[:10240]
        ds.ImagePositionPatient = [ds_value(v) for v in pos]
        ds.ImageOrientationPatient = [ds_value(v) for v in (*d[:, 0], *d[:, 1])]
        ds.PixelSpacing = [ds_value(volume.spacing[1]), ds_value(volume.spacing[0])]  # row, column spacing
        ds.SliceThickness = ds_value(volume.spacing[2])
        ds.SliceLocation = ds_value(pos[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "-1024", "1", "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        atomic_write(folder / f"{k + 1:04d}.dcm",
                     lambda tmp, ds=ds: pydicom.dcmwrite(tmp, ds, enforce_file_format=True))
    return folder
