"""The inputs and targets of one reconstruction unit, in memory within a budget, memory-mapped from disk beyond.

Rows are stored under names (floating point as float32, integer tensors such as labels as they are); ``batch(indices)`` gathers rows for one optimisation step. On disk each
tensor is a ``.npy`` file opened as a memory map, so only the gathered rows are read.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ditquant.errors import UserError


def _storage_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float32 if t.is_floating_point() else t.dtype


class UnitCache:
    """Fixed-size row storage, filled batch by batch (``write``) then read at random (``batch``).

    Args:
        num_rows: rows the cache will hold.
        memory_bytes: in-memory budget; the whole cache goes to ``spill_dir`` when its size exceeds it.
        spill_dir: folder for the memory-mapped files (created, and removed by ``close``).
    """

    def __init__(self, num_rows: int, memory_bytes: int, spill_dir: Optional[Path]):
        self.num_rows, self.memory_bytes, self.spill_dir = num_rows, memory_bytes, spill_dir
        self.tensors: dict[str, torch.Tensor | np.memmap] = {}
        self.filled = 0

    @property
    def on_disk(self) -> bool:
        return any(isinstance(t, np.memmap) for t in self.tensors.values())

    def _allocate(self, rows: dict[str, torch.Tensor]) -> None:
        shapes = {name: (self.num_rows, *t.shape[1:]) for name, t in rows.items()}
        dtypes = {name: _storage_dtype(t) for name, t in rows.items()}
        total = sum(dtypes[n].itemsize * int(np.prod(s)) for n, s in shapes.items())
        if total <= self.memory_bytes:
            self.tensors = {name: torch.empty(s, dtype=dtypes[name]) for name, s in shapes.items()}
            return
        if self.spill_dir is None:
            raise UserError(f"reconstruction cache needs {total / 2**30:.2f} GiB, over cache_memory_gb, and no "
                            f"cache_dir to spill to")
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self.tensors = {name: np.lib.format.open_memmap(self.spill_dir / f"{name}.npy", mode="w+",
                                                        dtype=torch.empty(0, dtype=dtypes[name]).numpy().dtype,
                                                        shape=s) for name, s in shapes.items()}

    @torch.no_grad()
    def write(self, rows: dict[str, torch.Tensor]) -> None:
        """Append one batch of rows (every tensor with the same leading size)."""
        if not self.tensors:
            self._allocate(rows)
        n = next(iter(rows.values())).shape[0]
        if self.filled + n > self.num_rows:
            raise UserError(f"cache overflow: {self.filled + n} rows written into {self.num_rows}")
        for name, t in rows.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise UserError(f"non-finite values (NaN/inf) in the reconstruction data ({name}); the calibration "
                                "set or the model produces them")
            dst = self.tensors[name]
            value = t.detach().to(_storage_dtype(t)).cpu()
            if isinstance(dst, np.memmap):
                dst[self.filled:self.filled + n] = value.numpy()
            else:
                dst[self.filled:self.filled + n] = value
        self.filled += n

    def batch(self, indices: torch.Tensor, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        if self.filled != self.num_rows:
            raise RuntimeError(f"cache read before it was filled ({self.filled}/{self.num_rows} rows)")
        out = {}
        for name, t in self.tensors.items():
            if isinstance(t, np.memmap):
                rows = torch.from_numpy(np.ascontiguousarray(t[np.sort(indices.numpy())]))
                # sorted reads are faster on disk; restore the drawn order
                order = torch.argsort(torch.argsort(indices))
                rows = rows[order]
            else:
                rows = t[indices]
            out[name] = rows.to(device)
        return out

    def close(self) -> None:
        self.tensors = {}
        if self.spill_dir is not None and self.spill_dir.exists():
            shutil.rmtree(self.spill_dir, ignore_errors=True)
