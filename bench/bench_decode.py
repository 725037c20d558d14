"""JPEG decoding for the index: Pillow's draft mode against simplejpeg's DCT scaling (libjpeg-turbo), on 12 MP JPEGs.

    .venv/bin/python bench/bench_decode.py [--photos 60] [--repeats 3] [--out bench/results/decode.txt]

Needs `.venv/bin/pip install simplejpeg` (for this benchmark only: famsearch does not depend on it).

Per input size, side by side and interleaved --repeats times, single process, bytes already in memory:
- naive: a full-resolution decode, then the resize to S x S (what a pipeline without DCT scaling pays);
- pil-draft: what famsearch does (`retrieval.images.decode_image` with draft_size=S: libjpeg DCT scaling to the
  smallest 1/2^k >= S, EXIF orientation, RGB), then `Preprocess` (resize to S x S, normalise);
- simplejpeg: the header and EXIF read by Pillow (for the size cap and the orientation famsearch needs anyway),
  `simplejpeg.decode_jpeg(min_width=S, min_height=S)` (libjpeg-turbo's M/8 scaling), then the same `Preprocess`.
Then how exact: both decodes of every photo through the default encoder (onnx runtime): the cosine of their z and
how many photos change focus cells.
The photos are bench_index.py's (mate-backgrounds at 4000x3000, q92), cached under /tmp/famsearch-bench-index.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_index import PHOTO_SIZE, load_average, make_photos  # noqa: E402

from retrieval.encoder import Preprocess, load_encoder  # noqa: E402
from retrieval.images import decode_image  # noqa: E402
from retrieval.modelspec import ModelSpec  # noqa: E402


def naive(data: bytes, size: int) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB").resize((size, size))


def pil_draft(data: bytes, size: int) -> Image.Image:
    return decode_image(data, draft_size=size)[0]


def simplejpeg_scaled(data: bytes, size: int) -> Image.Image:
    import simplejpeg

    header = Image.open(io.BytesIO(data))  # size cap and EXIF orientation, as decode_image reads them
    orientation = header.getexif().get(0x0112, 1)
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size, min_height=size)
    image = Image.fromarray(pixels)
    if orientation != 1:
        image.info["exif"] = header.info.get("exif", b"")
        image = ImageOps.exif_transpose(image)
    return image


DECODERS = {"naive": naive, "pil-draft": pil_draft, "simplejpeg": simplejpeg_scaled}


def ms_per_image(decode, blobs: list[bytes], preprocess: Preprocess, size: int) -> float:
    start = time.perf_counter()
    for data in blobs:
        preprocess(decode(data, size))
    return (time.perf_counter() - start) / len(blobs) * 1000


def exactness(blobs: list[bytes], size: int) -> str:
    """z of the pil-draft and simplejpeg decodes of each photo through the default encoder: cosine, focus cells."""
    encoder = load_encoder(ModelSpec(input_size=size))
    first = [pil_draft(data, size) for data in blobs]
    second = [simplejpeg_scaled(data, size) for data in blobs]
    decoded = ", ".join(sorted({f"{a.size[0]}x{a.size[1]} vs {b.size[0]}x{b.size[1]}" for a, b in zip(first, second)}))
    a, b = encoder.encode_full(first), encoder.encode_full(second)
    cosine = torch.nn.functional.cosine_similarity(a.pooled, b.pooled).numpy()
    moved = int(((a.regions > 0) != (b.regions > 0)).flatten(1).any(dim=1).sum())
    pixels = [
        np.abs(np.asarray(x, np.int16) - np.asarray(y.resize(x.size), np.int16)).mean() for x, y in zip(first, second)
    ]
    return (
        f"  {size} px: decoded {decoded}; z cosine pil-draft vs simplejpeg min {cosine.min():.5f}, median "
        f"{np.median(cosine):.5f}; focus cells differ on {moved} of {len(blobs)} photos; mean |pixel difference| "
        f"{np.mean(pixels):.2f} / 255"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 320])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    blobs = [path.read_bytes() for path in make_photos(args.photos)]
    lines = [
        f"{len(blobs)} JPEGs of {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} (q92), one process, bytes in memory; {load_average()}",
        "",
        "| size | decoder | ms/image (median) | runs | vs pil-draft (pairwise) |",
        "|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    for size in args.sizes:
        preprocess = Preprocess(size, (0.5,) * 3, (0.5,) * 3)
        runs: dict[str, list[float]] = {name: [] for name in DECODERS}
        for _ in range(args.repeats):
            for name, decode in DECODERS.items():
                runs[name].append(ms_per_image(decode, blobs, preprocess, size))
        for name, times in runs.items():
            ratio = ", ".join(f"{p / t:.2f}x" for p, t in zip(runs["pil-draft"], times))
            line = f"| {size} | {name} | {statistics.median(times):.1f} | {', '.join(f'{t:.1f}' for t in times)} | {ratio} |"
            print(line, flush=True)
            lines.append(line)
    lines += ["", "How exact (speed-up > 1: faster than pil-draft):"]
    for size in args.sizes:
        lines.append(exactness(blobs[:40], size))
        print(lines[-1], flush=True)
    lines.append(f"{load_average()} at the end")
    if args.out:
        args.out.write_text(
            f"$ .venv/bin/python bench/bench_decode.py {' '.join(sys.argv[1:])}\n" + "\n".join(lines) + "\n"
        )


if __name__ == "__main__":
    main()
