"""The viewer's guard against importing triton after napari's OpenGL driver (no napari needed)."""

from __future__ import annotations

import pytest


def test_triton_blocker_only_blocks_triton():
    from lidc_cdam.viewer._guard import _BlockTriton

    for name in ("triton", "triton.backends"):
        with pytest.raises(ModuleNotFoundError, match="blocked"):
            _BlockTriton.find_spec(name)
    assert _BlockTriton.find_spec("tritonish") is None and _BlockTriton.find_spec("numpy") is None
