"""Any CT in (:mod:`lidc_cdam.ct.read`): DICOM series uncompressed and compressed (RLE, JPEG-LS, JPEG lossless,
JPEG 2000 lossless and lossy), folders with several series, a multi-frame file, NIfTI in LPS, and the refusals.

Every series is built in ``tmp_path`` from the real CT slices that pydicom ships, restacked along the slice
normal with new UIDs; decoded HU are checked against the uncompressed original (lossless codecs) and against
an independent decoder (GDCM inside SimpleITK).
"""

from __future__ import annotations

import copy
import gzip
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    JPEG2000,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from lidc_cdam.ct import CTError, SeriesRefused, list_series, read_ct
from lidc_cdam.ct.dicom_reader import MIN_SLICES

N = 10
STEP = 2.5  # mm between slices


def _source(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file(name))


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _graft_gdcm(ds: pydicom.Dataset, stored: np.ndarray, compressor: str, tmp: Path) -> None:
    """Encode ``stored`` with GDCM (SimpleITK's writer) and put that pixel data into ``ds`` (JPEG lossless:
    pydicom has no encoder for it)."""
    import SimpleITK as sitk

    tmp.mkdir(exist_ok=True)
    out = tmp / "gdcm.dcm"
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")
    writer.SetFileName(str(out))
    writer.UseCompressionOn()
    writer.SetCompressor(compressor)
    writer.Execute(sitk.GetImageFromArray(stored[None].astype(np.int16)))
    enc = pydicom.dcmread(out)
    assert (enc.BitsAllocated, enc.PixelRepresentation) == (16, 1)
    ds["PixelData"] = enc["PixelData"]
    ds.BitsStored, ds.HighBit = enc.BitsStored, enc.HighBit
    ds.file_meta.TransferSyntaxUID = enc.file_meta.TransferSyntaxUID


