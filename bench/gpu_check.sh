#!/usr/bin/env bash
# GPU checks (docs/DESIGN.md §8, §13): GPU FAISS, the encoder on CUDA, index --ray on GPU actors. Run on a machine
# with a GPU (and the cluster extra: pip install '.[cluster]'):
#     bash bench/gpu_check.sh [--quick]      (from the repository root; writes bench/results/gpu.txt)
# --quick skips the 10k-gallery query benchmark (which indexes 10,000 images on first use).
# Exits 3 when no GPU is visible, so a CPU-only run says so instead of "passing".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=bench/results/gpu.txt
mkdir -p bench/results
{
echo "# bench/gpu_check.sh  $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" - <<'PY'
import sys
import faiss, torch
print(f"faiss {faiss.__version__}: {faiss.get_num_gpus()} GPU(s); torch {torch.__version__}: cuda {torch.cuda.is_available()}")
if faiss.get_num_gpus() == 0 or not torch.cuda.is_available():
    print("NO GPU VISIBLE: nothing checked")
    sys.exit(3)
PY
echo; echo "## pytest -m gpu"
"$PY" -m pytest -q -m gpu tests
echo; echo "## FAISS: CPU vs GPU, same index"
"$PY" - <<'PY'
import time
import numpy as np
from retrieval import search as S
rng = np.random.default_rng(0)
centres = rng.standard_normal((512, 1280)).astype(np.float32)
def draw(n, seed):
    r = np.random.default_rng(seed)
    return S.normalise_rows(centres[r.integers(0, 512, n)] + 0.7 * r.standard_normal((n, 1280), np.float32))
embs, queries = draw(200_000, 1), draw(200, 2)
ids = np.arange(len(embs), dtype=np.int64) * 5 + 11
truth = ids[S.exact_top_k(embs, queries, 10)]
for kind in ("flat", "ivf", "ivf-sq8"):
    cpu, report = S.build_index_with_report(embs, ids, kind)
    gpu = S.to_gpu_if_available(cpu)
    rows = {}
    for name, index in (("cpu", cpu), ("gpu", gpu)):
        S.search(index, queries[:5], 10)
        start = time.perf_counter()
        found = [S.search(index, q[None], 10)[0] for q in queries]
        ms = (time.perf_counter() - start) * 1000 / len(queries)
        found_ids = np.array([[i for i, _ in row] for row in found])
        rows[name] = found_ids
        print(f"{kind:<8} {name}: {type(index).__name__:<28} {ms:7.3f} ms/query  recall@10 {S.recall_at_k(found_ids, truth):.3f}"
              f"  (tuned {report.search_param})")
    same = (rows["cpu"] == rows["gpu"]).mean()
    print(f"{kind:<8} same top-10 ids on CPU and GPU: {same:.4f}" + ("  <- must be 1.0 for flat" if kind == "flat" else ""))
    if kind == "flat":
        assert same == 1.0, "flat on the GPU must return the CPU's top-k"
PY
echo; echo "## encoder on CUDA vs CPU (efficientnet_lite0, 224 px)"
"$PY" - <<'PY'
import time
import torch
from retrieval.encoder import load_encoder
from retrieval import fam
cpu, gpu = load_encoder(device="cpu"), load_encoder(device="cuda")
x = torch.randn(32, 3, 224, 224, generator=torch.Generator().manual_seed(0))
a_cpu = cpu.forward_features(x)
a_gpu = gpu.forward_features(x).cpu()
print("max |A_gpu - A_cpu| / max|A|:", float((a_gpu - a_cpu).abs().max() / a_cpu.abs().max()))
for batch in (1, 32):
    xb = x[:batch]
    gpu.forward_features(xb); torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        gpu.forward_features(xb)
    torch.cuda.synchronize()
    print(f"GPU forward batch {batch}: {(time.perf_counter() - start) / 20 * 1000:.2f} ms")
feature_maps = a_gpu.cuda()
embs = feature_maps.mean(dim=(-2, -1))
for name in fam.EXPLAINERS:
    fam.explain(name, feature_maps, embs, embs[:, None].roll(1, 0)); torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        fam.explain(name, feature_maps, embs, embs[:, None].roll(1, 0))
    torch.cuda.synchronize()
    print(f"{name:<10} on GPU: {(time.perf_counter() - start) / 20 / 32 * 1000:.4f} ms/map (batch of 32)")
PY
echo; echo "## index --ray: GPU actors (num_gpus=1 each) against the single-process path on CUDA, 300 photos"
"$PY" - <<'PY'
import json, subprocess, sys, tempfile, time
from pathlib import Path
import ray
from bench.bench_cluster import compare, index
from bench.bench_query import make_gallery
work = Path(tempfile.mkdtemp(prefix="famsearch-gpu-ray-"))
make_gallery(work / "gallery", 300)
single = index(work / "gallery", work / "home-single", "--device", "cuda")
on_ray = index(work / "gallery", work / "home-ray", "--ray")  # a local Ray instance: it sees this machine's GPUs
ray.init(log_to_driver=False)
print("a local Ray instance offers", json.dumps(ray.cluster_resources()))
ray.shutdown()
for name, r in (("single process, cuda", single), ("Ray, GPU actors", on_ray)):
    print(f"{name:<22} {r['images_per_s']:7.1f} images/s  wall {r['wall_s']} s  driver peak RSS {r['driver_peak_rss_mib']} MiB")
result = compare(work / "home-single", work / "home-ray")
print("identical results:", json.dumps(result))
assert result["same_rows_and_statuses"] and result["relative_to_max_z"] < 1e-3, "GPU actors must give the CUDA path's z"
PY
if [[ "${1:-}" != "--quick" ]]; then
  echo; echo "## bench_query on CUDA (10k gallery, 12 MP query)"
  "$PY" bench/bench_query.py --device cuda --work /tmp/famsearch-bench-gpu
fi
} 2>&1 | tee "$OUT"
