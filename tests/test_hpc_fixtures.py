"""Shared data for the hpc tests: small simulated scans reconstructed once per session.

Each test_hpc_* module wraps :func:`build_hpc_scans` in a fixture; the build is cached in this
module, so the scans are simulated and reconstructed once per test session.
"""

_CACHE: dict = {}
N_POSITIONS = 40
STEP_M = 100e-9
ITERATIONS = 20


def build_hpc_scans(tmp_path_factory) -> dict:
    """Two simulated training scans (different samples), their reconstructions and labels."""
    if "data" in _CACHE:
        return _CACHE["data"]
    root = tmp_path_factory.mktemp("hpc")
    import torch

    from ptychostream.hpc import make_labels, reconstruct
    from ptychostream.scanfile import write_scan
    from ptychostream.simulation import simulate_scan

    threads = torch.get_num_threads()
    out = {"scans": [], "recons": [], "labels": [], "iterations": ITERATIONS, "root": str(root)}
    for seed in (11, 12):
        scan = simulate_scan(n_positions=N_POSITIONS, step_m=STEP_M, seed=seed)
        path = write_scan(root / f"scan{seed}.h5", scan)
        # 1 thread: far faster than 2 on a shared, loaded 2-core machine
        recon = reconstruct(str(path), str(root / f"recon{seed}.h5"), iterations=ITERATIONS, device="cpu",
                            threads=1)
        labels = make_labels(str(path), recon, str(root / f"labels{seed}.h5"))
        out["scans"].append(str(path))
        out["recons"].append(recon)
        out["labels"].append(labels)
    torch.set_num_threads(threads)  # reconstruct(threads=1) set it process-wide
    _CACHE["data"] = out
    return out
