"""Explicit per-slot streaming state for the reference models.

Every streaming quantity (conv history, transposed-conv overlap, KV rings, positions, token delay
lines) is a tensor whose first dimension is the slot. A `SlotState` keeps them by name with the value
each takes at a conversation's start, so that one slot can be reset, or left untouched by a step
(`exec_mask`), without disturbing the others. Updates are always
`where(exec_mask, new, old)`: a slot that does not execute keeps its state bit for bit.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch


class SlotState:
    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self._tensors: dict[str, torch.Tensor] = {}
        self._initial: dict[str, float | int | bool] = {}

    def add(self, name: str, tensor: torch.Tensor, initial: float | int | bool = 0) -> torch.Tensor:
        if tensor.shape[0] != self.batch_size:
            raise ValueError(f"state {name!r} has {tensor.shape[0]} slots, expected {self.batch_size}")
        tensor.fill_(initial)
        self._tensors[name] = tensor
        self._initial[name] = initial
        return tensor

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._tensors.items())

    def commit(self, name: str, new: torch.Tensor, exec_mask: torch.Tensor) -> None:
        """Writes `new` into the slots where exec_mask is set; other slots keep their value."""
        old = self._tensors[name]
        mask = exec_mask.view(-1, *([1] * (old.dim() - 1)))
        old.copy_(torch.where(mask, new.to(old.dtype), old))

    def reset(self, slot_mask: torch.Tensor) -> None:
        """Returns the selected slots to the start of a conversation (the initial value's bit pattern is
        written: see as_bits)."""
        for name, tensor in self._tensors.items():
            initial = as_bits(torch.tensor(self._initial[name], dtype=tensor.dtype)).item()
            as_bits(tensor)[slot_mask] = initial

    def narrow(self, batch_size: int) -> "SlotState":
        """The first batch_size slots as views of these tensors: a step on them updates this state (every
        update is in place)."""
        narrowed = SlotState(batch_size)
        narrowed._tensors = {name: tensor[:batch_size] for name, tensor in self._tensors.items()}
        narrowed._initial = self._initial
        return narrowed

    def swap(self, a: int, b: int) -> None:
        """Exchanges the whole state of slots a and b."""
        for tensor in self._tensors.values():
            swap_rows(tensor, a, b)


def swap_rows(tensor: torch.Tensor, a: int, b: int, dim: int = 0) -> None:
    """Exchanges rows a and b of `tensor` along `dim`, in place."""
    if a == b:
        return
    tensor = as_bits(tensor)
    rows = torch.tensor([a, b], device=tensor.device)
    tensor.index_copy_(dim, rows, tensor.index_select(dim, rows.flip(0)))


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(tensor: torch.Tensor) -> torch.Tensor:
    """tensor viewed as the integer dtype of its item size. State moves values by their bit patterns, exactly
    and for every dtype: 8-bit floats (a KV cache's) have no gather, where, scatter, index_copy or masked-fill
    kernels, integers of every size do."""
    return tensor.view(_BITS[tensor.dtype.itemsize])
