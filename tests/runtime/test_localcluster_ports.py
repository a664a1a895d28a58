"""The harness's port blocks: nodes started together never share one."""

from __future__ import annotations

import random

from distbackprop.runtime.localcluster import pick_port_block


def test_port_blocks_never_overlap_even_when_random_is_reseeded():
    # Nodes are started together and bind their ports seconds later, and something in
    # the process may reseed `random`: two nodes once drew the same block that way.
    blocks = []
    for _ in range(40):
        random.seed(0)
        blocks.append(pick_port_block(30))
    blocks.sort()
    assert all(b >= a + 30 for a, b in zip(blocks, blocks[1:], strict=False))
