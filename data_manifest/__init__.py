"""The committed manifests (LIDC nodule table and folds, ImageNet X_val / X_multi, the paper's tables),
shipped as the package data of ``lidc_cdam.data_manifest``; read them through
:func:`lidc_cdam.resources.manifest_path`. See ``README.md`` here for how each was made."""
