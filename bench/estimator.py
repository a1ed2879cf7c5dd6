"""Benchmark: one-backward Boltzmann surrogate vs the original per-sample-Jacobian (vmap) form.

Model: PyG SchNet of the paper's MD17 size (hidden 64, filters 64, 6 interactions, 25 Gaussians,
cutoff 5 Å) on an aspirin-size molecule (21 atoms, C9H8O4), dense all-pairs neighbour list with
distances clamped at the cutoff (the cosine cutoff then zeroes those edges).  Observable: the
smeared RDF (500 bins), loss Σ(⟨O⟩ − O*)².

Methods (each run in a fresh subprocess so peak memory is isolated):
  surrogate      BoltzmannEstimator, chunks of --minibatch, exact full-batch centring
  surrogate_1    the same in ONE chunk (a single backward over all N samples; activation memory
                 grows with N, so only with --full or --methods)
  jacobian_mb    original: per-sample Jacobian per minibatch of --minibatch (vmap), mean of blocks
  jacobian_full  per-sample Jacobian of all N samples, exact full-batch covariance (O(N·P) memory)

Peak memory: CUDA max_memory_allocated on GPU; on CPU the kernel's peak RSS (VmHWM, reset through
/proc/self/clear_refs after a small warm-up) minus the RSS at that point (includes allocator
fragmentation; glibc keeps freed memory, so this is the high-water mark of what the method needed).
Timings on a shared 2-core machine are noisy; compare within one run.  Usage:
  python bench/estimator.py                 # N = 200 1000 2560 (Jacobian forms up to N=1000), ~1-2 min
  python bench/estimator.py --accuracy 1000 # float32 error of both forms against float64
  python bench/estimator.py --full          # every method at every N (slow; ~8 GB for surrogate_1)
  python bench/estimator.py --n 200 --device cuda
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

N_ATOMS = 21
Z_ASPIRIN = [6] * 9 + [8] * 4 + [1] * 8
METHODS = ("surrogate", "surrogate_1", "jacobian_mb", "jacobian_full")


def build(device, dtype, n_samples, seed=0):
    import torch
    from torch_geometric.nn.models import SchNet

    from mdsim.observables import smeared_rdf

    torch.manual_seed(seed)
    cutoff = 5.0
    idx = torch.arange(N_ATOMS, device=device)
    I, J = torch.meshgrid(idx, idx, indexing="ij")
    m = I != J
    base_i, base_j = I[m], J[m]

    def graph(pos, batch):
        n_struct = pos.shape[0] // N_ATOMS
        off = (torch.arange(n_struct, device=pos.device) * N_ATOMS).repeat_interleave(base_i.numel())
        ei = torch.stack([base_i.repeat(n_struct) + off, base_j.repeat(n_struct) + off])
        d = (pos[ei[0]] - pos[ei[1]]).norm(dim=-1).clamp(max=cutoff)
        return ei, d

    model = SchNet(hidden_channels=64, num_filters=64, num_interactions=6, num_gaussians=25, cutoff=cutoff,
                   interaction_graph=graph).to(device=device, dtype=dtype)
    z = torch.tensor(Z_ASPIRIN, device=device)

    def energy_fn(x):  # (M, 21, 3) -> (M,)
        M = x.shape[0]
        batch = torch.arange(M, device=x.device).repeat_interleave(N_ATOMS)
        return model(z.repeat(M), x.reshape(-1, 3), batch).reshape(-1)

    # a compact random 21-atom geometry (~1.4 Å spacing) plus thermal-like noise per sample
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N_ATOMS, 3, generator=g, dtype=torch.float64) * 1.6
    x = (base + 0.1 * torch.randn(n_samples, N_ATOMS, 3, generator=g, dtype=torch.float64)).to(device, dtype)
    obs = smeared_rdf(x, 10.0, 0.02, 0.01)  # (N, 500)
    target = obs.mean(0) * 0.95
    return model, energy_fn, x, obs, target


def _status_kb(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def _reset_peak_rss():
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; returns the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass  # then the peak includes setup (reported delta is an upper bound)
    return _status_kb("VmRSS")


def _peak_rss():
    return _status_kb("VmHWM")


def _run_one(method, n, device, minibatch, threads, dtype_name, q):
    import torch

    torch.set_num_threads(threads)
    from boltzmann_estimator import BoltzmannEstimator, reference_jacobian_gradient, squared_error_loss

    dtype = getattr(torch, dtype_name)
    model, energy_fn, x, obs, target = build(device, dtype, n)
    loss = squared_error_loss(target)
    params = [p for p in model.parameters() if p.requires_grad]
    kT = 500 * 8.617333262e-5
    # warm-up (first-call overheads are not part of the measurement)
    # identical for every method so that allocator caches start in the same state
    BoltzmannEstimator(energy_fn, 2, kT).gradient(params, x[:4], obs[:4], loss)
    reference_jacobian_gradient(energy_fn, model, x[:4], obs[:4], loss, minibatch_size=2)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import ctypes
        import gc
        gc.collect()
        try:  # hand cached free heap memory back so the RSS starts at live memory
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        base = _reset_peak_rss()
    t0 = time.perf_counter()
    if method == "surrogate":
        grads, _ = BoltzmannEstimator(energy_fn, minibatch, kT, scale_by_kT=False).gradient(params, x, obs, loss)
    elif method == "surrogate_1":
        grads, _ = BoltzmannEstimator(energy_fn, n, kT, scale_by_kT=False).gradient(params, x, obs, loss)
    elif method == "jacobian_mb":
        grads = reference_jacobian_gradient(energy_fn, model, x, obs, loss, minibatch_size=minibatch)
    elif method == "jacobian_full":
        grads = reference_jacobian_gradient(energy_fn, model, x, obs, loss, minibatch_size=None, chunk_size=minibatch)
    else:
        raise ValueError(method)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    if device == "cuda":
        mem = torch.cuda.max_memory_allocated() - base
    else:
        mem = _peak_rss() - base
    flat = torch.cat([g.reshape(-1).double().cpu() for g in grads])
    torch.save(flat, os.path.join(os.environ.get("BENCH_TMP", "/tmp"), f"bench_grad_{method}_{n}.pt"))
    q.put({"method": method, "n": n, "time_s": dt, "peak_mem_mb": mem / 2 ** 20,
           "n_params": sum(p.numel() for p in params)})


def run_isolated(method, n, device, minibatch, threads, dtype_name="float32"):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run_one, args=(method, n, device, minibatch, threads, dtype_name, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return {"method": method, "n": n, "error": f"exit code {p.exitcode}"}
    return q.get()


def accuracy(n, device, minibatch, threads):
    """Relative error of the float32 surrogate / Jacobian forms against the float64 result."""
    import torch

    from boltzmann_estimator import BoltzmannEstimator, reference_jacobian_gradient, squared_error_loss

    torch.set_num_threads(threads)
    out = {}
    for dt in (torch.float64, torch.float32):
        model, energy_fn, x, obs, target = build(device, dt, n)
        loss = squared_error_loss(target)
        params = [p for p in model.parameters() if p.requires_grad]
        g, _ = BoltzmannEstimator(energy_fn, minibatch, 1.0, False).gradient(params, x, obs, loss)
        r = reference_jacobian_gradient(energy_fn, model, x, obs, loss, chunk_size=minibatch)
        out[dt] = [torch.cat([u.reshape(-1).double().cpu() for u in gs]) for gs in (g, r)]
    truth = out[torch.float64][0]
    rel = lambda a: float((a - truth).norm() / truth.norm())
    res = {"n": n, "f64_jacobian_vs_f64_surrogate": rel(out[torch.float64][1]),
           "f32_surrogate_vs_f64": rel(out[torch.float32][0]), "f32_jacobian_vs_f64": rel(out[torch.float32][1])}
    print(json.dumps(res))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[200, 1000, 2560], help="sample counts")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--minibatch", type=int, default=40, help="chunk / minibatch size (original: 40)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--jacobian-max-n", type=int, default=1000,
                    help="skip the Jacobian forms above this N unless --full")
    ap.add_argument("--full", action="store_true", help="run the Jacobian forms at every N")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                    help="default: surrogate jacobian_mb jacobian_full (+ surrogate_1 with --full)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--accuracy", type=int, default=0, metavar="N",
                    help="only compare the float32 surrogate and Jacobian forms against float64 at N samples")
    args = ap.parse_args(argv)

    import torch
    if args.accuracy:
        return accuracy(args.accuracy, args.device, args.minibatch, args.threads)
    if args.methods is None:
        args.methods = list(METHODS) if args.full else ["surrogate", "jacobian_mb", "jacobian_full"]
    tmp = os.environ.setdefault("BENCH_TMP", "/tmp")
    rows = []
    for n in args.n:
        for meth in args.methods:
            if meth.startswith("jacobian") and n > args.jacobian_max_n and not args.full:
                continue
            r = run_isolated(meth, n, args.device, args.minibatch, args.threads, args.dtype)
            rows.append(r)
            print(json.dumps(r), flush=True)
        # agreement of the exact full-batch forms
        f1, f2 = (os.path.join(tmp, f"bench_grad_{m}_{n}.pt") for m in ("surrogate", "jacobian_full"))
        if os.path.exists(f1) and os.path.exists(f2):
            a, b = torch.load(f1), torch.load(f2)
            print(f"N={n}: |g_surrogate − g_jacobian_full| / |g_jacobian_full| = "
                  f"{float((a - b).norm() / b.norm()):.2e} ({args.dtype})")
        fs = os.path.join(tmp, f"bench_grad_surrogate_1_{n}.pt")
        if os.path.exists(f1) and os.path.exists(fs):
            a, b = torch.load(f1), torch.load(fs)
            print(f"N={n}: chunked vs one-chunk surrogate rel. diff = {float((a - b).norm() / b.norm()):.2e}")
        for m in METHODS:
            p = os.path.join(tmp, f"bench_grad_{m}_{n}.pt")
            if os.path.exists(p):
                os.remove(p)

    print(f"\nDevice {args.device}, minibatch {args.minibatch}, {args.dtype}, SchNet 64/64/6/25, 21 atoms, "
          f"{args.threads} threads")
    print(f"{'N':>6} {'method':>14} {'time [s]':>10} {'peak mem [MB]':>14} {'time ratio':>11} {'mem ratio':>10}")
    for n in args.n:
        ref = next((r for r in rows if r["n"] == n and r["method"] == "surrogate" and "error" not in r), None)
        for r in rows:
            if r["n"] != n:
                continue
            if "error" in r:
                print(f"{n:>6} {r['method']:>14}  {r['error']}")
                continue
            tr = r["time_s"] / ref["time_s"] if ref else float("nan")
            mr = r["peak_mem_mb"] / ref["peak_mem_mb"] if ref and ref["peak_mem_mb"] > 1.0 else float("nan")
            print(f"{n:>6} {r['method']:>14} {r['time_s']:>10.2f} {r['peak_mem_mb']:>14.1f} {tr:>11.2f} {mr:>10.2f}")
    print("(ratios relative to 'surrogate' at the same N)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
