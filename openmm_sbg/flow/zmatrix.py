"""Z-matrix of a molecule from its bond graph, and the exact map to and from Cartesian positions.

Three *root* atoms fix the molecule's frame: ``r0`` (a central heavy atom) and two atoms
``r1``, ``r2`` bonded to it. Every other atom ``i`` is placed, in
breadth-first order from the root, by a bond ``b = |x_i - x_j|``, an angle ``a = angle(i, j, k)``
and a dihedral ``d = dihedral(i, j, k, l)`` to atoms placed before it: ``j`` is bonded to
``i``, ``k`` to ``j``, and ``l`` is either an earlier *sibling* (bonded to ``j``), which makes
``d`` a narrow improper-like angle (+-120 degrees for a tetrahedral centre, its sign the
centre's chirality), or an atom bonded to ``k``, which makes ``d`` a proper torsion. Only the
first child of each atom carries a torsion, so the hard, multimodal part of the molecule is
a few numbers and the rest are nearly Gaussian. A ring-closing bond is simply implied.

The coordinates of a configuration ``x [B, N, 3]`` are then

- ``b1 = |x_r1 - x_r0|``, ``b2 = |x_r2 - x_r0|``, ``a2 = angle(r2, r0, r1)``;
- ``(b, a, d)`` of each of the ``N - 3`` other atoms;
- six rigid-body coordinates: the centre ``c`` (the unweighted mean of the positions) and the
  orientation ``R`` in SO(3) of the frame ``(r0 -> r1, the plane of r2)``.

The volume element is ``dx = dc dR prod(b^2 sin a) db da dd``, with ``dR`` the Haar measure on
SO(3) of total volume ``8 pi^2`` (the direction of ``r0 -> r1`` on the sphere times the angle
of ``r2`` about it) and the product over ``b1``, ``(b2, a2)`` and every placed atom
(:meth:`ZMatrix.log_volume`).
"""

from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np
import torch

LOG_SO3_VOLUME = math.log(8 * math.pi**2)


