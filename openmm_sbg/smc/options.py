"""SMCOptions: every setting of an SMC run, with the defaults the sampler and the CLI share."""

from __future__ import annotations

import dataclasses
import os

from openmm_sbg.smc.kernels import Kernel
from openmm_sbg.smc.proposal import (
    COM_ADJUSTMENTS,
    DEFAULT_COM_ADJUSTMENT,
    resolve_clip_fraction,
    resolve_com_adjustment,
)
from openmm_sbg.smc.resampling import Resampler
from openmm_sbg.smc.schedules import Schedule

#: Default Langevin step size in nm^2 (energies in kT). On ad2 the stiffest bonds make
#: unadjusted Langevin unstable above ~1e-5 nm^2; see ``ula_step``.
DEFAULT_STEP_SIZE = 1e-6

#: Importance sampling whose weighted proposals estimate populations: the proposals stay
#: independent (no resampling) and unclipped (clipping the largest weights biases a rare
#: basin), with the CoM adjustment that cancels the flow's own CoM density.
INDEPENDENT_PROPOSALS = {"resample_threshold": 0.0, "clip_fraction": 0.0, "com_adjustment": "gaussian"}

# Options that change how a run is reported or saved, not its result: a checkpoint written
# with other values of these resumes.
_RUN_CONTROLS = ("checkpoint_path", "checkpoint_every", "progress")


@dataclasses.dataclass(frozen=True)
class SMCOptions:
    """Settings of :class:`~openmm_sbg.smc.SMCSampler`; the defaults are the single source of them.

    Parameters
    ----------
    n_particles
        Number of proposals drawn, and of particles after each resampling.
    n_steps
        Annealing steps (``0``: importance sampling); the most steps for ``schedule="adaptive"``.
    kernel
        ``"ula"`` (unadjusted Langevin, the paper's), ``"mala"`` (Metropolis-adjusted, with
        step-size adaptation) or a kernel function (see :mod:`openmm_sbg.smc.kernels`).
    step_size
        Langevin step size ``h`` in nm^2 (displacement ~ ``sqrt(2h)`` nm per coordinate).
    schedule
        ``"linear"`` (the paper's, reaching t = 1 exactly), ``"adaptive"`` (keeps the
        conditional ESS of each step at ``target_cess``) or a schedule object.
    target_cess
        Conditional ESS per step for the adaptive schedule.
    n_mcmc_steps
        Langevin moves per annealing step.
    resampling
        ``"systematic"``, ``"multinomial"`` or a function ``(log_w, n, generator) -> indices``.
    resample_threshold
        Resample when the normalised ESS falls below this during annealing (0: never before
        ``t = 1``). Importance sampling (``n_steps=0``) ignores it.
    resample_at_end
        Resample at ``t = 1`` so the output particles are equally weighted; ``False`` keeps
        the weighted particles. ``None`` (default): resample after annealing (``n_steps > 0``),
        keep importance sampling's independent proposals and their weights (``n_steps=0``).
    energy_cutoff
        Drop proposals whose target energy exceeds this many kT (``None``: keep all
        finite). Clashing proposals otherwise produce huge forces in the Langevin moves.
    clip_fraction
        Fraction of proposals with the largest log-weights to drop; ``None`` (default): the
        protocol's, the paper's 0.2% with ``com_adjustment="chi3"`` and 0 (exact weights)
        otherwise.
    com_adjustment
        ``"auto"`` (default: ``"gaussian"``, exact weights, for a flow with an analytic
        Gaussian centre such as an internal-coordinate TarFlow; ``"chi3"``, the paper's, for
        other flows), ``"chi3"``, ``"gaussian"`` or ``"none"``; see
        :mod:`openmm_sbg.smc.proposal`, which also states what log Z then estimates.
    adapt_step_size
        For MALA, adapt ``h`` after each step towards ``target_acceptance``.
    target_acceptance
        Mean MALA acceptance the adaptation aims for.
    batch_size
        Particles per flow / force-field evaluation; lower it if memory runs out.
    checkpoint_path
        If set, the run's state is written there (atomically) after drawing the proposals
        and every ``checkpoint_every`` steps; ``run(resume=True)`` continues from it.
    checkpoint_every
        Steps between checkpoints.
    progress
        Show a tqdm progress bar.
    """

    n_particles: int
    n_steps: int
    kernel: str | Kernel = "ula"
    step_size: float = DEFAULT_STEP_SIZE
    schedule: str | Schedule = "linear"
    target_cess: float = 0.99
    n_mcmc_steps: int = 1
    resampling: str | Resampler = "systematic"
    resample_threshold: float = 0.5
    resample_at_end: bool | None = None
    energy_cutoff: float | None = None
    clip_fraction: float | None = None
    com_adjustment: str = DEFAULT_COM_ADJUSTMENT
    adapt_step_size: bool = True
    target_acceptance: float = 0.574
    batch_size: int = 256
    checkpoint_path: str | os.PathLike | None = None
    checkpoint_every: int = 10
    progress: bool = True

    def __post_init__(self):
        if (
            self.n_particles < 1
            or self.n_steps < 0
            or self.n_mcmc_steps < 1
            or self.batch_size < 1
            or self.checkpoint_every < 1
        ):
            raise ValueError(
                "need n_particles >= 1, n_steps >= 0, n_mcmc_steps >= 1, batch_size >= 1 and checkpoint_every >= 1; "
                f"got {self.n_particles}, {self.n_steps}, {self.n_mcmc_steps}, {self.batch_size}, "
                f"{self.checkpoint_every}"
            )
        if not self.step_size > 0:
            raise ValueError(f"step_size must be positive (nm^2), got {self.step_size}")
        if self.com_adjustment != "auto" and self.com_adjustment not in COM_ADJUSTMENTS:
            raise ValueError(f"com_adjustment must be 'auto' or one of {COM_ADJUSTMENTS}, got {self.com_adjustment!r}")
        if self.clip_fraction is not None and not 0 <= self.clip_fraction < 1:
            raise ValueError(f"clip_fraction must be in [0, 1) or None (the protocol's), got {self.clip_fraction}")
        if self.checkpoint_path is not None:
            object.__setattr__(self, "checkpoint_path", os.fspath(self.checkpoint_path))

    def resolved(self, flow) -> SMCOptions:
        """These options with ``com_adjustment="auto"``, ``clip_fraction=None`` and ``resample_at_end=None`` made concrete for ``flow``."""
        com_adjustment = resolve_com_adjustment(self.com_adjustment, flow)
        clip_fraction = resolve_clip_fraction(self.clip_fraction, com_adjustment)
        resample_at_end = self.n_steps != 0 if self.resample_at_end is None else self.resample_at_end
        return dataclasses.replace(self, com_adjustment=com_adjustment, clip_fraction=clip_fraction, resample_at_end=resample_at_end)

    def resume_key(self) -> dict:
        """The options a checkpoint must share to be resumed, in a form ``torch.load`` reads back.

        Named choices stay as given; a function is known by its name and any other object
        by its ``repr`` (which should then show its settings, as the package's kernels do).
        """
        return {
            field.name: _plain(getattr(self, field.name))
            for field in dataclasses.fields(self)
            if field.name not in _RUN_CONTROLS
        }


def _plain(value):
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return getattr(value, "__name__", None) or repr(value)
