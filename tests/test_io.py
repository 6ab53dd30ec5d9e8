"""Atomic writes: the target appears whole, with a plain file's permissions, and a failed write leaves nothing."""

import os

import pytest
import torch
from safetensors.torch import save_file

from ditquant.io import atomic_write


def test_atomic_write_gives_plain_permissions_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "model.safetensors"
    with atomic_write(target) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors creates its file owner-only
    umask = os.umask(0)
    os.umask(umask)
    assert target.is_file() and (target.stat().st_mode & 0o777) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "other.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sub"]
