"""The torch-free query encoder (retrieval.lean.encode) against the torch path, one thread, on one 12 MP query.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_lean_encode.py [--query /tmp/s2-bq/query_12mp.jpg] [--repeats 15]
        [--out bench/results/lean-encode.txt]

Side by side in one run, interleaved --repeats times, medians:
- encode: the query decoded in draft mode (`decode_image(draft_size=224)`) then `Encoder.encode_full([image])` (the
  default encoder: focus pooling, ONNX Runtime) against `Preprocess.pixels` + `retrieval.lean.encode.encode` over an
  `OnnxSession` on the same cached export; both one thread; the decode is timed apart;
- cold start, each in a fresh interpreter: `import torch`; `import retrieval.lean.encode` then the session over the
  cached export (`spec_export_file`, which hashes the weights file, then `OnnxSession`); `python -c pass` as the floor;
- float16 -> float32 of 50 map-cache entries of Lite0's shape (1280 + 6 + 4*112, 7, 7): numpy's astype, torch's
  .float(), and numpy on the bits (exponent shift and a multiply by 2^112; exact for finite values).
Without --query, a 4000x3000 q92 JPEG is made from a desktop background in /tmp.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
EXPORTS = Path("/tmp/famsearch-bench-lean-exports")
COLD_START = {
    "python -c pass": "pass",
    "import torch": "import torch",
    "import retrieval.lean.encode": "import retrieval.lean.encode",
    "import onnxruntime": "import onnxruntime",
    "import lean.encode + export path (weights hashed)": (
        "from pathlib import Path; import retrieval.lean.encode; from retrieval.modelspec import ModelSpec; "
        f"from retrieval.onnxsession import spec_export_file; spec_export_file(Path({str(EXPORTS)!r}), ModelSpec())"
    ),
    "import lean.encode + export path + session": (
        "from pathlib import Path; import retrieval.lean.encode; from retrieval.modelspec import ModelSpec, read_layers; "
        "from retrieval.onnxsession import OnnxSession, spec_export_file; "
        f"OnnxSession(str(spec_export_file(Path({str(EXPORTS)!r}), ModelSpec())), read_layers('efficientnet_lite0'), 1)"
    ),
}


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count():d} CPUs)"


def median_ms(times: list[float]) -> str:
    return f"{1e3 * statistics.median(times):8.1f} ms (min {1e3 * min(times):.1f})"


def query_photo(path: Path | None) -> bytes:
    """The query's bytes: the given JPEG, or a 12 MP one made from a desktop background."""
    if path is not None and path.is_file():
        return path.read_bytes()
    from PIL import Image

    made = Path("/tmp/famsearch-bench-lean-query.jpg")
    if not made.is_file():
        source = next(Path("/usr/share/backgrounds").rglob("*.jpg"))
        Image.open(source).convert("RGB").resize((4000, 3000)).save(made, quality=92)
    return made.read_bytes()


def bench_encode(data: bytes, repeats: int) -> list[str]:
    """Torch-path encode_full vs the numpy encode, interleaved, one thread; and how equal their z are."""
    import torch

    from retrieval.encoder import load_encoder
    from retrieval.images import decode_image
    from retrieval.lean.encode import encode
    from retrieval.modelspec import ModelSpec, backbone_layers, read_layers
    from retrieval.onnxsession import OnnxSession, spec_export_file

    torch.set_num_threads(1)
    encoder = load_encoder(ModelSpec(), export_dir=EXPORTS)  # the default: focus pooling, onnx; exports once
    session = OnnxSession(str(spec_export_file(EXPORTS, ModelSpec())), read_layers(encoder.backbone_name), 1)
    layers = backbone_layers(encoder.backbone_name)
    image = decode_image(data, draft_size=encoder.input_size)[0]
    times: dict[str, list[float]] = {"decode (draft)": [], "torch path encode_full": [], "numpy path encode": []}
    for _ in range(repeats):
        start = time.perf_counter()
        decode_image(data, draft_size=encoder.input_size)
        times["decode (draft)"].append(time.perf_counter() - start)
        start = time.perf_counter()
        expected = encoder.encode_full([image])
        times["torch path encode_full"].append(time.perf_counter() - start)
        start = time.perf_counter()
        actual = encode(session, encoder.preprocess.pixels(image)[None], encoder.pooling, *layers)
        times["numpy path encode"].append(time.perf_counter() - start)
    lines = [f"{name:<28} {median_ms(values)}" for name, values in times.items()]
    ratio = statistics.median(times["torch path encode_full"]) / statistics.median(times["numpy path encode"])
    gap = float(np.abs(actual.pooled - expected.pooled.numpy()).max() / np.abs(expected.pooled.numpy()).max())
    same = bool((actual.regions == expected.regions.numpy()).all())
    lines += [
        f"torch / numpy encode: {ratio:.2f}x",
        f"query {image.size[0]}x{image.size[1]} after draft; max |dz| / max |z| = {gap:.1e}; same focus cells: {same}",
    ]
    return lines


def bench_cold_start(repeats: int) -> list[str]:
    """Each statement's wall time in a fresh interpreter (the interpreter's own start included), interleaved."""
    times: dict[str, list[float]] = {name: [] for name in COLD_START}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for _ in range(repeats):
        for name, code in COLD_START.items():
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
            times[name].append(time.perf_counter() - start)
    return [f"{name:<52} {median_ms(values)}" for name, values in times.items()]


def float16_bits(stored: np.ndarray) -> np.ndarray:
    """float16 -> float32 on the bits: magnitude shifted into float32's place, times 2^112 (exact, subnormals too;
    inf and nan come out finite: not for general use)."""
    bits = stored.view(np.uint16).astype(np.uint32)
    values = ((bits & 0x7FFF) << 13).view(np.float32) * np.float32(2.0**112)
    values.view(np.uint32)[...] |= (bits & 0x8000) << 16
    return values


def bench_float16(repeats: int) -> list[str]:
    """50 entries converted by each way, interleaved; the bit way checked equal to astype."""
    import torch

    rng = np.random.default_rng(0)
    shape = (1280 + 6 + 4 * 112, 7, 7)
    entries = [(rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 3, shape)).astype(np.float16) for _ in range(50)]
    ways = {
        "numpy astype(float32)": lambda e: e.astype(np.float32),
        "torch from_numpy().float()": lambda e: torch.from_numpy(e).float().numpy(),
        "numpy on the bits": float16_bits,
    }
    assert all(np.array_equal(float16_bits(e), e.astype(np.float32)) for e in entries[:5])
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, way in ways.items():
            start = time.perf_counter()
            for entry in entries:
                way(entry)
            times[name].append(time.perf_counter() - start)
    return [f"{name:<28} {median_ms(values)} for 50 entries {shape}" for name, values in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--query", type=Path, default=Path("/tmp/s2-bq/query_12mp.jpg"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/lean-encode.txt")
    args = parser.parse_args()
    header = [
        "$ OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv),
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {load_average()}",
        f"numpy {np.__version__}",
    ]
    data = query_photo(args.query)
    sections = [
        ["", "## one query, one thread"] + bench_encode(data, args.repeats),
        ["", "## cold start, fresh interpreter each"] + bench_cold_start(max(3, args.repeats // 3)),
        ["", "## float16 -> float32, map-cache entries"] + bench_float16(args.repeats),
    ]
    lines = header + [line for section in sections for line in section] + ["", f"end: {load_average()}"]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
