"""Time per MD step vs replica count: eager original-style loop, ours eager, ours compiled
(and ours CUDA-graphed on a GPU), side by side in one run.

Model: SchNet for aspirin (hidden 64, filters 64, 6 interactions, 25 Gaussians, cutoff 5 Å,
21 atoms), random weights shared by all paths (the original's pretrained checkpoint is used
instead when ``--checkpoint`` points to it).  Integrator: Nosé–Hoover, 0.5 fs, 500 K.

* ``eager-orig``, the way the original does it: every step a new radius graph by brute force
  (all pair distances, host-side mask ``d < cutoff``, ``nonzero``), PyG ``SchNet.forward`` (PyG
  readout, which counts structures on the host), autograd forces.
* ``ours-allpairs``: :class:`mdsim.md.forces.ModelForceField` over the package's SchNet with the
  static all-pairs graph (distances clamped at the cutoff), eager steps of
  :mod:`mdsim.md.integrators`.
* ``ours-nl``: the same with the Verlet list (``--skin``, default 0.3 Å; rebuilt when an atom
  moved more than skin/2).
* ``ours-eager``: the Verlet list and the filters read from a cubic Hermite table
  (``--table-spacing``, default 0.005 Å; :mod:`mdsim.models.radial_table`), the package default
  for eager steps.
* ``ours-compile``: the ``ours-eager`` step ``torch.compile``d whole (forces by ``torch.func``, see
  :mod:`mdsim.md.compiled`), ``--compile-backend`` (inductor by default; compile time printed).
* ``ours-cuda_graph`` (``--device cuda`` only): ``--block`` steps captured in one CUDA graph.
* ``ours`` in the summary is what ``md_backend: auto`` runs for a long run in this process
  (eager with several threads, compile with one, cuda_graph on CUDA); ``--processes P`` adds
  ``ours-<P>proc``: the compiled step in P processes of one thread each over R/P replicas (what a
  ``torchrun``-sharded StABlE run with OMP_NUM_THREADS=1 does between its per-epoch
  communications, where auto compiles), timed over the same steps after the in-process columns.

In-process paths alternate block by block so that they see the same machine load.  Prints
ms/step, atom-steps/s, each column's speed-up over ``eager-orig``, the scaling of atom-steps/s
relative to the first replica count, and the load average before and after.  Usage::

    python bench/md_step.py [--data data/raw/xtb_aspirin_500K.npz] [--replicas 1 8 64]
        [--steps 20] [--threads 2] [--processes 2] [--device cuda]
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

DATA = Path("data/raw/xtb_aspirin_500K.npz")  # relative to the working directory; see --data
HP = dict(hidden_channels=64, num_filters=64, num_interactions=6, num_gaussians=25, cutoff=5.0)


def aspirin_frames(n: int, data: Path = DATA):
    """(z, R) with R (n, 21, 3) Å: frames of the MD17-format npz ``data`` (e.g. the GFN2-xTB
    aspirin trajectory) if present, else a random-ish 21-atom molecule (printed)."""
    if data is not None and Path(data).is_file():
        d = np.load(data)
        return d["z"].astype(np.int64), d["R"][:n * 50:50].astype(np.float64)
    print(f"no data file {data}: using a synthetic 21-atom molecule (pass --data)", flush=True)
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


def _proc_worker(rank, n_proc, R, steps, args, frames, z, queue, barrier):
    """One of ``n_proc`` processes: R/n_proc replicas, one thread, the ``ours`` step."""
    torch.set_num_threads(1)
    lo, hi = rank * R // n_proc, (rank + 1) * R // n_proc
    ours_model, _ = build_models(args.checkpoint)
    integ = make_integrator("NoseHoover", 0.5, 500.0, {"ttime": 20})
    ff = ModelForceField(ours_model, torch.as_tensor(z), neighbor_skin=args.skin, radial_table_spacing=_table(args))
    st = _state(ff, frames, z, np.arange(lo, hi), "cpu")
    advance = _ours_path(integ, ff, st, args)[0]
    with torch.no_grad():
        st = advance(st, 3)  # warm-up (and compilation)
        barrier.wait()
        t0 = time.perf_counter()
        st = advance(st, steps)
        dt = time.perf_counter() - t0
    queue.put(dt / steps)


def _table(args):
    return None if args.table_spacing < 0 else args.table_spacing


def _state(ff, frames, z, idx, device):
    masses = torch.as_tensor(__import__("ase.data", fromlist=["atomic_masses"]).atomic_masses[z],
                             dtype=torch.float32).to(device)
    g = torch.Generator().manual_seed(0)
    pos = torch.as_tensor(frames[idx % len(frames)], dtype=torch.float32).to(device)
    v = maxwell_boltzmann_velocities(masses.cpu(), len(idx), 500.0, g).to(device)
    e, f = ff(pos)
    return MDState(positions=pos, velocities=v, forces=f, energy=e, masses=masses)


def _ours_path(integ, ff, st, args):
    """The step ``md_backend: auto`` runs for a long run here: compile on a CPU."""
    from mdsim.md.compiled import FastStepper
    if args.no_compile:
        return _loop(integ, ff), "eager"
    stepper = FastStepper(integ, ff, st, "compile", compile_backend=args.compile_backend, block_steps=1)
    return _fast(stepper), stepper


def processes_time(n_proc, R, steps, args, frames, z):
    """Seconds per step of ``n_proc`` concurrent single-thread processes over R/n_proc replicas
    each (the slowest process's time: they run in lockstep in a sharded StABlE epoch)."""
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    queue, barrier = ctx.Queue(), ctx.Barrier(n_proc)
    procs = [ctx.Process(target=_proc_worker, args=(r, n_proc, R, steps, args, frames, z, queue, barrier))
             for r in range(n_proc)]
    for p in procs:
        p.start()
    times = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return max(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA,
                   help="MD17-format npz with aspirin frames (z, R), e.g. the GFN2-xTB trajectory "
                        f"(default {DATA}; a synthetic molecule without it)")
    p.add_argument("--replicas", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--processes", type=int, default=0,
                   help="also time ours in this many single-thread processes over R/P replicas each")
    p.add_argument("--skin", type=float, default=0.3, help="Verlet-list skin of ours (Å)")
    p.add_argument("--table-spacing", type=float, default=0.005,
                   help="grid spacing (Å) of ours' tabulated filters (radial_table_spacing); negative: the network")
    p.add_argument("--checkpoint", default=None, help="optional SchNet checkpoint (ours or the original's)")
    p.add_argument("--skip-eager-above", type=int, default=1000, help="skip the eager paths above this R")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the compile column (inductor, aot_eager, eager)")
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
    z, frames = aspirin_frames(max(args.replicas), args.data)
    ours_model, eager_model = build_models(args.checkpoint)
    ours_model.to(device)
    eager_model.to(device)
    z_t = torch.as_tensor(z)
    N = len(z)
    integ = make_integrator("NoseHoover", 0.5, 500.0, {"ttime": 20})
    ff_all = ModelForceField(ours_model, z_t)
    ff_ref = ModelForceField(eager_model, z_t, dtype=torch.float32)

    # same forces from all paths (sanity)
    x = torch.as_tensor(frames[:2], dtype=torch.float32, device=device)
    e1, f1 = ff_all(x)
    e2, f2 = ff_ref(x)
    e3, f3 = ModelForceField(ours_model, z_t, neighbor_skin=args.skin, radial_table_spacing=_table(args))(x)
    err = max((f1 - f2).abs().max().item(), (f3 - f2).abs().max().item())
    os_ = __import__("os")
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else f", threads {torch.get_num_threads()}")
          + f", atoms {N}, {'pretrained' if args.checkpoint else 'random'} SchNet, Nosé–Hoover, "
          f"compile backend {args.compile_backend}, skin {args.skin} Å, filter table {_table(args)} Å; max |F_ours − F_eager-orig| = "
          f"{err:.2e} eV/Å", flush=True)
    load_before = os_.getloadavg() if hasattr(os_, "getloadavg") else None
    if load_before:
        print("load average before: %.2f %.2f %.2f" % load_before, flush=True)

    cols = ["eager-orig", "ours-allpairs", "ours-nl", "ours-eager"] + ([] if args.no_compile else ["ours-compile"]) \
        + (["ours-cuda_graph"] if cuda else []) + ([f"ours-{args.processes}proc"] if args.processes else [])
    rows = []
    for R in args.replicas:
        idx = np.arange(R)
        paths, notes = {}, []
        if R <= args.skip_eager_above:
            paths["eager-orig"] = (_loop(integ, ff_ref), _state(ff_ref, frames, z, idx, device))
            paths["ours-allpairs"] = (_loop(integ, ff_all), _state(ff_all, frames, z, idx, device))
            ff_nl = ModelForceField(ours_model, z_t, neighbor_skin=args.skin)
            paths["ours-nl"] = (_loop(integ, ff_nl), _state(ff_nl, frames, z, idx, device))
            ff_tb = ModelForceField(ours_model, z_t, neighbor_skin=args.skin, radial_table_spacing=_table(args))
            paths["ours-eager"] = (_loop(integ, ff_tb), _state(ff_tb, frames, z, idx, device))
        if not args.no_compile:
            ff_c = ModelForceField(ours_model, z_t, neighbor_skin=args.skin, radial_table_spacing=_table(args))
            st = _state(ff_c, frames, z, idx, device)
            stepper = FastStepper(integ, ff_c, st, "compile", compile_backend=args.compile_backend,
                                  block_steps=block)
            t0 = time.perf_counter()
            out = stepper.run(st, 1)[0]
            if cuda:
                torch.cuda.synchronize()
            notes.append(f"compile {time.perf_counter() - t0:.1f} s")
            ref = integ.step(st, ff_all)
            notes.append(f"|ΔF| compile vs all-pairs eager after 1 step {(out.forces - ref.forces).abs().max().item():.1e} eV/Å")
            if stepper.backend == "compile":
                paths["ours-compile"] = (_fast(stepper), st)
        if cuda:
            st = _state(ff_all, frames, z, idx, device)
            gstep = FastStepper(integ, ff_all, st, "cuda_graph", block_steps=block)
            t0 = time.perf_counter()
            out = gstep.run(st, block)[0]
            torch.cuda.synchronize()
            notes.append(f"capture {time.perf_counter() - t0:.1f} s")
            paths["ours-cuda_graph"] = (_fast(gstep), st)
        out = time_interleaved(paths, args.steps, block=block, device=device)
        if args.processes and not cuda and R >= args.processes:
            out[f"ours-{args.processes}proc"] = processes_time(args.processes, R, args.steps, args, frames, z)
        rows.append((R, out))
        print(f"R={R:4d}  " + "  ".join(f"{k} {1e3 * t:8.2f} ms" for k, t in out.items())
              + ("   [" + "; ".join(notes) + "]" if notes else ""), flush=True)

    from mdsim.md.rollout import resolve_auto_backend
    probe = _state(ff_all, frames, z, np.arange(max(args.replicas)), device)
    auto = resolve_auto_backend(probe, ff_all, None)[0]  # what md_backend auto runs here (long run)
    ours_col = {"cuda_graph": "ours-cuda_graph", "compile": "ours-compile"}.get(auto, "ours-eager")
    if ours_col not in cols:
        ours_col = "ours-eager"
    print("columns: eager-orig = the original's loop; allpairs = ours, all-pairs graph, network filters; "
          "nl = + Verlet list; eager = + tabulated filters (default); compile/proc = that step compiled")
    print(f"\nms/step (atom-steps/s); speed-up = t(eager-orig)/t(column); ours = {ours_col} "
          f"(what md_backend auto runs for a long run with {torch.get_num_threads()} threads), {device}:")
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
    print(f"ours ({ours_col}) / eager-orig (atom-steps/s ratio): " + ", ".join(
        f"R={R}: {out['eager-orig'] / out[ours_col]:.2f}x" for R, out in rows
        if out.get("eager-orig") and out.get(ours_col)))
    if args.processes:
        pc = f"ours-{args.processes}proc"
        print(f"{pc} / eager-orig (atom-steps/s ratio): " + ", ".join(
            f"R={R}: {out['eager-orig'] / out[pc]:.2f}x" for R, out in rows if out.get("eager-orig") and out.get(pc)))
    first = rows[0]
    print("throughput relative to R=%d (atom-steps/s ratio):" % first[0])
    for R, out in rows:
        print(f"  R={R:4d}  " + "  ".join(f"{k} {R / first[0] * first[1][k] / v:6.1f}x"
                                        for k, v in out.items() if k in first[1]))
    if load_before:
        print("load average after: %.2f %.2f %.2f" % os_.getloadavg())


if __name__ == "__main__":
    main()
