"""Downloader + CLI against a local HTTP server (127.0.0.1, ephemeral port, Range support)."""
import hashlib
import io
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from mdsim.data.download import DownloadError, download_file, main
from mdsim.data.format import load_metadata, load_split
from mdsim.units import KCAL_MOL

REPO = Path(__file__).resolve().parents[1]


class _Server:
    def __init__(self):
        self.files = {}  # path → bytes
        self.cut = {}  # path → k: the first request for path sends only k body bytes, then drops
        self.ignore_range = False
        self.requests = []  # (path, Range header or None)


@pytest.fixture
def server():
    st = _Server()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            path = self.path.split("?")[0]
            rng = self.headers.get("Range")
            st.requests.append((path, rng))
            if path not in st.files:
                self.send_error(404)
                return
            data = st.files[path]
            start = 0
            if rng and not st.ignore_range:
                start = int(rng.split("=")[1].split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            k = st.cut.pop(path, None)
            self.wfile.write(body if k is None else body[:k])
            self.wfile.flush()
            self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    st.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield st
    httpd.shutdown()
    httpd.server_close()


def _md17_bytes(T=60, N=5, seed=0):
    rng = np.random.default_rng(seed)
    raw = dict(z=np.array([6, 6, 8, 1, 1]), R=rng.normal(size=(T, N, 3)) * 2,
               E=rng.normal(size=(T, 1)) * 5 - 1000.0, F=rng.normal(size=(T, N, 3)) * 30)
    buf = io.BytesIO()
    np.savez(buf, **raw)
    return buf.getvalue(), raw


def _water_bytes(T=30, n_mol=2, seed=1):
    rng = np.random.default_rng(seed)
    N = 3 * n_mol
    L = np.full((T, 3), 6.2) + rng.normal(size=(T, 1)) * 0.01
    unwrapped = rng.normal(size=(T, N, 3)) * 5
    d = dict(wrapped_coords=np.mod(unwrapped, L[:, None, :]), unwrapped_coords=unwrapped,
             velocities=rng.normal(size=(T, N, 3)) * 0.01, atom_types=np.array([8, 1, 1] * n_mol),
             lengths=L, angles=np.full((T, 3), 90.0), energy=rng.normal(size=T) - 500.0,
             forces=rng.normal(size=(T, N, 3)) * 20)
    buf = io.BytesIO()
    np.save(buf, d, allow_pickle=True)
    return buf.getvalue(), d


def test_md17_download_and_splits(server, tmp_path, capsys):
    blob, raw = _md17_bytes()
    server.files["/md17_aspirin.npz"] = blob
    rc = main(["--dataset", "md17", "--molecule", "aspirin", "--data-dir", str(tmp_path), "--url",
               server.url + "/md17_aspirin.npz", "--sizes", "40", "--both", "--no-progress"])
    assert rc == 0
    assert "only 60 frames" in capsys.readouterr().err  # test set shrunk (10,000 → 20) with a warning
    assert (tmp_path / "md17" / "md17_aspirin.npz").read_bytes() == blob
    for top in ("md17", "contiguous-md17"):
        base = tmp_path / top / "aspirin" / "40"
        parts = {s: load_split(base / s) for s in ("train", "val", "test")}
        assert [len(parts[s]) for s in ("train", "val", "test")] == [38, 2, 20]
        fids = np.concatenate([parts[s].fid for s in ("train", "val", "test")])
        assert len(np.unique(fids)) == 60
        for p in parts.values():
            np.testing.assert_allclose(p.E, raw["E"][p.fid, 0] * KCAL_MOL)
            np.testing.assert_allclose(p.F, raw["F"][p.fid] * KCAL_MOL)
            np.testing.assert_array_equal(p.R, raw["R"][p.fid])
            assert p.frame_spacing_fs == 0.5 and p.temperature_K == 500.0
        meta = load_metadata(base)
        assert meta["e_mean"] == pytest.approx(parts["train"].E.mean())
        assert meta["f_std"] == pytest.approx(parts["train"].F.std())
        npy = np.load(base / "metadata.npy", allow_pickle=True).item()
        assert npy["e_mean"] == pytest.approx(meta["e_mean"])
    cont = load_split(tmp_path / "contiguous-md17" / "aspirin" / "40" / "val")
    np.testing.assert_array_equal(cont.fid, [38, 39])


def test_water_download_and_conversion(server, tmp_path):
    blob, d = _water_bytes()
    server.files["/water.npy"] = blob
    rc = main(["--dataset", "water", "--data-dir", str(tmp_path), "--url", server.url + "/water.npy",
               "--sizes", "20", "--no-progress"])
    assert rc == 0
    base = tmp_path / "water" / "20"  # no molecule level
    tr = load_split(base / "train")
    te = load_split(base / "test")
    assert (len(tr), len(te)) == (19, 10)
    np.testing.assert_array_equal(tr.R, d["wrapped_coords"][tr.fid])
    np.testing.assert_array_equal(tr.R_unwrapped, d["unwrapped_coords"][tr.fid])
    np.testing.assert_allclose(tr.V, d["velocities"][tr.fid])  # assumed Å/fs
    np.testing.assert_allclose(tr.E, d["energy"][tr.fid] * KCAL_MOL)
    np.testing.assert_allclose(tr.F, d["forces"][tr.fid] * KCAL_MOL)
    np.testing.assert_allclose(np.diagonal(tr.cell, axis1=1, axis2=2), d["lengths"][tr.fid])
    assert tr.cell[:, 0, 1].max() == 0 and tr.pbc.tolist() == [True] * 3
    np.testing.assert_array_equal(tr.molecule_index, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(tr.z, [8, 1, 1, 8, 1, 1])
    assert tr.frame_spacing_fs == 10.0 and tr.temperature_K == 300.0


def test_interrupted_transfer_resumes_with_range(server, tmp_path):
    blob = bytes(np.random.default_rng(3).integers(0, 256, 300_000, dtype=np.uint8))
    server.files["/big.bin"] = blob
    server.cut["/big.bin"] = 70_001
    out = download_file(server.url + "/big.bin", tmp_path / "big.bin", progress=False, retry_wait=0,
                        chunk_size=8192, sha256=hashlib.sha256(blob).hexdigest())
    assert out.read_bytes() == blob
    assert not (tmp_path / "big.bin.part").exists()
    assert server.requests[0][1] is None
    assert server.requests[1][1] == "bytes=70001-"


def test_resume_leftover_part_and_server_without_range(server, tmp_path):
    blob = bytes(range(256)) * 400
    server.files["/f.bin"] = blob
    (tmp_path / "f.bin.part").write_bytes(blob[:5000])
    download_file(server.url + "/f.bin", tmp_path / "f.bin", progress=False, retry_wait=0)
    assert server.requests[-1][1] == "bytes=5000-"
    assert (tmp_path / "f.bin").read_bytes() == blob
    # a server that answers 200 to a Range request: start over, do not append
    server.ignore_range = True
    (tmp_path / "g.bin.part").write_bytes(b"garbage-prefix")
    download_file(server.url + "/f.bin", tmp_path / "g.bin", progress=False, retry_wait=0)
    assert (tmp_path / "g.bin").read_bytes() == blob
    # .part already complete: server answers 416, the file is just renamed
    server.ignore_range = False
    (tmp_path / "h.bin.part").write_bytes(blob)
    download_file(server.url + "/f.bin", tmp_path / "h.bin", progress=False, retry_wait=0)
    assert (tmp_path / "h.bin").read_bytes() == blob


def test_persistent_failure_keeps_part_and_errors(server, tmp_path):
    blob = b"x" * 50_000
    server.files["/f.bin"] = blob
    server.cut["/f.bin"] = 100
    with pytest.raises(DownloadError, match="failed after"):
        download_file(server.url + "/f.bin", tmp_path / "f.bin", progress=False, retry_wait=0, retries=0)
    assert not (tmp_path / "f.bin").exists()
    assert (tmp_path / "f.bin.part").stat().st_size == 100


def test_corrupt_file_clear_error_nothing_written(server, tmp_path, capsys):
    blob, _ = _md17_bytes()
    server.files["/md17_aspirin.npz"] = blob[: len(blob) // 2] + b"\0" * 100  # corrupt zip
    rc = main(["--dataset", "md17", "--data-dir", str(tmp_path), "--url", server.url + "/md17_aspirin.npz",
               "--sizes", "40", "--both", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert err[-1].startswith("error: cannot read raw file") and "md17_aspirin.npz" in err[-1]
    assert not (tmp_path / "md17" / "aspirin").exists()
    assert not (tmp_path / "contiguous-md17").exists()


def test_sha256_mismatch(server, tmp_path, capsys):
    blob, _ = _md17_bytes()
    server.files["/md17_aspirin.npz"] = blob
    rc = main(["--dataset", "md17", "--data-dir", str(tmp_path), "--url", server.url + "/md17_aspirin.npz",
               "--sha256", "0" * 64, "--sizes", "40", "--no-progress"])
    assert rc != 0
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not any((tmp_path / "md17").glob("md17_aspirin.npz*"))
    assert not (tmp_path / "md17" / "aspirin").exists()


def test_http_error_is_one_line(server, tmp_path, capsys):
    rc = main(["--dataset", "md17", "--data-dir", str(tmp_path), "--url", server.url + "/missing.npz",
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err[-1].startswith("error:") and "404" in err[-1]


def test_unknown_molecule_lists_valid_ones(tmp_path):
    r = subprocess.run([sys.executable, str(REPO / "download_stable_paper_data.py"), "--dataset", "md22",
                        "--molecule", "coffee", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
    assert r.returncode != 0
    line = r.stderr.strip().splitlines()[-1]
    assert "coffee" in line and "ac_Ala3_NHMe" in line and "stachyose" in line
    assert not any(tmp_path.iterdir())


def test_bad_options(tmp_path, capsys):
    assert main(["--molecule", "aspirin", "--data-dir", str(tmp_path)]) != 0  # 'all' + --molecule
    assert main(["--dataset", "md17", "--sizes", "7k", "--data-dir", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert "--molecule" in err and "'7k'" in err
    assert not any(tmp_path.iterdir())


def test_raw_md17_import_skips_download(tmp_path):
    blob, raw = _md17_bytes(T=80)
    f = tmp_path / "mine.npz"
    f.write_bytes(blob)
    rc = main(["--dataset", "md17", "--molecule", "my_mol", "--raw", str(f), "--data-dir",
               str(tmp_path / "d"), "--sizes", "40", "--contiguous", "--no-progress"])
    assert rc == 0
    te = load_split(tmp_path / "d" / "contiguous-md17" / "my_mol" / "40" / "test")
    np.testing.assert_array_equal(te.fid, np.arange(40, 80))
    assert not (tmp_path / "d" / "md17" / "my_mol").exists()  # only the contiguous layout asked for


def test_default_all_uses_source_tables(server, tmp_path, monkeypatch):
    """`--dataset all` = md17 aspirin + md22 ac_Ala3_NHMe + water with the default sizes,
    fetched from the (patched) source URLs; tiny files are shrunk with warnings."""
    from mdsim.data import sources
    md17, _ = _md17_bytes(T=60)
    md22, _ = _md17_bytes(T=100, seed=5)
    water, _ = _water_bytes(T=40)
    server.files.update({"/npz/md17_aspirin.npz": md17, "/npz/md22_Ac-Ala3-NHMe.npz": md22,
                         "/water.npy": water})
    monkeypatch.setattr(sources, "SGDML_BASE_URL", server.url + "/npz/")
    monkeypatch.setattr(sources, "WATER_URL", server.url + "/water.npy")
    assert main(["--data-dir", str(tmp_path), "--no-progress"]) == 0
    for sub in ("md17/aspirin/1k", "md17/aspirin/10k", "md22/ac_Ala3_NHMe/25percent",
                "md22/ac_Ala3_NHMe/100percent", "water/1k", "water/10k"):
        assert (tmp_path / sub / "test" / "data.npz").is_file(), sub
    assert (tmp_path / "contiguous-md17/aspirin/1k/val/data.npz").is_file()  # both layouts by default
    p = [len(load_split(tmp_path / "md22/ac_Ala3_NHMe/25percent" / s)) for s in ("train", "val", "test")]
    assert p == [17, 2, 6]  # int(100·0.7·0.25), int(100·0.1·0.25), 25 − 19
    assert load_split(tmp_path / "md22/ac_Ala3_NHMe/25percent/val").frame_spacing_fs == 1.0
