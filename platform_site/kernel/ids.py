"""Random ids of requests, calls and API objects (`req_…`, `chatcmpl-…`, `resp_…`): hex of bytes from the
operating system's CSPRNG, as `secrets.token_hex` gives, drawn a block at a time.

`secrets.token_hex` is one getrandom(2) system call per id, and a request takes three or more: 1.9 % of a
worker's py-spy samples at concurrency 32 (bench/targets.py --profile). Here one call in _BLOCK bytes. Each thread
draws from its own block, and a forked child from none of its parent's, so no two ids come from the same bytes.
Secrets (API keys, passwords, tokens) still come from `secrets` directly.
"""

from __future__ import annotations

import os
import threading

_BLOCK = 4096


class _Block(threading.local):
    def __init__(self) -> None:
        self.data = b""
        self.at = 0


_block = _Block()


def token_hex(nbytes: int) -> str:
    """`nbytes` random bytes as 2 × `nbytes` hex digits."""
    block = _block
    start = block.at
    end = start + nbytes
    if end > len(block.data):
        block.data = os.urandom(max(_BLOCK, nbytes))
        start, end = 0, nbytes
    block.at = end
    return block.data[start:end].hex()


def _forget() -> None:
    # The child of a fork must not hand out what is left of its parent's block.
    _block.data, _block.at = b"", 0


os.register_at_fork(after_in_child=_forget)
