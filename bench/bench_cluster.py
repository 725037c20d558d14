"""`famsearch index` on one process against `famsearch index --ray` on a local Ray cluster, side by side.

    nice .venv/bin/python bench/bench_cluster.py [--n 1000] [--work /tmp/famsearch-cluster] [--worker-cpus 2]

1. Writes --n JPEGs (bench/bench_query.py's gallery: clipart and real-photo crops, longer side 512).
2. Indexes them with the defaults (Lite0, focus pooling, map cache on) in one process, then on a Ray cluster this
   script starts on this machine: a head that runs nothing (`ray start --head --num-cpus 0`) and two worker nodes
   (`ray start --address ... --num-cpus W`), each a `--block`ed process it stops by its pid at the end.
3. Prints, for both: images/s, wall time, the driver's peak RSS (VmHWM) and CPU seconds per image (what the one
   committing process spends, which bounds how many machines it can keep fed); and whether the results are
   identical: same rows and statuses, z within float tolerance, the same top-10 for 50 gallery photos.
4. What one more machine buys: the cluster's images/s per worker node, and the driver's ceiling.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_query import make_gallery  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status(pid: int) -> tuple[int, float]:
    """(VmHWM in KiB, user + system CPU seconds) of a running process."""
    with open(f"/proc/{pid}/status") as handle:
        hwm = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return hwm, (int(fields[11]) + int(fields[12])) / ticks


def index(gallery: Path, home: Path, *extra: str) -> dict:
    """Run `famsearch index` as its own process; its summary, wall time, peak RSS and CPU seconds (the driver's
    own, not its children's)."""
    command = [sys.executable, "-m", "indexer.cli", "index", str(gallery), "--home", str(home), "--json"]
    command += ["--no-progress", *extra]
    start = time.perf_counter()
    log = open(home.parent / f"{home.name}.log", "w")  # noqa: SIM115 (read back below)
    process = subprocess.Popen([*command, "-v"], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
    hwm, cpu = 0, 0.0
    while process.poll() is None:
        try:
            hwm, cpu = proc_status(process.pid)
        except (OSError, StopIteration):  # exiting
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - start
    out = process.stdout.read() if process.stdout else ""
    if process.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(command)} exited {process.returncode}")
    log.close()
    summary = json.loads(out.strip().splitlines()[-1])
    steady = [line for line in (home.parent / f"{home.name}.log").read_text().splitlines() if "ray: joined" in line]
    if steady:  # the driver's own account: start-up, then the steady rate (indexer/cluster.py)
        summary["ray_log"] = steady[-1].split("ray: ", 1)[1]
        summary["steady_images_per_s"] = float(steady[-1].rsplit("(", 1)[1].split()[0])
    return {
        **summary,
        "wall_s": round(wall, 1),
        "driver_peak_rss_mib": round(hwm / 1024),
        "driver_cpu_s": round(cpu, 1),
    }


def use_token(work: Path) -> None:
    """Ray's token authentication with a token of this run (every node, the drivers and this process read the
    environment), so nothing is read from or written to ~/.ray."""
    token = work / "ray-auth-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))


def start_cluster(work: Path, worker_cpus: int) -> tuple[str, list[subprocess.Popen]]:
    """A head that runs nothing and two worker nodes, each a `ray start --block` process (stopped by its pid).
    Stops whatever it started when a node does not come up."""
    nodes: list[subprocess.Popen] = []
    try:
        return _start_nodes(work, worker_cpus, nodes), nodes
    except BaseException:
        stop_cluster(nodes)
        raise


def _start_nodes(work: Path, worker_cpus: int, nodes: list[subprocess.Popen]) -> str:
    ray = str(Path(sys.executable).with_name("ray"))
    port = free_port()
    common = ["--block", "--disable-usage-stats", "--object-store-memory", str(400 * 2**20)]
    log = open(work / "ray-nodes.log", "w")  # noqa: SIM115 (closed with the processes)
    head = [ray, "start", "--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard", "false"]
    env = {**os.environ, "RAY_TMPDIR": str(work / "ray")}
    nodes.append(subprocess.Popen(head + common + ["--temp-dir", str(work / "ray")], stdout=log, stderr=log, env=env))
    address = f"127.0.0.1:{port}"
    import ray as ray_module

    for _ in range(60):  # the head's GCS must be up before this process and the workers join
        try:
            ray_module.init(address=address, log_to_driver=False)
            break
        except ConnectionError:
            time.sleep(2)
    try:
        for number in range(2):
            _start_worker(ray, address, worker_cpus, number + 1, common, log, env, nodes, ray_module)
        resources, alive = ray_module.cluster_resources(), sum(node["Alive"] for node in ray_module.nodes())
    finally:
        ray_module.shutdown()
    print(f"cluster at {address}: {alive} nodes alive, resources {json.dumps(resources)}")
    return address


def _start_worker(ray, address, worker_cpus, number, common, log, env, nodes, ray_module) -> None:
    """One worker node, started again (up to 3 times) when it dies first: on a loaded machine a raylet can miss
    `ray start`'s fixed 30 s start-up deadline."""
    for _ in range(3):
        worker = subprocess.Popen(
            [ray, "start", "--address", address, "--num-cpus", str(worker_cpus), *common],
            stdout=log,
            stderr=log,
            env=env,
        )
        nodes.append(worker)
        while worker.poll() is None:
            if ray_module.cluster_resources().get("CPU", 0) >= number * worker_cpus:
                return
            time.sleep(1)
    raise SystemExit(f"worker node {number} did not start (see the log of the nodes)")


def stop_cluster(nodes: list[subprocess.Popen]) -> None:
    for node in reversed(nodes):  # workers first, the head last; each tears down its own raylet and workers
        node.terminate()
    for node in reversed(nodes):
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            node.kill()


def compare(home_a: Path, home_b: Path) -> dict:
    """Rows, statuses, z and top-10 of the two homes."""
    from retrieval.config import Settings
    from retrieval.engine import QueryEngine
    from retrieval.store import bytes_to_embedding, open_store

    def rows(home: Path) -> dict[str, tuple[str, np.ndarray | None]]:
        from sqlalchemy import select

        from retrieval.schema import Image

        store = open_store(Settings(home=home).database_url)
        try:
            with store.session() as session:
                found = session.execute(select(Image.path, Image.status, Image.embedding)).all()
        finally:
            store.close()
        return {p: (s, None if e is None else bytes_to_embedding(e)) for p, s, e in found}

    a, b = rows(home_a), rows(home_b)
    same_rows = sorted(a) == sorted(b) and all(a[p][0] == b[p][0] for p in a)
    diffs = [float(np.abs(a[p][1] - b[p][1]).max()) for p in a if a[p][1] is not None and p in b]
    scale = max(float(np.abs(e).max()) for _, e in a.values() if e is not None)
    queries = sorted(a)[:: max(1, len(a) // 50)][:50]
    tops = []
    for home in (home_a, home_b):
        engine = QueryEngine(Settings(home=home), device="cpu")
        try:
            tops.append([[m.path for m in engine.query_path(Path(q), 10, "none").matches] for q in queries])
        finally:
            engine.close()
    return {
        "same_rows_and_statuses": same_rows,
        "max_abs_z_difference": max(diffs),
        "relative_to_max_z": max(diffs) / scale,
        "same_top10_for_queries": f"{sum(x == y for x, y in zip(*tops))}/{len(queries)}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--work", type=Path, default=Path("/tmp/famsearch-cluster"))
    parser.add_argument("--worker-cpus", type=int, default=2, help="logical CPUs each worker node offers Ray")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    gallery = args.work / "gallery"
    make_gallery(gallery, args.n)
    print(f"$ {' '.join(sys.argv)}  ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs)")
    print(f"{args.n} JPEGs (longer side 512), defaults (efficientnet_lite0, focus pooling, map cache on)")
    print(f"load average at the start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    homes = {"single": args.work / "home-single", "ray": args.work / "home-ray"}
    for home in homes.values():
        subprocess.run(["rm", "-rf", str(home)], check=True)
    use_token(args.work)
    results = {"single": index(gallery, homes["single"])}
    address, nodes = start_cluster(args.work, args.worker_cpus)
    try:
        results["ray"] = index(gallery, homes["ray"], "--ray", address)
    finally:
        stop_cluster(nodes)
    print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("| path | images/s | wall s | driver peak RSS MiB | driver CPU s/image | added | failed |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        label = "single process (--workers 2)" if name == "single" else "Ray: head + 2 worker nodes"
        per_image = r["driver_cpu_s"] / max(1, r["added"])
        print(f"| {label} | {r['images_per_s']:.1f} | {r['wall_s']} | {r['driver_peak_rss_mib']} | "
              f"{per_image * 1000:.1f} ms | {r['added']} | {r['failed']} |")  # fmt: skip
    print()
    print("the Ray driver's log:", results["ray"].get("ray_log", "(none)"))
    print("identical results:", json.dumps(compare(homes["single"], homes["ray"])))
    ray_rate = results["ray"].get("steady_images_per_s", results["ray"]["images_per_s"])
    driver_ceiling = max(1, results["ray"]["added"]) / max(results["ray"]["driver_cpu_s"], 1e-9)
    print(
        f"\nper worker node: {ray_rate / 2:.2f} images/s (the cluster's steady rate after its first batch / 2 nodes, on this "
        f"machine's 2 shared cores). One more machine of the same kind adds its own per-node rate; the "
        f"driver spends {results['ray']['driver_cpu_s']} CPU s on {results['ray']['added']} images (receive, "
        f"commit, map cache), so one driver core keeps up with ~{driver_ceiling:.0f} images/s, i.e. with "
        f"~{driver_ceiling / max(ray_rate / 2, 1e-9):.0f} nodes of this rate."
    )


if __name__ == "__main__":
    main()
