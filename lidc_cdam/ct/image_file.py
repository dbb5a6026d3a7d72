"""A CT in one image file - NIfTI, NRRD or MetaImage - as a :class:`CTVolume` in DICOM LPS patient mm.

Formats (:data:`FORMATS`): NIfTI-1 / NIfTI-2 (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, or a detached ``.nhdr``
header), MetaImage (``.mha``, or a ``.mhd`` header with its data file); any 3D scalar image SimpleITK reads from
them. NIfTI's sform / qform map voxels to RAS mm; SimpleITK negates the first two rows of the affine, so its
origin, spacing and direction are already LPS, the frame DICOM and :class:`CTVolume` use. NRRD and MetaImage
come as SimpleITK gives them: LPS. Values are taken as HU (NIfTI after ``scl_slope`` / ``scl_inter``) through
:mod:`lidc_cdam.ct.values` (NaN / inf voxels masked, implausible HU warned about, and a warning when no voxel is
below -200); SimpleITK's NIfTI reader turns NaN voxels into 0, so a float NIfTI's voxels are also read here
(:func:`nifti_nonfinite`) to find them. Refused with :class:`SeriesRefused`:

- ``bad_geometry``: before SimpleITK reads the file (it would turn a NIfTI pixdim 0 into 1 mm and a NaN
  qoffset or MetaImage Offset into 0), the header itself is checked: NIfTI ``pixdim[1..3]`` <= 0 or not
  finite, a non-finite quaternion, qoffset or sform row (for a set ``qform_code`` / ``sform_code``), a
  singular sform; NRRD ``space directions`` / ``space origin`` / ``spacings`` and MetaImage ``ElementSpacing``
  / ``Offset`` / ``TransformMatrix`` (and their aliases) with a NaN, an infinity, a zero-length axis or a
  spacing <= 0; then the spacing, origin and direction SimpleITK returns (finite, spacing > 0, direction not
  singular);
- ``bad_rescale``: a NIfTI ``scl_slope`` or ``scl_inter`` that is not finite, or a negative slope (0 means
  no scaling);
- ``undecodable``: a file the format's reader cannot read; ``not_3d``: not 3D (a 4D image of more than one
  volume, a 2D image) or several components per voxel; ``too_few_slices``: fewer than ``MIN_SLICES``.

A warning (not a refusal) for an oblique grid (direction not along the patient axes).
"""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np

from lidc_cdam.ct.dicom_reader import AXIS_TOL, MIN_SLICES
from lidc_cdam.ct.errors import CTError, SeriesRefused
from lidc_cdam.ct.values import set_warnings, to_hu, value_warnings
from lidc_cdam.ct.volume import CTVolume

#: format name -> file name endings (lower case)
FORMATS = {"NIfTI": (".nii", ".nii.gz"), "NRRD": (".nrrd", ".nhdr"), "MetaImage": (".mha", ".mhd")}
SUFFIXES = tuple(s for endings in FORMATS.values() for s in endings)
#: the formats read, for messages
FORMATS_TEXT = ", ".join(f"{name} ({', '.join(endings)})" for name, endings in FORMATS.items())
HEADER_BYTES = 1 << 16  # NRRD / MetaImage text headers are read from this many leading bytes


def image_format(path: str | Path) -> str | None:
    """The format of :data:`FORMATS` that ``path``'s name says, or ``None``."""
    name = str(path).lower()
    return next((fmt for fmt, endings in FORMATS.items() if name.endswith(endings)), None)


def is_image_file(path: str | Path) -> bool:
    return image_format(path) is not None


def _stem(path: Path) -> str:
    name = path.name
    ending = next((e for e in SUFFIXES if name.lower().endswith(e)), path.suffix)
    return name[: len(name) - len(ending)] if ending else name


# ------------------------------------------------------------------------------------------ NIfTI header

# NIfTI-1 (348-byte header) and NIfTI-2 (540) field offsets: (float format, pixdim, scl_slope, qform_code,
# sform_code, int format, quatern_b, srow_x)
_NIFTI = {348: ("f", 76, 112, 252, 254, "h", 256, 280), 540: ("d", 104, 176, 344, 348, "i", 352, 400)}