@dataclasses.dataclass(frozen=True)
class ZMatrix:
    """Placement of every atom of one molecule.

    Attributes
    ----------
    root
        ``(r0, r1, r2)``.
    placed
        ``[N - 3, 4]`` rows ``(i, j, k, l)`` in placement order.
    """

    root: tuple[int, int, int]
    placed: np.ndarray
    # Index tensors per device, made on first use: the hot path (every flow energy) then
    # allocates nothing, and CUDA graphs can capture it.
    _indices: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_atoms(self) -> int:
        return len(self.placed) + 3

    @property
    def order(self) -> list[int]:
        """Atoms in placement order (the flow's token order)."""
        return [*self.root, *self.placed[:, 0].tolist()]

    @classmethod
    def from_topology(cls, topology) -> ZMatrix:
        """The Z-matrix of an ``openmm.app.Topology`` (or anything with ``atoms()`` and ``bonds()``)."""
        atoms = list(topology.atoms())
        heavy = [atom.element is None or atom.element.symbol != "H" for atom in atoms]
        bonds = [(a.index, b.index) for a, b in topology.bonds()]
        return cls.from_bonds(len(atoms), bonds, heavy)

    @classmethod
    def from_bonds(cls, n_atoms: int, bonds, heavy=None) -> ZMatrix:
        """The Z-matrix of a molecule of ``n_atoms`` atoms with ``bonds`` (pairs of indices).

        ``heavy`` (one bool per atom; default all True) marks the atoms preferred as root and
        as references, since a hydrogen makes a floppy reference.
        """
        heavy = [True] * n_atoms if heavy is None else [bool(h) for h in heavy]
        if n_atoms < 3:
            raise ValueError(f"internal coordinates need at least 3 atoms, got {n_atoms}")
        neighbours: list[list[int]] = [[] for _ in range(n_atoms)]
        for a, b in bonds:
            if a != b and b not in neighbours[a]:
                neighbours[a].append(b)
                neighbours[b].append(a)
        # Heavy atoms first, then by index: the backbone and side chains carry the torsions.
        for row in neighbours:
            row.sort(key=lambda atom: (not heavy[atom], atom))
        distances = _graph_distances(neighbours, 0)
        if (distances < 0).any():
            missing = np.flatnonzero(distances < 0)[:5].tolist()
            raise ValueError(
                f"the bond graph is not connected (e.g. atoms {missing} cannot be reached from atom 0); "
                "internal coordinates need one molecule whose Topology has all its bonds "
                "(a PDB without CONECT records for non-standard residues loses them)"
            )
        root = _root(neighbours, heavy)
        # r1 and r2 are both bonded to r0; r0 is placed "from" r1 for the choice of references.
        parent = {root[0]: root[1], root[1]: root[0], root[2]: root[0]}
        children: dict[int, list[int]] = collections.defaultdict(list)
        children[root[0]] = [root[1], root[2]]
        placed_set = set(root)
        rows = []
        queue = collections.deque(root)
        while queue:
            j = queue.popleft()
            for i in neighbours[j]:
                if i in placed_set:
                    continue
                k = parent[j]
                siblings = [s for s in children[j] if s != k]
                if siblings:
                    l = siblings[0]
                else:
                    l = next((a for a in neighbours[k] if a in placed_set and a not in (i, j)), None)
                    if l is None:
                        l = next(a for a in neighbours[j] if a in placed_set and a not in (i, k))
                rows.append((i, j, k, l))
                parent[i] = j
                children[j].append(i)
                placed_set.add(i)
                queue.append(i)
        return cls(root=tuple(int(a) for a in root), placed=np.asarray(rows, dtype=np.int64).reshape(-1, 4))

    # ------------------------------------------------------------------ x -> internal
    def to_internal(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``[B, N, 3]`` -> ``(q [B, N - 2, 3], c [B, 3])``.

        Row 0 of ``q`` is ``(b1, b2, a2)``; row ``m + 1`` is ``(b, a, d)`` of ``placed[m]``.
        Angles in ``(0, pi)``, dihedrals in ``(-pi, pi]``.
        """
        r0, r1, r2 = self.root
        head = torch.stack(
            [_distance(x[:, r1], x[:, r0]), _distance(x[:, r2], x[:, r0]), _angle(x[:, r2], x[:, r0], x[:, r1])], dim=-1
        )
        i, j, k, l = self._device_indices(x.device)[0]
        xi, xj, xk, xl = x[:, i], x[:, j], x[:, k], x[:, l]
        rows = torch.stack([_distance(xi, xj), _angle(xi, xj, xk), _dihedral(xi, xj, xk, xl)], dim=-1)
        return torch.cat([head[:, None], rows], dim=1), x.mean(dim=1)

    def orientation(self, x: torch.Tensor) -> torch.Tensor:
        """The rotation ``[B, 3, 3]`` of the root frame: columns ``r0 -> r1``, the in-plane normal towards ``r2``, their cross product."""
        r0, r1, r2 = self.root
        e1 = x[:, r1] - x[:, r0]
        e1 = e1 / e1.norm(dim=-1, keepdim=True)
        e2 = x[:, r2] - x[:, r0]
        e2 = e2 - (e2 * e1).sum(-1, keepdim=True) * e1
        e2 = e2 / e2.norm(dim=-1, keepdim=True)
        return torch.stack([e1, e2, torch.linalg.cross(e1, e2)], dim=-1)

    def log_volume(self, q: torch.Tensor) -> torch.Tensor:
        """``log |dx / d(c, R, q)|`` ``[B]``: ``sum 2 log b + log sin a`` over every bond and angle of ``q``."""
        bonds = torch.cat([q[:, :1, 0], q[:, :1, 1], q[:, 1:, 0]], dim=1)
        angles = torch.cat([q[:, :1, 2], q[:, 1:, 1]], dim=1)
        return 2 * bonds.log().sum(dim=1) + angles.sin().log().sum(dim=1)

    # ------------------------------------------------------------------ internal -> x
    def to_cartesian(self, q: torch.Tensor, centre: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_internal`: ``q [B, N - 2, 3]``, ``centre [B, 3]``, ``rotation [B, 3, 3]`` -> ``[B, N, 3]``.

        The root frame is built with ``r0`` at the origin, ``r1`` on +x and ``r2`` in the
        xy-plane (y > 0), then rotated by ``rotation`` and moved so its mean is ``centre``.
        """
        batch = q.shape[0]
        x = q.new_zeros(batch, self.n_atoms, 3)
        r0, r1, r2 = self.root
        b1, b2, a2 = q[:, 0].unbind(-1)
        x[:, r1, 0] = b1
        x[:, r2, 0] = b2 * torch.cos(a2)
        x[:, r2, 1] = b2 * torch.sin(a2)
        for tokens, (i, j, k, l) in self._device_indices(q.device)[1]:
            values = q[:, tokens]
            x[:, i] = _place(x[:, j], x[:, k], x[:, l], values[..., 0], values[..., 1], values[..., 2])
        x = x @ rotation.transpose(-1, -2)
        return x - x.mean(dim=1, keepdim=True) + centre[:, None]

    def _device_indices(self, device: torch.device):
        """``(i, j, k, l)`` of every placed atom, and per level its token rows and ``(i, j, k, l)``, on ``device``."""
        key = str(device)
        if key not in self._indices:
            columns = lambda rows: tuple(torch.as_tensor(self.placed[rows, c], device=device) for c in range(4))  # noqa: E731
            every = slice(None)
            levels = [(torch.as_tensor(rows + 1, device=device), columns(rows)) for rows in self._levels()]
            self._indices[key] = (columns(every), levels)
        return self._indices[key]

    def _levels(self) -> list[np.ndarray]:
        """Rows of :attr:`placed` grouped so that each group depends only on earlier groups."""
        depth = {atom: 0 for atom in self.root}
        for i, j, k, l in self.placed:
            depth[int(i)] = 1 + max(depth[int(j)], depth[int(k)], depth[int(l)])
        levels = np.asarray([depth[int(i)] for i in self.placed[:, 0]])
        return [np.flatnonzero(levels == level) for level in range(1, int(levels.max(initial=0)) + 1)]


# ----------------------------------------------------------------------------- geometry
def _graph_distances(neighbours: list[list[int]], source: int) -> np.ndarray:
    distance = np.full(len(neighbours), -1)
    distance[source] = 0
    queue = collections.deque([source])
    while queue:
        atom = queue.popleft()
        for other in neighbours[atom]:
            if distance[other] < 0:
                distance[other] = distance[atom] + 1
                queue.append(other)
    return distance


def _root(neighbours: list[list[int]], heavy: list[bool]) -> tuple[int, int, int]:
    """A central atom (least eccentric heavy atom with two or more neighbours) and two of its neighbours."""
    candidates = [atom for atom, row in enumerate(neighbours) if heavy[atom] and len(row) >= 2]
    candidates = candidates or [atom for atom, row in enumerate(neighbours) if len(row) >= 2]
    if not candidates:
        raise ValueError("internal coordinates need an atom bonded to two others; the bond graph has none")
    r0 = min(candidates, key=lambda atom: (_graph_distances(neighbours, atom).max(), atom))
    r1, r2 = neighbours[r0][:2]
    return r0, r1, r2


def _distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).norm(dim=-1)


