"""`LocalComm`: the one-rank communicator of single-process (`--local`) runs."""

from __future__ import annotations

import numpy as np

from distbackprop.comm.base import CompletedRequest, Request, check_op


class LocalComm:
    """Size 1: every collective leaves the buffer as it is (the reduction over one rank)."""

    rank: int = 0
    size: int = 1

    def allreduce_(self, buf: np.ndarray, op: str = "sum") -> np.ndarray:
        """In place (a no-op for one rank): buf ← op over {buf}. Returns `buf`."""
        check_op(op)
        return buf

    def iallreduce_(self, buf: np.ndarray, op: str = "sum") -> Request:
        """Already complete: the reduction over one rank is the buffer itself."""
        check_op(op)
        return CompletedRequest()

    def bcast_(self, buf: np.ndarray, root: int = 0) -> np.ndarray:
        """In place (a no-op): buf ← buf of `root`, which must be 0. Returns `buf`."""
        if root != 0:
            raise ValueError(f"root {root} out of range for a communicator of size 1")
        return buf

    def reduce_scatter_(self, send: np.ndarray, recv: np.ndarray,
                        counts: np.ndarray) -> np.ndarray:
        """recv ← send (the sum over one rank, whose block is all of it)."""
        np.copyto(recv, send)
        return recv

    def allgather_(self, buf: np.ndarray, counts: np.ndarray) -> np.ndarray:
        return buf

    def gather_(self, send: np.ndarray, recv: np.ndarray | None, counts: np.ndarray,
                root: int = 0) -> np.ndarray | None:
        np.copyto(recv, send)
        return recv

    def barrier(self) -> None:
        return None

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return "LocalComm(rank=0, size=1)"
