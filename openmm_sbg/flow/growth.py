"""Growing a trained TarFlow: more blocks with the same density, capacity for refinement to use.

A flow fitted by maximum likelihood to plenty of data can be limited by its size: the data's
NLL on held-out frames equals the training NLL. Blocks appended as identities keep its density
exactly, so refinement starts from the trained flow's ESS, and give the optimiser new
parameters to fit what the small flow could not. (On ``ad2``, two added blocks did not beat
the same refinement without them in 30 CPU minutes: benchmarks/RESULTS.md, "Refinement".)
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from openmm_sbg.flow.model import TarFlow


def with_identity_blocks(flow: TarFlow, n_blocks: int, seed: int = 0) -> TarFlow:
    """``flow`` with ``n_blocks`` more blocks on the latent side, each starting as the identity.

    Every block's output layer starts at zero, so the grown flow has exactly ``flow``'s
    density. The new blocks' other weights come from torch's initialisers under ``seed``: the
    same flow grown twice has the same weights (refinement's resume compares them). The
    blocks keep alternating the token order; the result's ``metadata["grown"]`` says how
    many blocks it had.
    """
    if int(n_blocks) < 1:
        raise ValueError(f"the number of blocks to add (n_blocks, --add-blocks) must be positive, got {n_blocks!r}")
    config = dataclasses.replace(flow.config, n_blocks=flow.config.n_blocks + int(n_blocks))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        grown = TarFlow(config, flow.n_atoms, std=flow.std, zmatrix=getattr(flow.representation, "zmatrix", None))
    weight = next(flow.parameters())
    if weight.dtype != torch.float32:  # (.to(float32) would also round the representation's float64 buffers)
        grown = grown.to(weight.dtype)
    missing, unexpected = grown.load_state_dict(flow.state_dict(), strict=False)
    new = {f"blocks.{i}." for i in range(flow.config.n_blocks, config.n_blocks)}
    if unexpected or not all(key.startswith(tuple(new)) for key in missing):
        raise ValueError(f"cannot grow this flow: its weights do not match its configuration ({unexpected or missing})")
    grown.target_identity = flow.target_identity
    grown.metadata = {**copy.deepcopy(flow.metadata), "grown": {"from_blocks": flow.config.n_blocks, "added_blocks": int(n_blocks)}}
    return grown.to(weight.device).train(flow.training)
