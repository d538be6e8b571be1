"""TarFlow: a normalizing flow of causal-transformer autoregressive blocks.

Each block maps a token sequence ``x`` to ``z`` by

    z_i = (x_i - b_i(x_<i)) * exp(-a_i(x_<i)),        log|det dz/dx| = -sum_i a_i,

where a causal transformer reads tokens ``0..i-1`` and predicts the shift ``b_i`` and
log-scale ``a_i`` of token ``i`` (token 0 passes unchanged). With ``spline_bins > 0`` the
transformer also predicts a monotone rational-quadratic spline ``s_i`` per channel
(:mod:`openmm_sbg.flow.splines`) and ``z_i = s_i((x_i - b_i) * exp(-a_i))``, so that one block
can give token ``i`` a multimodal conditional density. The forward direction is one parallel
transformer pass; the inverse recovers tokens one at a time, feeding each into the
transformer with a key/value cache. Blocks alternate identity / reversed token order so that
every token is conditioned on every other one somewhere in the stack.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from openmm_sbg.flow import checkpoint
from openmm_sbg.flow.presets import FlowConfig, resolve_config
from openmm_sbg.flow.representations import make_representation
from openmm_sbg.flow.splines import parameters_per_channel, rational_quadratic
from openmm_sbg.flow.zmatrix import ZMatrix

#: Samples :meth:`TarFlow.sample` inverts at a time unless told otherwise; a caller that
#: draws latents itself follows these chunks to consume the generator as ``sample`` does.
SAMPLE_BATCH_SIZE = 4096
#: Spline blocks act on ``[-SPLINE_BOUND, SPLINE_BOUND]`` of the affine-transformed token and
#: are the identity outside; features are standardised, so this holds all but rare tails.
SPLINE_BOUND = 5.0


class KVCache:
    """Keys and values of one transformer layer for the positions filled so far: written in place
    into ``length`` positions, or, when they need gradients (reverse-KL refinement backpropagates
    through sampling), grown by concatenation, as in-place writes would break the backward pass."""

    def __init__(self, length: int):
        self.length, self.filled = length, 0
        self.keys = self.values = None  # tensors [B, H, positions, D] once the first token is in

    def extend(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys and values ``[B, H, T, D]``; return all of them."""
        start, self.filled = self.filled, self.filled + keys.shape[2]
        if keys.requires_grad:
            pairs = ((self.keys, keys), (self.values, values))
            self.keys, self.values = (new if old is None else torch.cat([old, new], dim=2) for old, new in pairs)
            return self.keys, self.values
        if self.keys is None:
            self.keys, self.values = (t.new_empty(*t.shape[:2], self.length, t.shape[3]) for t in (keys, values))
        self.keys[:, :, start : self.filled], self.values[:, :, start : self.filled] = keys, values
        return self.keys[:, :, : self.filled], self.values[:, :, : self.filled]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention that can also extend a :class:`KVCache` one step."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Attend over ``h`` ``[B, T, W]``; with ``cache``, ``h`` holds the positions after the cached ones."""
        batch, length, width = h.shape
        q, k, v = self.qkv(h).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            keys, values = cache.extend(k, v)
            # One new query sees every cached position, so no mask is needed.
            y = F.scaled_dot_product_attention(q, keys, values)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class TransformerLayer(nn.Module):
    """Pre-LayerNorm transformer layer: causal attention, then an MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, h: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        h = h + self.attention(self.norm1(h), cache)
        return h + self.mlp(self.norm2(h))


class AutoregressiveBlock(nn.Module):
    """One TarFlow block over ``tokens`` tokens of ``channels`` channels.

    Parameters
    ----------
    tokens, channels
        Sequence length and channels per token.
    width, layers, heads, mlp_ratio
        Size of the causal transformer.
    reverse
        Process tokens in reversed order (alternate blocks do, so each token is conditioned
        on all others somewhere in the stack).
    spline_bins
        0 for an affine block; otherwise the bins of the rational-quadratic spline that
        follows the affine map of each channel.
    """

    def __init__(
        self, tokens: int, channels: int, width: int, layers: int, heads: int, mlp_ratio: int, reverse: bool, spline_bins: int = 0
    ):
        super().__init__()
        self.reverse = reverse
        self.heads = heads
        self.channels = channels
        self.spline_bins = int(spline_bins)
        self.proj_in = nn.Linear(channels, width)
        # The last token conditions nothing, so the transformer only ever sees tokens-1 positions.
        self.position = nn.Parameter(torch.randn(tokens - 1, width) * 0.02)
        self.layers = nn.ModuleList(TransformerLayer(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        spline_parameters = parameters_per_channel(self.spline_bins) if self.spline_bins else 0
        self.proj_out = nn.Linear(width, (2 + spline_parameters) * channels)
        # Zero-initialised output: every block starts as the identity (a zero spline is one
        # too), so training starts from the prior fitted to normalised data and the first
        # updates are well behaved.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def _token_maps(self, x: torch.Tensor, caches: list[KVCache] | None = None, position: int = 0):
        """Transformer outputs for inputs at ``position..``: shift, log-scale and spline parameters
        (``None`` for an affine block) of the next tokens."""
        h = self.proj_in(x) + self.position[position : position + x.shape[1]]
        for layer, cache in zip(self.layers, caches or [None] * len(self.layers)):
            h = layer(h, cache)
        out = self.proj_out(self.norm(h))
        if not self.spline_bins:
            log_scale, shift = out.chunk(2, dim=-1)
            return shift, log_scale, None
        out = out.view(*out.shape[:-1], self.channels, -1)
        return out[..., 1], out[..., 0], out[..., 2:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[B, T, C]`` -> ``(z, log|det dz/dx|)``."""
        if self.reverse:
            x = x.flip(1)
        shift, log_scale, spline = self._token_maps(x[:, :-1])
        moved = (x[:, 1:] - shift) * torch.exp(-log_scale)
        log_det = -log_scale.sum(dim=(1, 2))
        if spline is not None:
            moved, spline_log_det = rational_quadratic(moved, spline, SPLINE_BOUND)
            log_det = log_det + spline_log_det.sum(dim=(1, 2))
        z = torch.cat([x[:, :1], moved], dim=1)
        if self.reverse:
            z = z.flip(1)
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` ``[B, T, C]`` -> ``(x, log|det dx/dz|)``, one token at a time with a KV cache."""
        if self.reverse:
            z = z.flip(1)
        batch, tokens, _ = z.shape
        caches = [KVCache(tokens - 1) for _ in self.layers]
        x = [z[:, :1]]
        log_det = z.new_zeros(batch)
        for i in range(1, tokens):
            shift, log_scale, spline = self._token_maps(x[-1], caches, position=i - 1)
            token = z[:, i : i + 1]
            if spline is not None:
                token, spline_log_det = rational_quadratic(token, spline, SPLINE_BOUND, inverse=True)
                log_det = log_det + spline_log_det.sum(dim=(1, 2))
            x.append(token * torch.exp(log_scale) + shift)
            log_det = log_det + log_scale.sum(dim=(1, 2))
        x = torch.cat(x, dim=1)
        if self.reverse:
            x = x.flip(1)
        return x, log_det


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
        self._token_shape = self.representation.token_shape(cfg.tokens)
        tokens, channels = self._token_shape
        self.blocks = nn.ModuleList(
            AutoregressiveBlock(
                tokens, channels, cfg.width, cfg.layers_per_block, cfg.heads, cfg.mlp_ratio, reverse=i % 2 == 1, spline_bins=cfg.spline_bins
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
        return self._token_shape[0] * self._token_shape[1]

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

    def normalised_forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``y`` ``[B, ...]`` (see :mod:`~openmm_sbg.flow.representations`) -> ``(z, log|det dz/dy|)``."""
        h = y.reshape(y.shape[0], *self._token_shape)
        log_det = h.new_zeros(h.shape[0])
        for block in self.blocks:
            h, block_log_det = block(h)
            log_det = log_det + block_log_det
        return h.reshape(y.shape), log_det

    def normalised_inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prior sample ``z`` ``[B, ...]`` -> ``(features y, log|det dy/dz|)``."""
        h = z.reshape(z.shape[0], *self._token_shape)
        log_det = h.new_zeros(h.shape[0])
        for block in reversed(self.blocks):
            h, block_log_det = block.inverse(h)
            log_det = log_det + block_log_det
        return h.reshape(z.shape), log_det

    def nll_per_dim(self, y: torch.Tensor) -> torch.Tensor:
        """Training loss: ``-log q(y) / dim`` ``[B]`` for features ``y`` (normalised units)."""
        z, log_det = self.normalised_forward(y)
        return -(_standard_normal_log_prob(z) + log_det) / self.dim

    # -------------------------------------------------------------- nm space
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``x`` ``[B, N, 3]`` (nm) -> ``(z, log_det)`` with ``log q(x) = log N(z; 0, I) + log_det``.

        For the Cartesian representation ``z`` is ``[B, N, 3]`` and ``log_det = log|det dz/dx|``;
        for internal coordinates ``z`` is ``[B, N - 2, 3]`` and ``log_det`` also holds the
        analytic rigid-body density and the Z-matrix volume element.
        """
        features, representation_log_det = self.representation.features(self._check(x))
        z, log_det = self.normalised_forward(features)
        return z, log_det + representation_log_det

    def inverse(self, z: torch.Tensor, rigid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``z`` (shaped as :meth:`forward` returns it) -> ``(x in nm, log_det)``, ``log q(x) = log N(z) - log_det``.

        ``rigid`` ``[B, 7]`` are the normal numbers that place an internal-coordinate sample
        in space (orientation and centre); a Cartesian flow takes none.
        """
        param = self._param()
        features, log_det = self.normalised_inverse(z.to(dtype=param.dtype, device=param.device))
        x, representation_log_det = self.representation.positions(features, rigid)
        return x, log_det - representation_log_det

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log q(x)`` ``[B]`` of positions ``[B, N, 3]`` in nm (density per nm^3N).

        The flow's centre of mass is N(0, ``com_std``^2 I) around the origin, so score MD
        frames after centring them (subtract the mean atom position); SMC removes the CoM
        factor with :func:`openmm_sbg.smc.proposal.com_log_density`.
        """
        z, log_det = self.forward(x)
        return _standard_normal_log_prob(z) + log_det

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
        return x, _standard_normal_log_prob(z) - log_det

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


def _standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, I)`` summed over all but the batch dimension."""
    flat = z.reshape(z.shape[0], -1)
    return -0.5 * (flat**2).sum(dim=1) - 0.5 * flat.shape[1] * math.log(2 * math.pi)
