"""Two 4-bit codes per byte, along the input dimension: byte j of a row holds columns 2j (low nibble) and 2j+1."""

from __future__ import annotations

import torch

from ditquant.errors import UserError


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes (values 0–15, any integer dtype, last dim even) into uint8, half the columns."""
    if codes.shape[-1] % 2:
        raise UserError(f"int4 packing needs an even number of input channels, got {codes.shape[-1]}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise UserError(f"int4 codes must lie in [0, 15], got [{int(codes.min())}, {int(codes.max())}]")
    c = codes.to(torch.uint8)
    return c[..., 0::2] | (c[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The uint8 codes (0–15) of ``pack_int4``'s output, twice the columns."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)
