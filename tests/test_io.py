"""``lidc_cdam.io``: atomic writes, and checkpoints whose bytes depend only on what they hold."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lidc_cdam.io import atomic_write, save_torch


def test_the_same_payload_saves_to_the_same_bytes(tmp_path):
    payload = {"state_dict": {"w": torch.arange(6.0).reshape(2, 3)}, "meta": {"fold": 0, "name": "x"}}
    first, second = save_torch(tmp_path / "a.pt", payload), save_torch(tmp_path / "b" / "other.pt", payload)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (first, second)]
    assert digest[0] == digest[1]  # torch.save to a path names the archive after the (random) temporary file
    loaded = torch.load(first, weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], payload["state_dict"]["w"]) and loaded["meta"] == payload["meta"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.csv"
    target.write_text("old\n")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["result.csv"]
