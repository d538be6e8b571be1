"""Thin an ``openmm-sbg md`` run into the reference MD shipped in ``openmm_sbg/reference/`` (developer tool).

    python tools/ship_reference.py runs/ad2-ref.h5 ad2 --stride 4

Keeps every ``stride``-th frame with its energy; every kept frame is marked "test" (the
shipped reference is never used for training).
"""

import argparse
import json
import pathlib

import h5py
import numpy as np

from openmm_sbg import data, systems
from openmm_sbg.md import MDConfig, SPLIT_CODES, write_trajectory

OUT = pathlib.Path(__file__).resolve().parents[1] / "openmm_sbg" / "reference"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="HDF5 file from openmm-sbg md")
    parser.add_argument("system", help="built-in system name")
    parser.add_argument("--stride", type=int, default=4)
    args = parser.parse_args()
    target = systems.get(args.system)
    traj = data.load_trajectory(args.run, target=target)[:: args.stride]
    energies = data.read_metadata(args.run)["energies_kT"][:: args.stride]
    with h5py.File(args.run) as handle:
        frame_ps = float(np.diff(handle["time"][:2])[0]) * args.stride
    config = MDConfig(n_frames=traj.n_frames, steps_per_frame=round(frame_ps * 1000))
    out = OUT / f"{args.system}-ref.h5"
    split = np.full(traj.n_frames, SPLIT_CODES["test"], dtype=np.int8)
    write_trajectory(str(out), target, traj.xyz, energies, split, config)
    print(json.dumps({"out": str(out), "frames": traj.n_frames, "frame_interval_ps": frame_ps}))


if __name__ == "__main__":
    main()
