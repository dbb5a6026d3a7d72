"""A checkpoint that carries code (pickled Python objects) is refused for safety, naming what it would import,
through every path that reads checkpoints; torch's advice to load it unsafely never reaches the user."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from lidc_cdam.ct import CTError, load_checked_model
from lidc_cdam.models.checkpoint_format import pickled_globals
from lidc_cdam.models.loading import CheckpointError, load_model, read_checkpoint


class CustomPayload:
    """A plain class of the test module: unpickling it imports this module."""

    def __init__(self) -> None:
        self.weights = torch.zeros(3)


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickling ran code"))


def _write(path: Path, obj, how) -> Path:
    if how == "torch":
        torch.save(obj, path)
    elif how == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=how)
    return path


@pytest.mark.parametrize("how", ["torch", "legacy", 2, 4, 5])
def test_custom_class_refused_naming_the_global(tmp_path, how):
    path = _write(tmp_path / "custom.pt", {"model": CustomPayload()}, how)
    name = f"{CustomPayload.__module__}.CustomPayload"
    assert name in pickled_globals(path)
    readers = [(read_checkpoint, CheckpointError), (load_model, CheckpointError), (load_checked_model, CTError)]
    for read, error in readers:
        with pytest.raises(error) as info:
            read(path)
        message = str(info.value)
        assert message.startswith(f"{path}: refused for safety: the file carries code (pickled Python objects")
        assert name in message, message
        assert "weights_only" not in message and "corrupt" not in message and "\x1b" not in message


@pytest.mark.parametrize("how", ["torch", 4])
def test_code_is_named_and_never_run(tmp_path, how):
    marker = tmp_path / "pwned"
    path = _write(tmp_path / "evil.pth", {"state_dict": {"w": torch.ones(2)}, "x": RunsCode(marker)}, how)
    with pytest.raises(CheckpointError, match=r"carries code .*pathlib"):
        load_model(path)
    assert not marker.exists()


def test_plain_checkpoints_still_load_and_garbage_is_not_called_code(tmp_path):
    good = _write(tmp_path / "good.pt", {"w": torch.arange(3)}, "torch")
    assert read_checkpoint(good)["w"].tolist() == [0, 1, 2]
    assert all(g.startswith(("torch.", "collections.")) for g in pickled_globals(good))
    (tmp_path / "garbage.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"garbage\.pt: not a readable PyTorch checkpoint") as info:
        read_checkpoint(tmp_path / "garbage.pt")
    assert "weights_only" not in str(info.value)
