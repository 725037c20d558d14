"""The lean (numpy) query maths side by side with the torch reference, one thread each, in one process.

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python bench/bench_lean_maths.py \
        [--photos /work/shared/data/clipart-composites/images] [--repeats 30]

A top-10 query re-ranked from the top 50, as `QueryEngine` runs it on the defaults, on 51 real photos through the
bundled backbone (224 px: whole maps (1280, 7, 7), guides (112, 14, 14)):
(a) maps: 20 fam-fine maps, 10 on the query side (one photo's inputs repeated: its guide weighed once) and 10 on
    the match side (retrieval.fam.fine_fam vs retrieval.lean.fine.fine_fam);
(b) parts: the parts of the query and of 50 photos, match_strengths, part_share, the re-ranked order and top_pairs
    (12 pairs) of one query against 50 photos (retrieval.rerank vs retrieval.lean.parts).
The two run alternately, round after round, so load on this shared machine falls on both alike; prints medians in
ms and numpy / torch ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")  # before numpy loads its BLAS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from retrieval import fam, rerank  # noqa: E402
from retrieval.lean import fine as lean_fine  # noqa: E402
from retrieval.lean import parts as lean_parts  # noqa: E402

TOP, RERANK, PAIRS = 10, 50, 12


def encode(folder: Path, count: int):
    """The first ``count`` photos of ``folder`` (sorted) through the bundled backbone: FineInputs and z."""
    from PIL import Image

    from retrieval.encoder import load_encoder

    paths = sorted(folder.glob("*.jpg"))[:count]
    encoded = load_encoder().encode_full([Image.open(path).convert("RGB") for path in paths])
    return encoded.fine(), encoded.pooled


def torch_maps(fine, embs) -> Callable[[], object]:
    query, gallery = fine[0], fine[1 : 1 + TOP]
    query_emb, gallery_embs = embs[0], embs[1 : 1 + TOP]

    def run():
        fam.fine_fam(query.repeated(TOP), query_emb.expand(TOP, -1), gallery_embs[:, None])
        return fam.fine_fam(gallery, gallery_embs, query_emb.expand(TOP, -1)[:, None])

    return run


def numpy_maps(fine, embs) -> Callable[[], object]:
    query, gallery = fine[0], fine[1 : 1 + TOP]
    query_emb, gallery_embs = embs[0], embs[1 : 1 + TOP]

    def run():
        lean_fine.fine_fam(
            query.repeated(TOP), np.broadcast_to(query_emb, (TOP, len(query_emb))), gallery_embs[:, None]
        )
        return lean_fine.fine_fam(gallery, gallery_embs, np.broadcast_to(query_emb, (TOP, 1, len(query_emb))))

    return run


def parts_run(module, fine, scores) -> Callable[[], object]:
    """One query against RERANK photos with ``module`` (retrieval.rerank or retrieval.lean.parts)."""
    query_fine, gallery_fine = fine[0:1], fine[1 : 1 + RERANK]
    order_of = rerank.rerank if module is rerank else lean_parts.rerank_order

    def run():
        query, gallery = module.parts(query_fine)[0], module.parts(gallery_fine)
        matches, strength = module.match_strengths(query, gallery)
        part = module.part_share(query, strength)
        order_of(scores, part, 4.0)
        return module.top_pairs(matches, strength, query.grid, gallery.grid, PAIRS)

    return run


def timed(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, default=Path("/work/shared/data/clipart-composites/images"))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    started, load = time.strftime("%Y-%m-%d %H:%M:%S %Z"), os.getloadavg()
    torch.set_num_threads(1)
    fine, embs = encode(args.photos, 1 + RERANK)
    lean = lean_fine.Fine(*(t.numpy() for t in (fine.whole_map, fine.emphasis, fine.fine_emphasis, fine.guide)))
    scores = torch.nn.functional.normalize(embs[1:], dim=-1) @ torch.nn.functional.normalize(embs[0], dim=-1)
    runs = {
        "(a) 20 fam-fine maps": (torch_maps(fine, embs), numpy_maps(lean, embs.numpy())),
        f"(b) parts, 1 vs {RERANK}": (parts_run(rerank, fine, scores), parts_run(lean_parts, lean, scores.numpy())),
    }
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in runs}
    for pair in runs.values():  # warm-up: caches, first passes
        pair[0](), pair[1]()
    for _ in range(args.repeats):
        for name, (torch_run, numpy_run) in runs.items():
            times[name][0].append(timed(torch_run))
            times[name][1].append(timed(numpy_run))
    print(
        "$ OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/python bench/bench_lean_maths.py "
        + " ".join(sys.argv[1:])
    )
    print(f"date: {started}; load average at the start {' '.join(f'{x:.2f}' for x in load)}")
    print(f"torch {torch.__version__} threads {torch.get_num_threads()}; numpy {np.__version__}; {args.repeats} rounds")
    print(f"{'workload':<24} {'torch p50 ms':>13} {'numpy p50 ms':>13} {'numpy / torch':>14}")
    for name, (torch_times, numpy_times) in times.items():
        t, n = statistics.median(torch_times), statistics.median(numpy_times)
        print(f"{name:<24} {t:13.2f} {n:13.2f} {n / t:14.2f}")
    print(f"load average at the end {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores shared with other jobs)")


if __name__ == "__main__":
    main()
