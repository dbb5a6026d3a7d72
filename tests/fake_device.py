"""A CPU tensor that behaves like a CUDA one where it matters for host transfers: ``.device`` says
``cuda:0``, ``.numpy()`` and ``np.asarray`` raise the TypeError CUDA tensors raise, ``.cpu()``
returns a plain CPU tensor. Operations on it compute on the CPU and keep the subclass, so library code
can run on it without a GPU and any tensor -> NumPy conversion that skips ``.cpu()`` fails as on CUDA.
``FakeCudaTensor.syncs`` records the calls that would wait for the device (``bool``, ``item``, ...)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

CUDA_NUMPY_ERROR = ("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the tensor to "
                    "host memory first.")
_TO_HOST = (torch.Tensor.cpu,)
_TO_NUMPY = (torch.Tensor.numpy, torch.Tensor.__array__)
_SYNCS = (torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.__float__, torch.Tensor.__int__,
          torch.Tensor.tolist)


class FakeCudaTensor(torch.Tensor):
    syncs: ClassVar[list[str]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch.Tensor.device:  # the .device property
            return torch.device("cuda", 0)
        if func in _TO_HOST or (func is torch.Tensor.to and _to_cpu(args, kwargs)):
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs).as_subclass(torch.Tensor)
        if func in _TO_NUMPY:
            raise TypeError(CUDA_NUMPY_ERROR)
        if func in _SYNCS:
            cls.syncs.append(func.__name__)
        return super().__torch_function__(func, types, args, kwargs)


def _to_cpu(args: tuple, kwargs: dict) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, str | torch.device) and torch.device(target).type == "cpu"


def fake_cuda(tensor: torch.Tensor) -> FakeCudaTensor:
    return tensor.as_subclass(FakeCudaTensor)
