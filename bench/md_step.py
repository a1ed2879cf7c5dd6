"""Time per MD step vs replica count: our batched simulator vs an eager original-style loop.

Model: SchNet for aspirin (hidden 64, filters 64, 6 interactions, 25 Gaussians, cutoff 5 Å,
21 atoms), random weights shared by both paths (the original's pretrained checkpoint is used
instead when it is present and ``--checkpoint`` points to it).

* ours: :class:`mdsim.md.forces.ModelForceField` over the package's SchNet (static all-pairs
  graph with distances clamped at the cutoff, per-structure readout of known size, no host
  synchronisation in a step), Nosé–Hoover step from :mod:`mdsim.md.integrators`.
* eager reference, the way the original does it: every step a new radius graph by brute force
  (all pair distances, host-side mask ``d < cutoff``, ``nonzero``), PyG ``SchNet.forward`` (PyG
  readout, which counts structures on the host), autograd forces; same Nosé–Hoover step.

Prints ms/step, atom-steps/s, the eager/ours ratio and the scaling of atom-steps/s relative to
one replica.  Usage: ``python bench/md_step.py [--replicas 1 8 64 128] [--steps 20]``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mdsim.md.forces import ModelForceField  # noqa: E402
from mdsim.md.init import maxwell_boltzmann_velocities  # noqa: E402
from mdsim.md.integrators import make_integrator  # noqa: E402
from mdsim.md.state import MDState  # noqa: E402

DATA = Path("/work/shared/data/xtb_aspirin_500K.npz")
HP = dict(hidden_channels=64, num_filters=64, num_interactions=6, num_gaussians=25, cutoff=5.0)


def aspirin_frames(n: int):
    """(z, R) with R (n, 21, 3) Å: shared xTB frames if present, else a random-ish molecule."""
    if DATA.is_file():
        d = np.load(DATA)
        return d["z"].astype(np.int64), d["R"][:n * 50:50].astype(np.float64)
    rng = np.random.default_rng(0)
    z = np.array([6] * 9 + [8] * 4 + [1] * 8)
    pos = [np.zeros(3)]
    while len(pos) < len(z):  # grow a connected blob with 1.1-1.6 Å spacing
        p = pos[rng.integers(len(pos))] + rng.normal(size=3) * 0.8
        d = np.linalg.norm(np.array(pos) - p, axis=1)
        if d.min() > 1.0 and d.min() < 1.6:
            pos.append(p)
    base = np.array(pos)
    return z, base[None] + 0.05 * rng.normal(size=(n, len(z), 3))


def build_models(checkpoint=None):
    from torch_geometric.nn.models import SchNet
    from mdsim.models import SchNetModel, load_model
    if checkpoint:
        ours, _ = load_model(checkpoint)
    else:
        torch.manual_seed(0)
        ours = SchNetModel(**HP)
    ours.eval()
    cutoff = ours.cutoff

    def radius_graph_host(pos, batch):
        # brute force, as the original's otf graph: all pairs in a structure, host-side mask
        same = batch[:, None] == batch[None, :]
        d = torch.cdist(pos, pos)
        mask = same & (d < cutoff)
        mask.fill_diagonal_(False)
        mask = mask.cpu()  # host round trip
        j, i = torch.nonzero(mask, as_tuple=True)
        edge_index = torch.stack([j, i]).to(pos.device)
        w = (pos[edge_index[1]] - pos[edge_index[0]]).norm(dim=-1)
        return edge_index, w

    ref = SchNet(**HP, interaction_graph=radius_graph_host, readout="add")
    missing = ref.load_state_dict({k: v for k, v in ours.state_dict().items()
                                   if k not in ("target_mean", "target_std", "atom_ref")}, strict=False)
    assert not missing.missing_keys, missing.missing_keys
    ref.eval()
    std, mean = float(ours.target_std), float(ours.target_mean)

    class Eager(torch.nn.Module):
        def forward(self, positions, z, batch, n_structures, cell=None):
            e = ref(z, positions, batch).reshape(-1).to(torch.float64)
            n_atoms = torch.bincount(batch).to(torch.float64)  # host-side size again
            return std * e + mean + 0.0 * n_atoms
    return ours, Eager()


def time_interleaved(runs, integ, n_steps, warmup=3):
    """Median seconds per step for each (name, force_field, state); the paths alternate step by
    step so that they see the same machine load."""
    states = {name: st for name, _, st in runs}
    ffs = {name: ff for name, ff, _ in runs}
    times = {name: [] for name in states}
    with torch.no_grad():
        for i in range(warmup + n_steps):
            for name in states:
                t0 = time.perf_counter()
                states[name] = integ.step(states[name], ffs[name])
                if i >= warmup:
                    times[name].append(time.perf_counter() - t0)
    for name, st in states.items():
        assert torch.isfinite(st.positions).all(), name
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 8, 64, 128])
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--checkpoint", default=None, help="optional SchNet checkpoint (ours or the original's)")
    p.add_argument("--skip-eager-above", type=int, default=1000, help="skip the eager path above this R")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    z, frames = aspirin_frames(max(args.replicas))
    ours_model, eager_model = build_models(args.checkpoint)
    z_t = torch.as_tensor(z)
    N = len(z)
    masses = torch.as_tensor(__import__("ase.data", fromlist=["atomic_masses"]).atomic_masses[z], dtype=torch.float32)
    integ = make_integrator("NoseHoover", 0.5, 500.0, {"ttime": 20})
    ff_ours = ModelForceField(ours_model, z_t)
    ff_ref = ModelForceField(eager_model, z_t, dtype=torch.float32)

    # same forces from both paths (sanity)
    x = torch.as_tensor(frames[:2], dtype=torch.float32)
    e1, f1 = ff_ours(x)
    e2, f2 = ff_ref(x)
    err = (f1 - f2).abs().max().item()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, atoms {N}, "
          f"{'pretrained' if args.checkpoint else 'random'} SchNet; max |F_ours − F_eager| = {err:.2e} eV/Å")

    rows = []
    for R in args.replicas:
        g = torch.Generator().manual_seed(0)
        pos = torch.as_tensor(frames[np.arange(R) % len(frames)], dtype=torch.float32)
        v = maxwell_boltzmann_velocities(masses, R, 500.0, g)
        runs = []
        for name, ff in (("ours", ff_ours), ("eager", ff_ref)):
            if name == "eager" and R > args.skip_eager_above:
                continue
            e, f = ff(pos)
            runs.append((name, ff, MDState(positions=pos, velocities=v, forces=f, energy=e, masses=masses)))
        out = time_interleaved(runs, integ, args.steps)
        rows.append((R, out))
        o, r = out["ours"], out.get("eager")
        print(f"R={R:4d}  ours {1e3 * o:8.2f} ms/step {R * N / o:10.0f} atom-steps/s"
              + (f"   eager {1e3 * r:8.2f} ms/step {R * N / r:10.0f} atom-steps/s   eager/ours {r / o:5.2f}x"
                 if r else ""), flush=True)
    base = {k: rows[0][0] * N / v for k, v in rows[0][1].items()}
    print("throughput relative to R=%d (atom-steps/s ratio):" % rows[0][0])
    for R, out in rows:
        print(f"  R={R:4d}  " + "  ".join(f"{k} {R * N / v / base[k]:6.1f}x" for k, v in out.items()))


if __name__ == "__main__":
    main()