# (dim format and offset, datatype offset, vox_offset format and offset) of NIfTI-1 and NIfTI-2
_NIFTI_DATA = {348: ("8h", 40, 70, "f", 108), 540: ("8q", 16, 12, "q", 168)}
_NIFTI_FLOATS = {16: "f4", 64: "f8"}  # datatype codes of float voxels (what can hold NaN / inf)


def _opener(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open if magic == b"\x1f\x8b" else open


def _nifti_header(path: Path) -> tuple[bytes, int, str] | None:
    """``(header bytes, sizeof_hdr, byte order)`` of a NIfTI-1 / NIfTI-2 file, ``None`` when it is neither."""
    try:
        with _opener(path)(path, "rb") as fh:
            raw = fh.read(540)
    except (OSError, EOFError) as err:
        raise SeriesRefused(path, "undecodable", f"cannot be read as NIfTI ({err})") from None
    for order in "<>":
        if len(raw) >= 4:
            size = struct.unpack(order + "i", raw[:4])[0]
            if size in _NIFTI and len(raw) >= size:
                return raw, size, order
    return None


def nifti_nonfinite(path: str | Path) -> np.ndarray | None:
    """Where a NIfTI file's float voxels are NaN or infinite, bool ``[z, y, x]`` in SimpleITK's array order
    (SimpleITK's NIfTI reader turns NaN into 0, so the voxels are read here); ``None`` when there are none or
    the voxels are not float."""
    path = Path(path)
    found = _nifti_header(path)
    if found is None:
        return None
    raw, size, endian = found
    dim_fmt, dim_at, type_at, off_fmt, off_at = _NIFTI_DATA[size]
    dims = struct.unpack_from(endian + dim_fmt, raw, dim_at)
    dtype = _NIFTI_FLOATS.get(struct.unpack_from(endian + "h", raw, type_at)[0])
    if dtype is None or not 3 <= dims[0] <= 7:
        return None
    shape = tuple(int(d) for d in dims[1:4])
    count = int(np.prod([max(1, int(d)) for d in dims[1:dims[0] + 1]]))
    item = int(dtype[1])
    try:
        offset = int(struct.unpack_from(endian + off_fmt, raw, off_at)[0])
        with _opener(path)(path, "rb") as fh:
            fh.seek(offset)
            block = fh.read(count * item)
    except (OSError, EOFError, ValueError, OverflowError):
        return None  # SimpleITK's reader says what is wrong
    if len(block) != count * item:
        return None  # truncated: SimpleITK's reader says so
    data = np.frombuffer(block, dtype=endian + dtype)
    bad = ~np.isfinite(data[: int(np.prod(shape))])
    if not bad.any():
        return None
    return bad.reshape(shape[::-1])  # NIfTI stores i fastest: [k, j, i] = SimpleITK's [z, y, x]


def nifti_header_problem(path: str | Path) -> tuple[str, str] | None:
    """``(reason, detail)`` when a NIfTI file's header has an impossible geometry or rescale, else ``None``."""
    path = Path(path)
    found = _nifti_header(path)
    if found is None:
        return "undecodable", "cannot be read as NIfTI: not a NIfTI-1 or NIfTI-2 header (sizeof_hdr is neither " \
                              "348 nor 540)"
    raw, size, endian = found
    layout = _NIFTI[size]
    fl, pixdim_at, slope_at, qcode_at, scode_at, code, quat_at, srow_at = layout

    def floats(at: int, n: int) -> np.ndarray:
        return np.array(struct.unpack_from(f"{endian}{n}{fl}", raw, at), dtype=float)

    pixdim = floats(pixdim_at, 8)
    if not np.all(np.isfinite(pixdim[1:4])) or np.any(pixdim[1:4] <= 0):
        return "bad_geometry", f"NIfTI pixdim[1..3] (voxel size) is {pixdim[1:4].tolist()}: each must be a finite " \
                               "number > 0 mm"
    slope, inter = floats(slope_at, 2)
    if not np.isfinite(slope) or slope < 0 or (slope != 0 and not np.isfinite(inter)):
        return "bad_rescale", f"NIfTI scl_slope {slope:g}, scl_inter {inter:g}: the slope must be a finite number " \
                              ">= 0 (0: no scaling) and the intercept finite"
    qcode = struct.unpack_from(endian + code, raw, qcode_at)[0]
    scode = struct.unpack_from(endian + code, raw, scode_at)[0]
    if qcode > 0:
        quat = floats(quat_at, 6)  # quatern_b, c, d, qoffset_x, y, z
        if not np.all(np.isfinite(quat)):
            return "bad_geometry", f"NIfTI qform (qform_code {qcode}) quatern_b/c/d {quat[:3].tolist()}, qoffset " \
                                   f"{quat[3:].tolist()}: not finite numbers"
    if scode > 0:
        srow = floats(srow_at, 12).reshape(3, 4)
        if not np.all(np.isfinite(srow)):
            return "bad_geometry", f"NIfTI sform (sform_code {scode}) srow_x/y/z {srow.tolist()}: not finite numbers"
        if abs(float(np.linalg.det(srow[:, :3]))) < 1e-12:
            return "bad_geometry", f"NIfTI sform (sform_code {scode}) {srow[:, :3].tolist()} is singular: a voxel " \
                                   "axis of zero length"
    return None


# ------------------------------------------------------------------------------------------ NRRD / MetaImage

def _text_header(path: Path, fmt: str) -> list[tuple[str, str]]:
    """``(key, value)`` lines of a NRRD (``key: value``) or MetaImage (``Key = value``) header."""
    with open(path, "rb") as fh:
        head = fh.read(HEADER_BYTES)
    out = []
    for k, line in enumerate(head.split(b"\n")):
        text = line.decode("latin-1").strip()
        if fmt == "NRRD":
            if k == 0 or text.startswith("#"):
                continue
            if not text:
                break  # the blank line ending an attached header
            key, sep, value = text.partition(":")
            if sep and not value.startswith("="):  # "key:=value" pairs are free text
                out.append((key.strip().lower(), value.strip()))
        else:
            key, sep, value = text.partition("=")
            if sep:
                out.append((key.strip().lower(), value.strip()))
            if key.strip().lower() == "elementdatafile":
                break
    return out


def _numbers(text: str) -> list[float] | None:
    """The numbers of a header value (``(1,0,0) (0,1,0)`` or ``1 2 3``); ``None`` when one is not a number."""
    try:
        return [float(t) for t in re.split(r"[\s,()]+", text) if t]
    except ValueError:
        return None


def _vectors(text: str) -> list[list[float] | None] | None:
    """NRRD vectors ``(a,b,c) none (d,e,f)``: each a list of numbers or ``None`` for "none"."""
    out: list[list[float] | None] = []
    for token in re.findall(r"\([^)]*\)|none", text):
        if token == "none":
            out.append(None)
            continue
        found = _numbers(token)
        if found is None:
            return None
        out.append(found)
    return out


def text_header_problem(path: str | Path, fmt: str) -> tuple[str, str] | None:
    """``(reason, detail)`` when a NRRD or MetaImage header has an impossible geometry, else ``None``."""
    path = Path(path)
    fields = dict(_text_header(path, fmt))

    def bad(field: str, value: str, why: str) -> tuple[str, str]:
        return "bad_geometry", f"{fmt} header field '{field}: {value}': {why}"

    if fmt == "NRRD":
        dimension = int((_numbers(fields.get("dimension", "")) or [0])[0])
        if "space directions" in fields:
            value = fields["space directions"]
            vectors = _vectors(value)
            if vectors is None or any(v is not None and not np.all(np.isfinite(v)) for v in vectors):
                return bad("space directions", value, "not finite numbers")
            if any(v is not None and np.linalg.norm(v) == 0 for v in vectors):
                return bad("space directions", value, "an axis of zero length (spacing 0)")
        for key in ("space origin",):
            if key in fields:
                found = _numbers(fields[key])
                if found is None or not np.all(np.isfinite(found)):
                    return bad(key, fields[key], "not finite numbers")
        if "spacings" in fields and "space directions" not in fields:
            found = _numbers(fields["spacings"])
            spatial = [v for v in (found or []) if not (np.isnan(v) and dimension > 3)]
            if found is None or not np.all(np.isfinite(spatial)) or any(v <= 0 for v in spatial):
                return bad("spacings", fields["spacings"], "each spacing must be a finite number > 0")
        return None
    for key in ("elementspacing", "elementsize"):
        if key in fields:
            found = _numbers(fields[key])
            if found is None or not np.all(np.isfinite(found)) or any(v <= 0 for v in found):
                return bad(key, fields[key], "each spacing must be a finite number > 0 mm")
    for key in ("offset", "origin", "position", "transformmatrix", "rotation", "orientation", "centerofrotation"):
        if key in fields:
            found = _numbers(fields[key])
            if found is None or not np.all(np.isfinite(found)):
                return bad(key, fields[key], "not finite numbers")
            if key in ("transformmatrix", "rotation", "orientation") and len(found) == 9 \
                    and abs(float(np.linalg.det(np.reshape(found, (3, 3))))) < 1e-12:
                return bad(key, fields[key], "a singular direction matrix")
    return None


# ------------------------------------------------------------------------------------------ reading


def read_image_file(path: str | Path) -> CTVolume:
    """A NIfTI, NRRD or MetaImage file as a :class:`CTVolume` (see the module docstring)."""
    import SimpleITK as sitk

    path = Path(path).expanduser()
    if not path.is_file():
        raise CTError(f"{path}: no such file")
    fmt = image_format(path)
    if fmt is None:
        raise CTError(f"{path}: not an image file of a format read here ({FORMATS_TEXT})")
    problem = nifti_header_problem(path) if fmt == "NIfTI" else text_header_problem(path, fmt)
    if problem is not None:
        raise SeriesRefused(path, *problem)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise SeriesRefused(path, "undecodable", f"cannot be read as {fmt} ({(lines[-1] if lines else '')[:300]})"
                            ) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SeriesRefused(path, "not_3d", f"{image.GetNumberOfComponentsPerPixel()} components per voxel, not a "
                            "grey-level CT")
    if image.GetDimension() == 4:
        size = image.GetSize()
        if size[3] != 1:
            raise SeriesRefused(path, "not_3d", f"a 4D image of {size[3]} volumes, not one CT volume")
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise SeriesRefused(path, "not_3d", f"a {image.GetDimension()}D image, not a CT volume")
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise SeriesRefused(path, "bad_geometry", f"voxel spacing {spacing.tolist()} mm: each must be finite and > 0")
    if not np.all(np.isfinite(origin)) or not np.all(np.isfinite(direction)) \
            or abs(float(np.linalg.det(direction))) < 1e-6:
        raise SeriesRefused(path, "bad_geometry", f"origin {origin.tolist()}, direction {direction.ravel().tolist()}: "
                            "not finite, or a singular direction")
    size = image.GetSize()  # (x, y, z)
    if size[2] < MIN_SLICES:
        raise SeriesRefused(path, "too_few_slices", f"{size[2]} slice(s); at least {MIN_SLICES} are needed for a "
                            "CT volume")
    values = sitk.GetArrayFromImage(image)
    nonfinite = nifti_nonfinite(path) if fmt == "NIfTI" else None
    if nonfinite is not None and nonfinite.shape == values.shape:
        values = values.astype(np.float64)
        values[nonfinite] = np.nan
    hu, invalid, clipped = to_hu(values)
    warnings = value_warnings(hu, invalid, clipped, expect_air=True)
    if not all(np.isclose(np.abs(col), 1.0, atol=AXIS_TOL).any() for col in direction.T):
        warnings.append("oblique orientation: the grid is rotated in patient space (the models were trained on "
                        "axial LIDC-IDRI scans)")
    meta = set_warnings({"source": str(path), "folder": str(path.parent), "modality": "CT", "format": fmt}, warnings)
    return CTVolume(hu, tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
                    tuple(float(d) for d in direction.ravel()), name=f"CT {_stem(path)}", meta=meta, invalid=invalid)