def _angle(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Angle at ``b`` in ``(0, pi)``; atan2 keeps it accurate near 0 and pi."""
    u, v = a - b, c - b
    return torch.atan2(torch.linalg.cross(u, v).norm(dim=-1), (u * v).sum(-1))


def _dihedral(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Dihedral ``a-b-c-d`` in ``(-pi, pi]`` (IUPAC sign, as mdtraj)."""
    b0, b1, b2 = b - a, c - b, d - c
    n2 = torch.linalg.cross(b1, b2)
    y = b1.norm(dim=-1) * (b0 * n2).sum(-1)
    return torch.atan2(y, (torch.linalg.cross(b0, b1) * n2).sum(-1))


def _place(xj, xk, xl, bond, angle, dihedral):
    """Position of ``i`` with ``|i - j| = bond``, ``angle(i, j, k) = angle``, ``dihedral(i, j, k, l) = dihedral``."""
    u = xj - xk
    u = u / u.norm(dim=-1, keepdim=True)
    n = torch.linalg.cross(xk - xl, u)
    n = n / n.norm(dim=-1, keepdim=True)
    m = torch.linalg.cross(n, u)
    local = torch.stack(
        [-torch.cos(angle), torch.sin(angle) * torch.cos(dihedral), torch.sin(angle) * torch.sin(dihedral)], dim=-1
    )
    return xj + bond[..., None] * (local[..., :1] * u + local[..., 1:2] * m + local[..., 2:] * n)