def write_series(folder: Path, source: str = "CT_small.dcm", n: int = N, codec=None, step=STEP, vary: bool = True,
                 series_uid: str | None = None, modality: str = "CT", description: str = "restacked",
                 image_type=None, iop=None, shift=(0.0, 0.0), skip=()) -> dict:
    """``n`` slices of a pydicom CT test file in ``folder``: new UIDs, ImagePositionPatient stepping ``step`` mm
    along the slice normal (plus ``shift`` mm along the row cosine, column cosine per slice: gantry tilt),
    InstanceNumber; slice k's stored values + 3 k when ``vary`` (re-encoded with ``codec``: a pydicom
    transfer syntax, "gdcm-jpeg", or None to keep the source's encoding). Returns the expected HU and
    geometry."""
    folder.mkdir(parents=True, exist_ok=True)
    src = _source(source)
    series_uid = series_uid or generate_uid()
    if iop is not None:
        src.ImageOrientationPatient = [float(v) for v in iop]
    iop = np.array([float(v) for v in src.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    ipp0 = np.array([float(v) for v in src.ImagePositionPatient])
    stored0 = src.pixel_array.copy() if (vary or codec is not None) else None
    expected, positions = [], []
    for k in range(n):
        if k in skip:
            continue
        ds = copy.deepcopy(src)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = description
        ds.Modality = modality
        ds.InstanceNumber = k + 1
        if image_type is not None:
            ds.ImageType = image_type
        pos = ipp0 + k * step * normal + k * (shift[0] * iop[:3] + shift[1] * iop[3:])
        ds.ImagePositionPatient = [round(float(v), 4) for v in pos]
        if stored0 is not None:
            stored = (stored0 + 3 * k if vary else stored0).astype(stored0.dtype)
            if codec is None:
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    ds.decompress()
                ds.PixelData = stored.tobytes()
            elif codec == "gdcm-jpeg":
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    ds.decompress()
                _graft_gdcm(ds, stored, "JPEG", folder.parent / "gdcm-tmp")
            else:
                if ds.file_meta.TransferSyntaxUID.is_compressed:
                    ds.decompress()
                ds.PixelData = stored.tobytes()
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                kwargs = {"j2k_cr": [10]} if codec == JPEG2000 else {}
                ds.compress(codec, stored, **kwargs)
            expected.append(stored.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
        else:
            expected.append(_hu(src))
        positions.append(pos)
        ds.save_as(folder / f"im{(n - k) * 7 % 97:03d}.dcm", enforce_file_format=True)  # names not in z order
    return {"hu": np.stack(expected), "positions": np.stack(positions), "iop": iop, "uid": series_uid,
            "spacing": [float(v) for v in src.PixelSpacing]}


def _sitk_hu(folder: Path) -> np.ndarray:
    """GDCM's decoding (SimpleITK), an independent decoder, sorted along the normal as ours."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return sitk.GetArrayFromImage(reader.Execute()).astype(np.float64)


def _check_geometry(vol, truth: dict) -> None:
    assert vol.shape == truth["hu"].shape
    np.testing.assert_allclose(vol.origin, truth["positions"][0], atol=1e-3)
    # every slice's ImagePositionPatient and the in-plane steps in LPS mm
    np.testing.assert_allclose(vol.index_to_world(np.array([[k, 0, 0] for k in range(vol.shape[0])])),
                               truth["positions"], atol=1e-3)
    row_mm, col_mm = truth["spacing"]
    np.testing.assert_allclose(vol.index_to_world(np.array([0, 3, 5])),
                               truth["positions"][0] + 5 * col_mm * truth["iop"][:3] + 3 * row_mm * truth["iop"][3:],
                               atol=1e-3)


# --------------------------------------------------------------------------------------------- codecs

LOSSLESS = {"uncompressed": None, "rle": RLELossless, "jpeg-ls": JPEGLSLossless, "j2k-lossless": JPEG2000Lossless,
            "jpeg-lossless": "gdcm-jpeg"}


@pytest.mark.parametrize("name", list(LOSSLESS))
def test_lossless_series_decode_to_the_original_hu(tmp_path, name):
    codec = LOSSLESS[name]
    if codec not in (None, "gdcm-jpeg"):
        from pydicom.pixels import get_encoder

        if not get_encoder(codec).is_available:
            pytest.skip(f"no {codec.name} encoder here")
    truth = write_series(tmp_path / "series", codec=codec)
    files = sorted((tmp_path / "series").glob("*.dcm"))
    ts = pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts == (ExplicitVRLittleEndian if codec is None else JPEGLosslessSV1 if codec == "gdcm-jpeg" else codec)
    vol = read_ct(tmp_path / "series")
    assert vol.hu.dtype == np.int16 and vol.meta["modality"] == "CT" and vol.meta["transfer_syntax"] == str(ts)
    np.testing.assert_array_equal(vol.hu, truth["hu"])  # exactly the uncompressed HU, sorted along the normal
    np.testing.assert_array_equal(vol.hu, _sitk_hu(tmp_path / "series"))  # and what GDCM decodes
    _check_geometry(vol, truth)
    assert vol.spacing == pytest.approx((truth["spacing"][1], truth["spacing"][0], STEP))
    assert vol.rotate is None and not vol.meta["warnings"]


def test_jpeg2000_lossless_oblique_source_restacked_as_is(tmp_path):
    """J2K_pixelrep_mismatch.dcm: a JPEG 2000 lossless CT slice of a tilted (oblique, orthogonal) acquisition,
    restacked along its own normal without re-encoding: a rotated grid, read with a warning."""
    truth = write_series(tmp_path / "s", source="J2K_pixelrep_mismatch.dcm", vary=False)
    assert pydicom.dcmread(next((tmp_path / "s").glob("*.dcm"))).file_meta.TransferSyntaxUID == JPEG2000Lossless
    vol = read_ct(tmp_path / "s")
    np.testing.assert_array_equal(vol.hu, truth["hu"])
    _check_geometry(vol, truth)
    np.testing.assert_allclose(vol.dmat[:, 2], np.cross(truth["iop"][:3], truth["iop"][3:]), atol=1e-4)
    assert vol.rotate is not None and "oblique" in vol.meta["warning"]


def test_jpeg2000_lossy_slices_restacked_and_re_encoded(tmp_path):
    # 693_J2KI.dcm is already lossy JPEG 2000: restacked as it is, it decodes as pydicom and GDCM decode it
    truth = write_series(tmp_path / "asis", source="693_J2KI.dcm", vary=False)
    vol = read_ct(tmp_path / "asis")
    assert vol.meta["transfer_syntax"] == str(JPEG2000)
    np.testing.assert_array_equal(vol.hu, truth["hu"])
    assert np.abs(vol.hu - _sitk_hu(tmp_path / "asis")).max() <= 1
    _check_geometry(vol, truth)
    # CT_small re-encoded lossy (compression ratio 10): close to the original, not equal
    from pydicom.pixels import get_encoder

    if not get_encoder(JPEG2000).is_available:
        pytest.skip("no lossy JPEG 2000 encoder here")
    truth = write_series(tmp_path / "lossy", codec=JPEG2000)
    vol = read_ct(tmp_path / "lossy")
    err = np.abs(vol.hu - truth["hu"])
    assert err.mean() < 20 and vol.shape == truth["hu"].shape


def test_multiframe_file(tmp_path):
    """One enhanced multi-frame file: per-frame positions, shared orientation, spacing and rescale."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    src = _source("CT_small.dcm")
    stored = np.stack([src.pixel_array + 3 * k for k in range(N)]).astype(src.pixel_array.dtype)
    ds = copy.deepcopy(src)
    iop = np.array([float(v) for v in src.ImageOrientationPatient])
    ipp0 = np.array([float(v) for v in src.ImagePositionPatient])
    for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        del ds[key]
    ds.NumberOfFrames = N
    ds.PixelData = stored.tobytes()
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([Dataset()])
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = list(iop)
    shared.PixelMeasuresSequence = Sequence([Dataset()])
    shared.PixelMeasuresSequence[0].PixelSpacing = list(src.PixelSpacing)
    shared.PixelValueTransformationSequence = Sequence([Dataset()])
    shared.PixelValueTransformationSequence[0].RescaleSlope = 1
    shared.PixelValueTransformationSequence[0].RescaleIntercept = -1024
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    order = [3, 0, 7, 1, 9, 2, 5, 4, 8, 6]  # frames stored out of z order
    ds.PixelData = stored[order].tobytes()
    for k in order:
        fr = Dataset()
        fr.PlanePositionSequence = Sequence([Dataset()])
        fr.PlanePositionSequence[0].ImagePositionPatient = list(ipp0 + np.array([0.0, 0.0, STEP * k]))
        frames.append(fr)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    path = tmp_path / "multi.dcm"
    ds.save_as(path, enforce_file_format=True)
    vol = read_ct(path)
    np.testing.assert_array_equal(vol.hu, stored.astype(np.float64) - 1024)
    np.testing.assert_allclose(vol.origin, ipp0, atol=1e-3)
    assert vol.spacing[2] == pytest.approx(STEP)


def test_a_file_of_a_series_reads_the_series(tmp_path):
    truth = write_series(tmp_path / "s")
    vol = read_ct(next((tmp_path / "s").glob("*.dcm")))
    np.testing.assert_array_equal(vol.hu, truth["hu"])


def test_synthetic_series_reads_as_with_simpleitk():
    from lidc_cdam.ct.testing import synthetic
    from lidc_cdam.ct.volume import read_dicom_folder

    folder = synthetic()["dicom"]
    ours, theirs = read_ct(folder), read_dicom_folder(folder)
    np.testing.assert_array_equal(ours.hu, theirs.hu)
    np.testing.assert_allclose(ours.spacing, theirs.spacing, atol=1e-4)
    np.testing.assert_allclose(ours.origin, theirs.origin, atol=1e-3)
    np.testing.assert_allclose(ours.direction, theirs.direction, atol=1e-6)


# --------------------------------------------------------------------------------------------- several series


def test_folder_with_several_series(tmp_path):
    root = tmp_path / "study"
    small = write_series(root / "a", n=10, description="small CT")
    big = write_series(root / "b", n=12, description="big CT")
    write_series(root / "c", n=20, modality="MR", description="an MR")
    write_series(root / "d", n=30, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER"], description="scout")
    found = list_series(root)
    assert [s.description for s in found] == ["small CT", "big CT", "an MR", "scout"]
    rows = [s.summary() for s in found]
    assert [r["n_slices"] for r in rows] == [10, 12, 20, 30] and rows[0]["size"] == "10 x 128 x 128"
    assert [r["modality"] for r in rows] == ["CT", "CT", "MR", "CT"] and rows[3]["localizer"]
    assert rows[1]["series_instance_uid"] == big["uid"] and rows[0]["megabytes"] > 0.3
    assert read_ct(root).meta["series_instance_uid"] == big["uid"]  # the largest CT, not the MR nor the scout
    assert read_ct(root, series=small["uid"]).shape == (10, 128, 128)
    assert read_ct(root, series=0).meta["series_instance_uid"] == small["uid"]
    with pytest.raises(SeriesRefused, match=r"index 7 out of range: 4 series") as err:
        read_ct(root, series=7)
    assert str(root) in str(err.value)
    with pytest.raises(SeriesRefused, match=r"no series with SeriesInstanceUID 1\.2\.3"):
        read_ct(root, series="1.2.3")
    with pytest.raises(SeriesRefused, match=r"modality MR, not CT") as err:
        read_ct(root, series=2)
    assert err.value.reason == "not_ct"


# --------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("case, reason, pattern", [
    ("mr", "not_ct", r"modality MR, not CT"),
    ("localizer", "localizer", r"localizer"),
    ("tilt", "gantry_tilt", r"do not stack along their normal .*gantry tilt"),
    ("skew", "non_orthogonal", r"not two orthogonal unit vectors"),
    ("few", "too_few_slices", rf"has 5 slice\(s\); at least {MIN_SLICES}"),
    ("missing", "uneven_spacing", r"uneven slice spacing: gap of 5\.000 mm .*median 2\.500"),
    ("duplicate-only", "too_few_slices", r"has 1 slice"),
])
def test_refusals_name_the_folder_and_the_problem(tmp_path, case, reason, pattern):
    folder = tmp_path / case
    kwargs = {"mr": {"modality": "MR"}, "localizer": {"image_type": ["DERIVED", "SECONDARY", "LOCALIZER"]},
              "tilt": {"shift": (0.0, 0.9)}, "skew": {"iop": [1, 0, 0, 0.3, 0.954, 0]}, "few": {"n": 5},
              "missing": {"skip": (4,)}, "duplicate-only": {"step": 0.0}}[case]
    write_series(folder, **kwargs)
    with pytest.raises(SeriesRefused, match=pattern) as err:
        read_ct(folder)
    assert err.value.reason == reason and str(folder) in str(err.value)


def test_no_ct_here(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CTError, match="no DICOM files here"):
        read_ct(tmp_path)
    with pytest.raises(CTError, match=r"notes\.txt: neither a DICOM image nor an image file .*NIfTI .*NRRD "
                                      r".*MetaImage"):
        read_ct(tmp_path / "notes.txt")
    with pytest.raises(CTError, match="no such file"):
        read_ct(tmp_path / "nothing")


# --------------------------------------------------------------------------------------------- NIfTI


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, slope: float = 1.0, inter: float = 0.0) -> bytes:
    """A NIfTI-1 single file written by hand (sform = ``affine``, RAS mm; ``data`` indexed [i, j, k])."""
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, *data.shape, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 4, 16)  # datatype int16, bitpix
    zooms = np.linalg.norm(affine[:3, :3], axis=0)
    struct.pack_into("<8f", hdr, 76, 1.0, *zooms, 1, 1, 1, 1)
    struct.pack_into("<fff", hdr, 108, 352.0, slope, inter)
    struct.pack_into("<B", hdr, 123, 2)  # xyzt_units: mm
    struct.pack_into("<hh", hdr, 252, 0, 1)  # qform_code 0, sform_code 1 (scanner)
    for r in range(3):
        struct.pack_into("<4f", hdr, 280 + 16 * r, *affine[r])
    hdr[344:348] = b"n+1\x00"
    return bytes(hdr) + bytes(4) + np.asarray(data, dtype="<i2").tobytes(order="F")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_lands_in_lps(tmp_path, suffix):
    shape = (20, 16, 10)  # i, j, k
    data = np.arange(np.prod(shape), dtype=np.int16).reshape(shape) % 2000
    # a RAS affine with flips: i towards the patient's right... left (-0.8 mm), j anterior, k superior 2.5 mm
    affine = np.array([[-0.8, 0, 0, 100.0], [0, 0.7, 0, -50.0], [0, 0, 2.5, -300.0], [0, 0, 0, 1]])
    raw = _nifti_bytes(data, affine, slope=1.0, inter=-1024.0)
    path = tmp_path / f"scan{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    vol = read_ct(path)
    assert vol.shape == shape[::-1] and vol.meta["format"] == "NIfTI" and vol.name == "CT scan"
    for ijk in [(0, 0, 0), (19, 15, 9), (7, 3, 5)]:
        ras = affine @ np.array([*ijk, 1.0])
        lps = np.array([-ras[0], -ras[1], ras[2]])
        np.testing.assert_allclose(vol.index_to_world(np.array(ijk[::-1])), lps, atol=1e-4)
        assert vol.hu[ijk[::-1]] == data[ijk] - 1024  # scl_inter applied
    assert vol.spacing == pytest.approx((0.8, 0.7, 2.5))
    np.testing.assert_allclose(vol.world_to_index(vol.index_to_world(np.array([5.0, 6.0, 7.0]))), [5, 6, 7])


