"""TarFlow: a normalizing flow of causal-transformer autoregressive blocks over molecular configurations.

The flow is a chain of bijections (:mod:`openmm_sbg.flow.composition`) over a standard normal
base distribution: a representation (:mod:`openmm_sbg.flow.representations`) maps positions to
features, and a stack of autoregressive blocks (:mod:`openmm_sbg.flow.autoregressive`) maps the
features, as a token sequence, to the latent. Each block moves token ``i`` through elementwise
transforms (:mod:`openmm_sbg.flow.elementwise`: affine, optionally followed by a spline) whose
parameters a causal transformer predicts from tokens ``0..i-1``; blocks alternate identity /
reversed token order so that every token is conditioned on every other one somewhere in the stack.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from openmm_sbg.flow import checkpoint
from openmm_sbg.flow.autoregressive import AutoregressiveBlock
from openmm_sbg.flow.composition import Composition, Conditioned, Reshaped
from openmm_sbg.flow.elementwise import token_transforms
from openmm_sbg.flow.presets import FlowConfig, resolve_config
from openmm_sbg.flow.representations import make_representation
from openmm_sbg.flow.zmatrix import ZMatrix

#: Samples :meth:`TarFlow.sample` inverts at a time unless told otherwise; a caller that
#: draws latents itself follows these chunks to consume the generator as ``sample`` does.
SAMPLE_BATCH_SIZE = 4096


class TarFlow(nn.Module):
    """Normalizing flow over molecular configurations ``[B, N, 3]`` in nm.

    The transformer blocks work on the features of a representation
    (:mod:`openmm_sbg.flow.representations`, chosen by ``config.representation``) with a
    standard normal prior; all public densities are in nm-space and include the
    representation's exact log-determinant. ``cartesian``: features ``x / std``; training
    centres and randomly rotates every configuration and adds CoM noise N(0, I/N) in
    normalised units. ``internal``: Z-matrix bonds, angles and dihedrals, with the
    orientation uniform and the CoM Gaussian by construction. Either way the CoM of the
    flow's samples is Gaussian with std :attr:`com_std` per Cartesian coordinate.

    Parameters
    ----------
    config
        A :class:`FlowConfig`, a preset name (``"ad2"``, ``"ad2-small"``, ...) or a config dict.
    n_atoms
        Number of atoms; taken from ``target`` when that is given.
    target
        The :class:`~openmm_sbg.BoltzmannTarget` the flow models; its identity is stored in
        checkpoints so that :meth:`load` can refuse a wrong molecule and :meth:`target` can
        rebuild it.
    std
        Scalar std (nm) of the centred training positions (set from the data by
        :func:`openmm_sbg.flow.train`): the Cartesian normalisation, and for both
        representations the scale of the samples' CoM, :attr:`com_std`.
    topology
        The molecule's ``openmm.app.Topology`` (taken from ``target`` when that is given): an
        ``internal`` flow builds its Z-matrix from the bonds.
    zmatrix
        An ``internal`` flow's :class:`~openmm_sbg.flow.zmatrix.ZMatrix`, instead of building
        it from ``topology`` (checkpoints store it).

    Examples
    --------
    >>> flow = TarFlow.load("flow.pt")
    >>> x, log_q = flow.sample(1000)          # nm, and log q(x) in nm-space
    >>> flow.energy(x).sum().backward()       # -log q and its gradient, for annealing
    """

    def __init__(
        self,
        config: FlowConfig | str | dict = "ad2-small",
        n_atoms: int | None = None,
        *,
        target=None,
        std: float = 1.0,
        topology=None,
        zmatrix: ZMatrix | None = None,
    ):
        super().__init__()
        self.config = resolve_config(config)
        if target is not None:
            if n_atoms is not None and n_atoms != target.n_atoms:
                raise ValueError(f"n_atoms={n_atoms} but the target has {target.n_atoms} atoms")
            n_atoms = target.n_atoms
            topology = target.topology if topology is None else topology
        if n_atoms is None and topology is not None:
            n_atoms = topology.getNumAtoms()
        if n_atoms is None or int(n_atoms) < 2:
            raise ValueError(f"a TarFlow needs n_atoms >= 2 (or a target), got {n_atoms!r}")
        if not (math.isfinite(std) and std > 0):
            raise ValueError(f"std must be a positive number of nm, got {std!r}")
        self.n_atoms = int(n_atoms)
        self.std = float(std)
        self.target_identity = None if target is None else checkpoint.target_identity(target)
        self.metadata: dict = {}
        cfg = self.config
        if cfg.representation == "internal" and zmatrix is None and topology is not None:
            zmatrix = ZMatrix.from_topology(topology)
        self.representation = make_representation(cfg.representation, self.n_atoms, self.std, zmatrix, cfg.marginals)
        self.token_shape = self.representation.token_shape(cfg.tokens)
        tokens, channels = self.token_shape
        self.blocks = nn.ModuleList(
            AutoregressiveBlock(
                tokens, channels, cfg.width, cfg.layers_per_block, cfg.heads, cfg.mlp_ratio,
                reverse=i % 2 == 1, transforms=token_transforms(cfg.spline_bins),
            )
            for i in range(cfg.n_blocks)
        )

    # -------------------------------------------------------------- properties
    @property
    def com_std(self) -> float:
        """Std (nm) per Cartesian coordinate of the CoM of the flow's samples: ``std / sqrt(N)``."""
        return self.std / math.sqrt(self.n_atoms)

    @property
    def dim(self) -> int:
        """Number of features the transformer blocks model: ``3N``, or ``3N - 6`` for internal coordinates."""
        return self.token_shape[0] * self.token_shape[1]

    @property
    def latent_dim(self) -> int:
        """Normal numbers per sample (:meth:`draw_latents`): the features plus any rigid-body noise."""
        return self.dim + self.representation.n_rigid

    def _param(self) -> torch.Tensor:
        return self.blocks[0].position

    # ---------------------------------------------------- normalised-space flow
    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"positions must be a torch tensor [B, {self.n_atoms}, 3] in nm, got {type(x).__name__}")
        if x.ndim != 3 or tuple(x.shape[1:]) != (self.n_atoms, 3):
            raise ValueError(f"positions must have shape [batch, {self.n_atoms}, 3] (nm), got {tuple(x.shape)}")
        param = self._param()
        return x.to(dtype=param.dtype, device=param.device)

    # ------------------------------------------------------------ the chain
    def latent_transform(self) -> Reshaped:
        """Features <-> latent: the blocks in order, on the features as ``token_shape`` tokens."""
        return Reshaped(Composition(self.blocks), self.token_shape)

    def transform(self, rigid: torch.Tensor | None = None) -> Composition:
        """Positions (nm) <-> latent: ``[representation, blocks]``; ``rigid`` places the inverse's samples
        (see :meth:`inverse`)."""
        return Composition([Conditioned(self.representation, rigid), self.latent_transform()])

    def normalised_forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``y`` ``[B, ...]`` (see :mod:`~openmm_sbg.flow.representations`) -> ``(z, log|det dz/dy|)``."""
        return self.latent_transform().forward(y)

    def normalised_inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior sample ``z`` ``[B, ...]`` -> ``(features y, log|det dy/dz|)``."""
        return self.latent_transform().inverse(z)

    def nll_per_dim(self, y: torch.Tensor) -> torch.Tensor:
        """Training loss: ``-log q(y) / dim`` ``[B]`` for features ``y`` (normalised units)."""
        z, log_det = self.normalised_forward(y)
        return -(standard_normal_log_prob(z) + log_det) / self.dim

    # -------------------------------------------------------------- nm space
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``x`` ``[B, N, 3]`` (nm) -> ``(z, log_det)`` with ``log q(x) = log N(z; 0, I) + log_det``.

        For the Cartesian representation ``z`` is ``[B, N, 3]`` and ``log_det = log|det dz/dx|``;
        for internal coordinates ``z`` is ``[B, N - 2, 3]`` and ``log_det`` also holds the
        analytic rigid-body density and the Z-matrix volume element.
        """
        return self.transform().forward(self._check(x))

    def inverse(self, z: torch.Tensor, rigid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``z`` (shaped as :meth:`forward` returns it) -> ``(x in nm, log_det)``, ``log q(x) = log N(z) - log_det``.

        ``rigid`` ``[B, 7]`` are the normal numbers that place an internal-coordinate sample
        in space (orientation and centre); a Cartesian flow takes none.
        """
        param = self._param()
        return self.transform(rigid).inverse(z.to(dtype=param.dtype, device=param.device))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log q(x)`` ``[B]`` of positions ``[B, N, 3]`` in nm (density per nm^3N).

        The flow's centre of mass is N(0, ``com_std``^2 I) around the origin, so score MD
        frames after centring them (subtract the mean atom position); SMC removes the CoM
        factor with :func:`openmm_sbg.smc.proposal.com_log_density`.
        """
        z, log_det = self.forward(x)
        return standard_normal_log_prob(z) + log_det

    def energy(self, x: torch.Tensor) -> torch.Tensor:
        """Proposal energy ``-log q(x)`` ``[B]`` in the dtype of ``x``; differentiable in ``x``."""
        return -self.log_prob(x).to(x.dtype)

    def draw_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``[n, latent_dim]`` standard normal numbers: everything random about ``n`` samples.

        :meth:`from_latents` turns any rows of them into samples, so a caller can draw the
        noise of a whole batch and invert only its own rows (the sharded sampler does).
        """
        param = self._param()
        return torch.randn(int(n), self.latent_dim, generator=generator, dtype=param.dtype, device=param.device)

    def from_latents(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of :meth:`draw_latents` -> ``(x [B, N, 3] nm, log q(x) [B])``, differentiable unless under ``no_grad``."""
        z = latents[:, : self.dim].reshape(len(latents), *self.representation.feature_shape)
        rigid = latents[:, self.dim :] if self.representation.n_rigid else None
        x, log_det = self.inverse(z, rigid)
        return x, standard_normal_log_prob(z) - log_det

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, batch_size: int = SAMPLE_BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` configurations and their ``log q`` in one pass.

        Parameters
        ----------
        n
            Number of samples.
        generator
            Optional ``torch.Generator`` (on the flow's device) for reproducible draws.
        batch_size
            Samples inverted at a time; bounds the memory of the key/value caches.

        Returns
        -------
        x : torch.Tensor
            ``[n, N, 3]`` positions in nm.
        log_q : torch.Tensor
            ``[n]`` log density of each sample in nm-space, equal to :meth:`log_prob` of ``x``.
        """
        if int(n) < 0:
            raise ValueError(f"n must be non-negative, got {n}")
        param = self._param()
        xs, log_qs = [], []
        for start in range(0, int(n), batch_size):
            x, log_q = self.from_latents(self.draw_latents(min(batch_size, int(n) - start), generator))
            xs.append(x)
            log_qs.append(log_q)
        if not xs:
            return param.new_empty(0, self.n_atoms, 3), param.new_empty(0)
        return torch.cat(xs), torch.cat(log_qs)

    # ------------------------------------------------------------ the target
    def target(self, **target_kwargs):
        """The :class:`~openmm_sbg.BoltzmannTarget` this flow was trained for, rebuilt from its identity.

        Keyword arguments (e.g. ``platform``) go to the target; a built-in system is rebuilt
        with :func:`openmm_sbg.systems.get`, any other from the stored System XML and topology.
        """
        if self.target_identity is None:
            raise ValueError("this flow was built without a target, so it cannot rebuild one; pass target= to TarFlow")
        return checkpoint.target_from_identity(self.target_identity, **target_kwargs)

    # ------------------------------------------------------------ checkpoints
    def checkpoint_payload(self, state_dict: dict | None = None) -> dict:
        """The checkpoint dict of this flow (``state_dict`` overrides its own weights)."""
        return checkpoint.flow_payload(self, state_dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write this flow's checkpoint to ``path`` atomically."""
        checkpoint.write_checkpoint(path, self.checkpoint_payload())

    @classmethod
    def from_payload(cls, payload: dict, source: str = "<payload>", target=None) -> TarFlow:
        """Build a flow from a validated checkpoint dict (see :meth:`load`)."""
        return checkpoint.flow_from_payload(cls, payload, source, target)

    @classmethod
    def load(cls, path: str | os.PathLike, target=None, map_location: str | torch.device = "cpu") -> TarFlow:
        """Load a checkpoint written by :meth:`save` or ``openmm-sbg train``.

        Parameters
        ----------
        path
            Checkpoint file, or the name of a shipped model (``"ad2"``; see
            :func:`openmm_sbg.shipped.model_names`).
        target
            Optional :class:`~openmm_sbg.BoltzmannTarget`; a checkpoint for another molecule
            (different atoms, elements, residue or atom names) raises ValueError naming both.
        map_location
            Device for the weights.
        """
        from openmm_sbg.shipped import flow_path

        path = flow_path(path)
        payload = checkpoint.read_checkpoint(path)
        return cls.from_payload(payload, repr(path), target).to(map_location)

    def extra_repr(self) -> str:
        return f"n_atoms={self.n_atoms}, std={self.std:.4g} nm, config={self.config}"


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over all but the batch dimension: the log density of the flow's base."""
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * (flat**2).sum(dim=1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)
