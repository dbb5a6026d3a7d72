"""Import torch's stack safely beside napari's OpenGL context.

Importing triton (``import timm`` / ``torchvision`` reach it through ``torch._dynamo``) after Mesa's OpenGL
driver (with its own libLLVM) was loaded into the process segfaults (ENVIRONMENT.md). The viewer never
compiles anything, so :func:`prepare_torch` imports torchvision and timm now when no GL library is loaded
yet, and otherwise makes ``import triton`` fail cleanly (torch then behaves as on a machine without triton).
"""

from __future__ import annotations

import sys

_GL_LIBS = ("libGLX_mesa", "libGL.so", "libEGL", "libLLVM", "_dri.so", "libgallium")


def gl_loaded() -> bool:
    """Whether an OpenGL / Mesa library is mapped into this process (Linux; False elsewhere)."""
    try:
        with open("/proc/self/maps") as fh:
            maps = fh.read()
    except OSError:
        return False
    return any(name in maps for name in _GL_LIBS)


class _BlockTriton:
    """A meta path finder that makes ``import triton`` raise ModuleNotFoundError."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by lidc-cdam's viewer: triton "
                                      "crashes when imported after the OpenGL driver)", name=name)
        return None


def block_triton() -> None:
    if not any(isinstance(f, type) and f is _BlockTriton for f in sys.meta_path):
        sys.meta_path.insert(0, _BlockTriton)


def prepare_torch() -> None:
    """Call before importing torch / timm in code that runs beside a napari viewer (idempotent)."""
    if "triton" in sys.modules or "timm" in sys.modules:
        return
    if gl_loaded():
        block_triton()
    else:
        import torchvision  # noqa: F401  (pulls triton in before any GL context)
    import timm  # noqa: F401
