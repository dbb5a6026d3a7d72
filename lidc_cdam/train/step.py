"""One training step as the engine runs it, and the mixed precision it runs under.

* :func:`choose_precision`: the config's ``amp`` on a device: ``True`` / ``"auto"`` is bf16 autocast
  with no gradient scaler where bf16 is native (CUDA, Ampere and later), fp16 autocast with a gradient
  scaler on other GPUs, float32 on the CPU; ``"bf16"`` / ``"fp16"`` force one on any device (tests run
  them on the CPU); ``False`` / ``"none"``: float32.
* :class:`TrainStep`: zero the gradients, the forward pass under autocast, the loss in float32, the
  backward pass (scaled under fp16), the optimiser step. The loss stays on the device (no host sync).
  :meth:`TrainStep.iteration` is the ``iteration_update`` of MONAI's ``SupervisedTrainer``;
  ``benchmarks/train_step.py`` times the same object.
* :class:`AutocastInferer`: the evaluator's forward pass under the same autocast, outputs in float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from monai.inferers import Inferer

from lidc_cdam.device import bf16_supported

AMP_VALUES = (True, False, "auto", "bf16", "fp16", "none")


@dataclass
class Precision:
    """Autocast dtype (None: float32) on a device type, and the fp16 gradient scaler (None otherwise)."""

    device_type: str = "cpu"
    dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The scaler's state (scale, growth tracker) for the training state; empty without a scaler."""
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def choose_precision(amp: bool | str, device: torch.device) -> Precision:
    """The precision of ``amp`` (see the module docstring) on ``device``."""
    if amp not in AMP_VALUES:
        raise ValueError(f"amp must be one of {AMP_VALUES}, got {amp!r}")
    if amp is True or amp == "auto":
        if device.type != "cuda":
            return Precision(device.type)
        amp = "bf16" if bf16_supported(device) else "fp16"
    if amp == "bf16":
        return Precision(device.type, torch.bfloat16)
    if amp == "fp16":
        return Precision(device.type, torch.float16, torch.amp.GradScaler(device.type))
    return Precision(device.type)


class TrainStep:
    """``step(inputs, targets)``: one optimisation step; returns the prediction and the detached loss."""

    def __init__(self, network: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module,
                 precision: Precision) -> None:
        self.network, self.optimizer, self.loss_fn, self.precision = network, optimizer, loss_fn, precision

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        with self.precision.autocast():
            return self.network(inputs).float()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, engine: Any = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        from monai.engines.utils import IterationEvents

        def fire(event: Any) -> None:
            if engine is not None:
                engine.fire_event(event)

        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        pred = self.forward(inputs)
        fire(IterationEvents.FORWARD_COMPLETED)
        loss = self.loss_fn(pred, targets).mean()
        fire(IterationEvents.LOSS_COMPLETED)
        scaler = self.precision.scaler
        (scaler.scale(loss) if scaler is not None else loss).backward()
        fire(IterationEvents.BACKWARD_COMPLETED)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        fire(IterationEvents.MODEL_COMPLETED)
        return pred, loss.detach()

    def iteration(self, engine: Any, batchdata: dict[str, Any]) -> dict[str, torch.Tensor]:
        """MONAI ``SupervisedTrainer``'s ``iteration_update``: the batch to the device, then :meth:`step`."""
        from monai.utils import CommonKeys as Keys

        inputs, targets = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        pred, loss = self.step(inputs, targets, engine)
        engine.state.output.update({Keys.PRED: pred, Keys.LOSS: loss})
        return engine.state.output


class AutocastInferer(Inferer):
    """The network's forward pass under ``precision``'s autocast, outputs in float32 (the evaluator's)."""

    def __init__(self, precision: Precision) -> None:
        super().__init__()
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        with self.precision.autocast():
            return network(inputs, *args, **kwargs).float()
