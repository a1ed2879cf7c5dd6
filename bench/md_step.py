"""Time per MD step vs replica count: eager original-style loop, ours eager, ours compiled
(and ours CUDA-graphed on a GPU), side by side in one run.

Model: SchNet for aspirin (hidden 64, filters 64, 6 interactions, 25 Gaussians, cutoff 5 Å,
21 atoms), random weights shared by all paths (the original's pretrained checkpoint is used
instead when ``--checkpoint`` points to it).  Integrator: Nosé–Hoover, 0.5 fs, 500 K.

* ``eager-orig``, the way the original does it: every step a new radius graph by brute force
  (all pair distances, host-side mask ``d < cutoff``, ``nonzero``), PyG ``SchNet.forward`` (PyG
  readout, which counts structures on the host), autograd forces.
* ``ours-eager``: :class:`mdsim.md.forces.ModelForceField` over the package's SchNet (static
  all-pairs graph with distances clamped at the cutoff, per-structure readout of known size, no
  host synchronisation in a step), the step of :mod:`mdsim.md.integrators`.
* ``ours-compiled``: the same step, ``torch.compile``d whole (forces by ``torch.func``, see
  :mod:`mdsim.md.compiled`), ``--compile-backend`` (inductor by default; compile time printed).
* ``ours-cuda_graph`` (``--device cuda`` only): ``--block`` steps captured in one CUDA graph and
  replayed.

Paths alternate block by block so that they see the same machine load.  Prints ms/step,
atom-steps/s, each column's speed-up over ``eager-orig`` and the scaling of atom-steps/s
relative to the first replica count.  Usage:
``python bench/md_step.py [--replicas 1 8 64 128] [--steps 20] [--threads 1] [--device cuda]``.
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
        def __init__(self):
            super().__init__()
            self.ref = ref  # registered, so that .to(device) moves it

        def forward(self, positions, z, batch, n_structures, cell=None):
            e = self.ref(z, positions, batch).reshape(-1).to(torch.float64)
            n_atoms = torch.bincount(batch).to(torch.float64)  # host-side size again
            return std * e + mean + 0.0 * n_atoms
    return ours, Eager()


def time_interleaved(paths, n_steps, block=1, warmup=2, device="cpu"):
    """Median seconds per step of each path ``name -> (advance(state, k) -> state, state)``.
    Paths alternate block by block (``block`` steps each) so that they see the same machine
    load; CUDA is synchronised around every timed block."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    states = {name: st for name, (_, st) in paths.items()}
    times = {name: [] for name in paths}
    n_blocks = max(1, -(-n_steps // block))
    with torch.no_grad():
        for i in range(warmup + n_blocks):
            for name, (advance, _) in paths.items():
                sync()
                t0 = time.perf_counter()
                states[name] = advance(states[name], block)
                sync()
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) / block)
    for name, st in states.items():
        assert torch.isfinite(st.positions).all(), name
    return {name: statistics.median(t) for name, t in times.items()}


def _loop(integ, ff):
    def advance(state, k):
        for _ in range(k):
            state = integ.step(state, ff)
        return state
    return advance


