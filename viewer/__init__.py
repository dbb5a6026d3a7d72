"""napari plugin for lidc-cdam (to come): CDAM overlays on CT slices."""
