"""Rebuild the real chest CT fixture (``lung1_thorax.nrrd``, ``lung1_thorax_label.nrrd``) from PyPI.

The source distribution of ``pyradiomics==2.2.0`` ships ``data/lung1_image.nrrd`` and ``lung1_label.nrrd``
(BSD-3-Clause, Copyright 2017 Harvard Medical School; see ``LICENSE-pyradiomics.txt``): a real thoracic CT,
int16 HU, 512 x 512 x 48 voxels of 0.5703 x 0.5703 x 5 mm, LPS with an identity direction, and the label of a
14 mm nodule near the right hilum. Only ``lung1`` is used. The fixture is the box BOX of both (voxel index
x, y, z: the right lung, the nodule and part of the mediastinum, all 48 slices), written as gzip NRRD with the
same spacing and a shifted origin (the same patient coordinates), so that it stays under 5 MB.

    python tests/data/lung1/make_fixture.py            # downloads the 34 MB archive into a temporary folder

Needs numpy and setuptools in this Python (pip prepares the sdist's metadata) and Python <= 3.11.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
ARCHIVE = "pyradiomics-2.2.0.tar.gz"
MEMBERS = {"image": "pyradiomics-2.2.0/data/lung1_image.nrrd", "label": "pyradiomics-2.2.0/data/lung1_label.nrrd",
           "licence": "pyradiomics-2.2.0/LICENSE.txt"}
#: (x0, x1), (y0, y1), (z0, z1) voxel index ranges of the source kept in the fixture
BOX = ((40, 300), (175, 480), (0, 48))
OUT = {"image": "lung1_thorax.nrrd", "label": "lung1_thorax_label.nrrd"}


def download(folder: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "--no-build-isolation", "pyradiomics==2.2.0", "-d", str(folder)], check=True)
    return folder / ARCHIVE


def build(archive: Path, out: Path = HERE) -> dict[str, str]:
    """Extract lung1 from ``archive``, crop it to :data:`BOX`, write the fixture; returns the SHA-256 per file."""
    (x0, x1), (y0, y1), (z0, z1) = BOX
    hashes = {}
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(archive) as tar:
        for member in MEMBERS.values():
            tar.extract(member, tmp, filter="data")
        (out / "LICENSE-pyradiomics.txt").write_bytes((Path(tmp) / MEMBERS["licence"]).read_bytes())
        for key in ("image", "label"):
            image = sitk.ReadImage(str(Path(tmp) / MEMBERS[key]))
            sub = image[x0:x1, y0:y1, z0:z1]  # SimpleITK slicing keeps the physical position (origin shifted)
            path = out / OUT[key]
            sitk.WriteImage(sub, str(path), useCompression=True, compressionLevel=9)
            hashes[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return hashes


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        given = Path(sys.argv[1]) if len(sys.argv) > 1 else download(Path(folder))
        for name, digest in build(given).items():
            print(f"{digest}  {name}")