def _fast(stepper):
    return lambda state, k: stepper.run(state, k)[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 8, 64, 128])
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--checkpoint", default=None, help="optional SchNet checkpoint (ours or the original's)")
    p.add_argument("--skip-eager-above", type=int, default=1000, help="skip the eager path above this R")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the 'compiled' column (inductor, aot_eager, eager)")
    p.add_argument("--no-compile", action="store_true", help="skip the compiled column")
    p.add_argument("--block", type=int, default=None,
                   help="steps per timed block and per CUDA graph (default 1 on CPU, 20 on CUDA)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mdsim.md.compiled import FastStepper
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    block = args.block or (20 if cuda else 1)
    z, frames = aspirin_frames(max(args.replicas))
    ours_model, eager_model = build_models(args.checkpoint)
    ours_model.to(device)
    eager_model.to(device)
    z_t = torch.as_tensor(z)
    N = len(z)
    masses = torch.as_tensor(__import__("ase.data", fromlist=["atomic_masses"]).atomic_masses[z],
                             dtype=torch.float32).to(device)
    integ = make_integrator("NoseHoover", 0.5, 500.0, {"ttime": 20})
    ff_ours = ModelForceField(ours_model, z_t)
    ff_ref = ModelForceField(eager_model, z_t, dtype=torch.float32)

    # same forces from both paths (sanity)
    x = torch.as_tensor(frames[:2], dtype=torch.float32, device=device)
    e1, f1 = ff_ours(x)
    e2, f2 = ff_ref(x)
    err = (f1 - f2).abs().max().item()
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else f", threads {torch.get_num_threads()}")
          + f", atoms {N}, {'pretrained' if args.checkpoint else 'random'} SchNet, Nosé–Hoover, "
          f"compile backend {args.compile_backend}; max |F_ours − F_eager| = {err:.2e} eV/Å", flush=True)
    if hasattr(__import__("os"), "getloadavg"):
        print("load average before: %.2f %.2f %.2f" % __import__("os").getloadavg(), flush=True)

    cols = ["eager-orig", "ours-eager"] + ([] if args.no_compile else ["ours-compiled"]) \
        + (["ours-cuda_graph"] if cuda else [])
    rows = []
    for R in args.replicas:
        g = torch.Generator().manual_seed(0)
        pos = torch.as_tensor(frames[np.arange(R) % len(frames)], dtype=torch.float32).to(device)
        v = maxwell_boltzmann_velocities(masses.cpu(), R, 500.0, g).to(device)

        def state_for(ff):
            e, f = ff(pos)
            return MDState(positions=pos, velocities=v, forces=f, energy=e, masses=masses)

        paths, notes = {}, []
        if R <= args.skip_eager_above:
            paths["eager-orig"] = (_loop(integ, ff_ref), state_for(ff_ref))
        st = state_for(ff_ours)
        paths["ours-eager"] = (_loop(integ, ff_ours), st)
        if not args.no_compile:
            stepper = FastStepper(integ, ff_ours, st, "compile", compile_backend=args.compile_backend,
                                  block_steps=block)
            t0 = time.perf_counter()
            out = stepper.run(st, 1)[0]
            if cuda:
                torch.cuda.synchronize()
            notes.append(f"compile {time.perf_counter() - t0:.1f} s")
            ref = integ.step(st, ff_ours)
            notes.append(f"|ΔF| compiled vs eager after 1 step {(out.forces - ref.forces).abs().max().item():.1e} eV/Å")
            if stepper.backend == "compile":
                paths["ours-compiled"] = (_fast(stepper), st)
        if cuda:
            gstep = FastStepper(integ, ff_ours, st, "cuda_graph", block_steps=block)
            t0 = time.perf_counter()
            out = gstep.run(st, block)[0]
            torch.cuda.synchronize()
            notes.append(f"capture {time.perf_counter() - t0:.1f} s")
            ref = st
            for _ in range(block):
                ref = integ.step(ref, ff_ours)
            notes.append(f"|ΔF| graph vs eager after {block} steps {(out.forces - ref.forces).abs().max().item():.1e} eV/Å")
            paths["ours-cuda_graph"] = (_fast(gstep), st)
        out = time_interleaved(paths, args.steps, block=block, device=device)
        rows.append((R, out))
        print(f"R={R:4d}  " + "  ".join(f"{k} {1e3 * t:8.2f} ms" for k, t in out.items())
              + ("   [" + "; ".join(notes) + "]" if notes else ""), flush=True)

    print(f"\nms/step (atom-steps/s), speed-up vs eager-orig = t(eager-orig)/t(column), {device}:")
    print(f"{'R':>5} | " + " | ".join(f"{c:>24}" for c in cols) + " | "
          + " | ".join(f"{c + '/orig':>18}" for c in cols[1:]))
    for R, out in rows:
        cells = []
        for c in cols:
            t = out.get(c)
            cells.append(f"{1e3 * t:10.2f} ({R * N / t:11,.0f})" if t else f"{'-':>24}")
        base = out.get("eager-orig")
        ratios = [f"{base / out[c]:17.2f}x" if (base and out.get(c)) else f"{'-':>18}" for c in cols[1:]]
        print(f"{R:5d} | " + " | ".join(cells) + " | " + " | ".join(ratios))
    first = rows[0]
    print("throughput relative to R=%d (atom-steps/s ratio):" % first[0])
    for R, out in rows:
        print(f"  R={R:4d}  " + "  ".join(f"{k} {R / first[0] * first[1][k] / v:6.1f}x"
                                        for k, v in out.items() if k in first[1]))
    if hasattr(__import__("os"), "getloadavg"):
        print("load average after: %.2f %.2f %.2f" % __import__("os").getloadavg())


if __name__ == "__main__":
    main()
