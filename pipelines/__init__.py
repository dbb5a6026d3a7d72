"""The ``lidc-cdam`` command (installed as ``lidc_cdam.pipelines``): :mod:`.cli` and one module per sub-command.

- :mod:`.explain` - maps for image files; :mod:`.explain_ct` - points of any CT; :mod:`.pacs` - `pacs find` (QIDO-RS);
- :mod:`.benchmark` - the benchmark; :mod:`.cohort` - the LIDC cohort evaluation;
- :mod:`.demo` - the embedded default (:mod:`.demo_lidc` its LIDC phantom story);
- :mod:`.preprocess` - LIDC-IDRI DICOM to crops; :mod:`.phantoms` - the offline phantom set (not CT);
- :mod:`.train` - fine-tuning; :mod:`.sweep` - parameter grids; :mod:`.linear_probe` - the ImageNet probe;
- :mod:`.imagenet_manifests` - the X_val / X_multi manifests;
- :mod:`.ship_demo_weights` - the maintainers' command that rewrites the shipped weights.
"""
