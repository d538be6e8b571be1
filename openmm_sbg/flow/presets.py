"""Architecture presets: the paper's TarFlow sizes, and small ones that train on a laptop CPU."""

from __future__ import annotations

import dataclasses

TOKEN_LAYOUTS = ("atom", "coordinate")
REPRESENTATIONS = ("cartesian", "internal")


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Size and token layout of a :class:`~openmm_sbg.flow.TarFlow`.

    Parameters
    ----------
    width
        Transformer width (model dimension).
    n_blocks
        Number of autoregressive blocks; they alternate identity / reversed token order.
    layers_per_block
        Causal transformer layers inside each block.
    heads
        Attention heads (the paper uses a head dimension of 64, i.e. ``width // 64``).
    tokens
        ``"atom"``: one token per atom with 3 channels (for ``internal``, per placed atom:
        bond, angle, dihedral); ``"coordinate"``: one token per coordinate with 1 channel
        (3x longer sequences, finer autoregression).
    mlp_ratio
        Hidden size of each transformer MLP, as a multiple of ``width``.
    representation
        ``"cartesian"`` (the paper's: centred, scaled positions) or ``"internal"`` (Z-matrix
        bonds, angles and dihedrals; the rigid-body motion analytic); see
        :mod:`openmm_sbg.flow.representations`.
    marginals
        ``internal`` only: Gaussian-mixture components of the fixed per-feature Gaussianization
        fitted to the training data (:mod:`openmm_sbg.flow.marginals`); 0 (the default, and
        every checkpoint written before it existed) for none.
    spline_bins
        0 (the default, and every checkpoint written before it existed): affine blocks, as in
        the paper. ``K >= 2``: each block follows its affine map with a conditional monotone
        rational-quadratic spline of ``K`` bins per channel (:mod:`openmm_sbg.flow.splines`),
        which can make a token's conditional density multimodal.
    """

    width: int = 256
    n_blocks: int = 4
    layers_per_block: int = 4
    heads: int = 4
    tokens: str = "atom"
    mlp_ratio: int = 4
    representation: str = "cartesian"
    marginals: int = 0
    spline_bins: int = 0

    def __post_init__(self):
        if self.tokens not in TOKEN_LAYOUTS:
            raise ValueError(f"tokens must be one of {TOKEN_LAYOUTS}, got {self.tokens!r}")
        if self.representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {self.representation!r}")
        for field in ("width", "n_blocks", "layers_per_block", "heads", "mlp_ratio"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"{field} must be a positive integer, got {getattr(self, field)!r}")
        if int(self.marginals) < 0:
            raise ValueError(f"marginals must be a non-negative number of mixture components, got {self.marginals!r}")
        if self.marginals and self.representation != "internal":
            raise ValueError("marginals (per-feature Gaussianization) needs representation='internal'")
        if int(self.spline_bins) < 0 or int(self.spline_bins) == 1:
            raise ValueError(f"spline_bins must be 0 (affine blocks) or at least 2, got {self.spline_bins!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")

    def to_dict(self) -> dict:
        """Plain-dict form, as stored in checkpoints."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> FlowConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a newer checkpoint format)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown flow configuration keys {unknown}; was it written by a newer openmm-sbg?")
        return cls(**values)


# Paper sizes (Tan et al. 2025, DESIGN.md), Cartesian as in the paper, for GPUs: AD2 uses one
# token per Cartesian coordinate. The "-small" presets keep the paper's head dimension of 64,
# are sized for CPU training and model internal coordinates, which a CPU learns in minutes
# (the first shipped ad2-small model is Cartesian; its checkpoint records that).
PRESETS: dict[str, FlowConfig] = {
    "ad2": FlowConfig(width=256, n_blocks=4, layers_per_block=4, heads=4, tokens="coordinate"),
    "al3": FlowConfig(width=256, n_blocks=6, layers_per_block=6, heads=4),
    "al4": FlowConfig(width=256, n_blocks=6, layers_per_block=6, heads=4),
    "al6": FlowConfig(width=384, n_blocks=6, layers_per_block=6, heads=6),
    "chignolin": FlowConfig(width=384, n_blocks=8, layers_per_block=8, heads=6),
    "ad2-small": FlowConfig(width=64, n_blocks=4, layers_per_block=2, heads=1, representation="internal"),
    "al3-small": FlowConfig(width=128, n_blocks=4, layers_per_block=2, heads=2, representation="internal"),
    "al4-small": FlowConfig(width=128, n_blocks=4, layers_per_block=2, heads=2, representation="internal"),
    "al6-small": FlowConfig(width=128, n_blocks=6, layers_per_block=2, heads=2, representation="internal"),
}


def preset_names() -> list[str]:
    """Names accepted by :func:`get_preset`."""
    return list(PRESETS)


def get_preset(name: str) -> FlowConfig:
    """The :class:`FlowConfig` of preset ``name``."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown flow preset {name!r}; presets are {preset_names()}") from None


def resolve_config(config: FlowConfig | str | dict) -> FlowConfig:
    """Accept a :class:`FlowConfig`, a preset name, or a config dict."""
    if isinstance(config, FlowConfig):
        return config
    if isinstance(config, str):
        return get_preset(config)
    if isinstance(config, dict):
        return FlowConfig.from_dict(config)
    raise TypeError(f"config must be a FlowConfig, a preset name or a dict, got {type(config).__name__}")