def test_nifti_refusals(tmp_path):
    path = tmp_path / "thin.nii"
    path.write_bytes(_nifti_bytes(np.zeros((8, 8, 3), np.int16), np.diag([1.0, 1, 1, 1])))
    with pytest.raises(SeriesRefused, match=r"thin\.nii: 3 slice\(s\)"):
        read_ct(path)
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(SeriesRefused, match="cannot be read as NIfTI"):
        read_ct(bad)


# --------------------------------------------------------------------------------------------- viewer reader


def test_viewer_reader_opens_nifti_and_compressed_series(tmp_path):
    from lidc_cdam.viewer._reader import get_reader  # no napari needed for the reader itself

    path = tmp_path / "scan.nii.gz"
    path.write_bytes(gzip.compress(_nifti_bytes(np.full((12, 10, 9), -1000, np.int16), np.diag([1.0, 1, 2, 1]))))
    data, kwargs, kind = get_reader(str(path))(str(path))[0]
    assert kind == "image" and data.shape == (9, 10, 12) and kwargs["scale"] == pytest.approx((2.0, 1.0, 1.0))
    write_series(tmp_path / "rle", codec=RLELossless)
    data, kwargs, _ = get_reader(str(tmp_path / "rle"))(str(tmp_path / "rle"))[0]
    assert data.shape == (N, 128, 128)
    write_series(tmp_path / "mr", modality="MR")
    with pytest.raises(SeriesRefused, match="not CT"):
        get_reader(str(tmp_path / "mr"))(str(tmp_path / "mr"))


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_undecodable_pixel_data_names_the_file(tmp_path):
    write_series(tmp_path / "s", codec=JPEG2000Lossless)
    victim = sorted((tmp_path / "s").glob("*.dcm"))[3]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) - 4000])  # a truncated JPEG 2000 stream
    with pytest.raises(SeriesRefused) as err:
        read_ct(tmp_path / "s")
    assert err.value.reason == "undecodable" and victim.name in str(err.value)
    assert "JPEG 2000" in str(err.value)
