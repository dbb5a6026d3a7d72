"""NIfTI, NRRD and MetaImage CT files: the real lung1 fixture read and re-written in every format, header
geometry refused before SimpleITK guesses, NaN voxels masked, implausible HU warned about."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_ct_reading import _nifti_bytes

from lidc_cdam.ct import CTError, SeriesRefused, read_ct
from lidc_cdam.ct.image_file import FORMATS, nifti_header_problem
from lidc_cdam.ct.values import INVALID_HU

LUNG1 = Path(__file__).parent / "data" / "lung1" / "lung1_thorax.nrrd"


@pytest.fixture(scope="module")
def lung1():
    return read_ct(LUNG1)


def test_real_ct_nrrd(lung1):
    assert lung1.shape == (48, 305, 260) and lung1.hu.dtype == np.int16 and lung1.meta["format"] == "NRRD"
    assert lung1.spacing == pytest.approx((0.5703125, 0.5703125, 5.0))
    assert lung1.direction == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
    assert lung1.origin == pytest.approx((-123.1875, -225.1953125, -777.5))
    assert lung1.invalid is None and lung1.meta["warnings"] == [] and "warning" not in lung1.meta  # a real CT
    assert lung1.name == "CT lung1_thorax"


@pytest.mark.parametrize("name", ["scan.mha", "scan.mhd", "scan.nii", "scan.nii.gz", "scan.nhdr", "scan.nrrd"])
def test_every_format_reads_the_same_scan(tmp_path, lung1, name):
    image = sitk.ReadImage(str(LUNG1))
    sitk.WriteImage(image, str(tmp_path / name), useCompression=name.endswith((".mha", ".nrrd")))
    vol = read_ct(tmp_path / name)
    np.testing.assert_array_equal(vol.hu, lung1.hu)
    np.testing.assert_allclose(vol.spacing, lung1.spacing, atol=1e-5)
    np.testing.assert_allclose(vol.origin, lung1.origin, atol=1e-3)
    np.testing.assert_allclose(vol.direction, lung1.direction, atol=1e-6)
    fmt = next(f for f, endings in FORMATS.items() if name.endswith(endings))
    assert vol.meta["format"] == fmt and vol.meta["warnings"] == [] and vol.name == "CT scan"


def test_nifti_stored_in_ras_order_lands_in_lps(tmp_path, lung1):
    """The real CT stored x- and y-reversed with direction diag(-1, -1, 1) (a RAS-ordered grid) and a NaN voxel,
    through NIfTI: the same patient points, the NaN masked where it was."""
    arr = lung1.hu[:, ::-1, ::-1].astype(np.float32)
    arr[20, 100, 50] = np.nan
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(lung1.spacing)
    image.SetOrigin(tuple(lung1.index_to_world(np.array([0, lung1.shape[1] - 1, lung1.shape[2] - 1]))))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(image, str(tmp_path / "ras.nii.gz"))
    vol = read_ct(tmp_path / "ras.nii.gz")
    assert vol.direction == pytest.approx((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    for zyx in ([0, 0, 0], [47, 304, 259], [20, 100, 50]):
        flipped = np.array([zyx[0], lung1.shape[1] - 1 - zyx[1], lung1.shape[2] - 1 - zyx[2]])
        np.testing.assert_allclose(vol.index_to_world(np.array(zyx)), lung1.index_to_world(flipped), atol=1e-3)
    assert np.argwhere(vol.invalid).tolist() == [[20, 100, 50]] and vol.hu[20, 100, 50] == INVALID_HU
    expected = lung1.hu[:, ::-1, ::-1].copy()
    expected[20, 100, 50] = INVALID_HU
    np.testing.assert_array_equal(vol.hu, expected)


def test_viewer_reader_opens_nrrd_and_mha(tmp_path):
    from lidc_cdam.viewer._reader import get_reader

    sitk.WriteImage(sitk.ReadImage(str(LUNG1)), str(tmp_path / "scan.mha"))
    for path in (LUNG1, tmp_path / "scan.mha"):
        data, kwargs, kind = get_reader(str(path))(str(path))[0]
        assert kind == "image" and data.shape == (48, 305, 260)
        assert kwargs["scale"] == pytest.approx((5.0, 0.5703125, 0.5703125))
    import yaml

    manifest = yaml.safe_load((Path(__file__).parents[1] / "viewer" / "napari.yaml").read_text())
    patterns = manifest["contributions"]["readers"][0]["filename_patterns"]
    assert {"*.nrrd", "*.nhdr", "*.mha", "*.mhd", "*.nii", "*.nii.gz"} <= set(patterns)


def test_unsupported_file_names_the_file_and_the_formats(tmp_path):
    path = tmp_path / "scan.img"
    path.write_bytes(bytes(1000))
    with pytest.raises(CTError, match=r"scan\.img: neither a DICOM image nor .*\.nii\.gz.*\.nrrd.*\.mhd"):
        read_ct(path)


# --------------------------------------------------------------------------------------------- headers


def _small(dtype=np.int16, values=None) -> sitk.Image:
    arr = np.full((10, 12, 14), -1000, dtype) if values is None else values
    arr[:, 4:8, 4:8] = 40
    image = sitk.GetImageFromArray(arr)
    image.SetSpacing((0.7, 0.7, 2.5))
    image.SetOrigin((-10.0, 20.0, -300.0))
    return image


def _nifti1(path: Path, big_endian: bool = False, **fields) -> Path:
    """A hand-written NIfTI-1 (sform = diag(0.8, 0.8, 2.5), RAS) with header fields replaced."""
    raw = bytearray(_nifti_bytes(np.full((12, 10, 9), -1000, np.int16),
                                 np.array([[0.8, 0, 0, 5.0], [0, 0.8, 0, -5.0], [0, 0, 2.5, 30.0], [0, 0, 0, 1]])))
    offsets = {"pixdim": (76, "8f"), "scl_slope": (112, "f"), "qform_code": (252, "h"), "quatern": (256, "6f"),
               "srow_x": (280, "4f")}
    for key, value in fields.items():
        at, fmt = offsets[key]
        struct.pack_into("<" + fmt, raw, at, *np.atleast_1d(value))
    if big_endian:  # the header fields swapped (the data too, as int16)
        swapped = bytearray(raw)
        for at, fmt in [(0, "i"), (40, "8h"), (70, "2h"), (76, "8f"), (108, "3f"), (252, "2h"), (256, "6f"),
                        (280, "12f")]:
            struct.pack_into(">" + fmt, swapped, at, *struct.unpack_from("<" + fmt, raw, at))
        swapped[352:] = np.frombuffer(bytes(raw[352:]), "<i2").astype(">i2").tobytes()
        raw = swapped
    path.write_bytes(gzip.compress(bytes(raw)) if path.name.endswith(".gz") else bytes(raw))
    return path


@pytest.mark.parametrize("name", ["a.nii", "a.nii.gz"])
@pytest.mark.parametrize("big_endian", [False, True])
def test_nifti_header_refusals(tmp_path, name, big_endian):
    ok = read_ct(_nifti1(tmp_path / name, big_endian))
    assert ok.spacing == pytest.approx((0.8, 0.8, 2.5)) and ok.origin == pytest.approx((-5.0, 5.0, 30.0))
    cases = [
        ({"pixdim": [1, 0.8, 0, 2.5, 1, 1, 1, 1]}, "bad_geometry", r"pixdim\[1\.\.3\] .* is \[0\.8.*, 0\.0, 2\.5\]"),
        ({"pixdim": [1, 0.8, np.nan, 2.5, 1, 1, 1, 1]}, "bad_geometry", r"pixdim\[1\.\.3\]"),
        ({"qform_code": 1, "quatern": [0, 0, 0, np.nan, 0, 0]}, "bad_geometry", r"qform .*qoffset \[nan"),
        ({"srow_x": [0.8, 0, 0, np.inf]}, "bad_geometry", r"sform .*inf"),
        ({"srow_x": [0, 0, 0, 5.0]}, "bad_geometry", r"sform .* is singular"),
        ({"scl_slope": np.nan}, "bad_rescale", r"scl_slope nan"),
    ]
    for fields, reason, pattern in cases:
        path = _nifti1(tmp_path / name, big_endian, **fields)
        with pytest.raises(SeriesRefused, match=pattern) as err:
            read_ct(path)
        assert err.value.reason == reason and str(path) in str(err.value)


def test_nifti2_header_checked(tmp_path):
    """A NIfTI-2 header (540 bytes, float64 fields) with a NaN qoffset: refused from the header alone."""
    raw = bytearray(544)
    struct.pack_into("<i", raw, 0, 540)
    raw[4:12] = b"n+2\x00\r\n\x1a\n"
    struct.pack_into("<8q", raw, 16, 3, 12, 10, 9, 1, 1, 1, 1)
    struct.pack_into("<8d", raw, 104, 1, 0.8, 0.8, 2.5, 1, 1, 1, 1)
    struct.pack_into("<ii", raw, 344, 1, 0)  # qform_code 1
    struct.pack_into("<6d", raw, 352, 0, 0, 0, 1.0, 2.0, 3.0)
    path = tmp_path / "two.nii"
    path.write_bytes(bytes(raw))
    assert nifti_header_problem(path) is None
    struct.pack_into("<d", raw, 384, np.nan)
    path.write_bytes(bytes(raw))
    reason, detail = nifti_header_problem(path)
    assert reason == "bad_geometry" and "qoffset [1.0, nan, 3.0]" in detail
    struct.pack_into("<d", raw, 384, 2.0)
    struct.pack_into("<d", raw, 120, 0.0)  # pixdim[2]
    path.write_bytes(bytes(raw))
    assert nifti_header_problem(path)[0] == "bad_geometry"


def _replace_header(path: Path, old: bytes, new: bytes) -> None:
    raw = path.read_bytes()
    assert old in raw, (old, raw[:600])
    path.write_bytes(raw.replace(old, new, 1))


@pytest.mark.parametrize("name, old, new, pattern", [
    ("a.nrrd", b"space directions: (0.69999999999999996,0,0)", b"space directions: (nan,0,0)",
     r"'space directions: \(nan,0,0\).*not finite"),
    ("a.nrrd", b"space directions: (0.69999999999999996,0,0)", b"space directions: (0,0,0)", r"zero length"),
    ("a.nrrd", b"space origin: (-10,", b"space origin: (nan,", r"'space origin: \(nan.*not finite"),
    ("a.nhdr", b"space origin: (-10,", b"space origin: (-inf,", r"space origin.*not finite"),
    ("a.mha", b"Offset = -10 20 -300", b"Offset = -10 nan -300", r"'offset: -10 nan -300'.*not finite"),
    ("a.mhd", b"ElementSpacing = 0.69999999999999996 0.69999999999999996 2.5",
     b"ElementSpacing = 0.7 0 2.5", r"elementspacing.*> 0"),
    ("a.mha", b"ElementSpacing = 0.69999999999999996 0.69999999999999996 2.5",
     b"ElementSpacing = 0.7 -0.7 2.5", r"elementspacing.*> 0"),
    ("a.mha", b"TransformMatrix = 1 0 0 0 1 0 0 0 1", b"TransformMatrix = 1 0 0 0 1 0 0 0 0", r"singular"),
])
def test_text_header_refusals(tmp_path, name, old, new, pattern):
    path = tmp_path / name
    sitk.WriteImage(_small(), str(path))
    assert read_ct(path).spacing == pytest.approx((0.7, 0.7, 2.5))
    _replace_header(path, old, new)  # the header: attached (.nrrd, .mha) or the file named (.nhdr, .mhd)
    with pytest.raises(SeriesRefused, match=pattern) as err:
        read_ct(path)
    assert err.value.reason == "bad_geometry" and str(path) in str(err.value)


# --------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("name", ["f.nrrd", "f.mha", "f.nii.gz"])
def test_nan_and_inf_voxels_are_masked(tmp_path, name):
    arr = np.full((10, 12, 14), -1000.0, np.float32)
    arr[:, 4:8, 4:8] = 40.5
    arr[2, 3, 4], arr[5, 6, 7], arr[9, 0, 0] = np.nan, np.inf, -np.inf
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / name))
    vol = read_ct(tmp_path / name)
    assert vol.hu.dtype == np.int16 and vol.invalid is not None and vol.invalid.dtype == bool
    assert np.argwhere(vol.invalid).tolist() == [[2, 3, 4], [5, 6, 7], [9, 0, 0]]
    assert vol.hu[2, 3, 4] == vol.hu[5, 6, 7] == INVALID_HU and vol.hu[0, 5, 5] == 40  # 40.5 rounds to even
    assert vol.meta["warnings"][0].startswith("3 voxel(s) NaN or infinite") and "3 voxel" in vol.meta["warning"]


def test_implausible_hu_warns(tmp_path):
    arr = np.full((10, 12, 14), -2048, np.int16)  # mostly padding
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "pad.nrrd"))
    vol = read_ct(tmp_path / "pad.nrrd")
    assert any("below -1100 HU" in w for w in vol.meta["warnings"])
    arr = np.full((10, 12, 14), 500, np.int16)  # no air: not HU (an MR, raw stored values...)
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(tmp_path / "mr.mha"))
    assert "no value below -200" in read_ct(tmp_path / "mr.mha").meta["warning"]


def test_not_3d_components_and_too_few_slices(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((12, 14), np.int16)), str(tmp_path / "flat.nrrd"))
    with pytest.raises(SeriesRefused, match=r"flat\.nrrd: a 2D image") as err:
        read_ct(tmp_path / "flat.nrrd")
    assert err.value.reason == "not_3d"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 12, 14, 3), np.uint8), isVector=True),
                    str(tmp_path / "rgb.mha"))
    with pytest.raises(SeriesRefused, match=r"rgb\.mha: 3 components per voxel"):
        read_ct(tmp_path / "rgb.mha")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 12, 14), np.int16)), str(tmp_path / "thin.mhd"))
    with pytest.raises(SeriesRefused, match=r"thin\.mhd: 3 slice\(s\)") as err:
        read_ct(tmp_path / "thin.mhd")
    assert err.value.reason == "too_few_slices"
    (tmp_path / "thin.raw").unlink()
    with pytest.raises(SeriesRefused, match=r"thin\.mhd: cannot be read as MetaImage") as err:
        read_ct(tmp_path / "thin.mhd")
    assert err.value.reason == "undecodable"
