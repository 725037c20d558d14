"""Camera RAW: the embedded preview against LibRaw's fastest demosaic, side by side in one run.

Real photos (those of bench/real_photo_crops.py: mate-backgrounds and opencv-doc, Debian packages) become DNG
files with tests/dng.py: the sensor data is the photo in linear light as a 12-bit RGGB mosaic, the preview the
photo as a JPEG of `--preview-side` px (Sony's ARW previews are 1616 px, Nikon and Canon embed larger ones).
Each DNG is read both ways (`retrieval.images.decode_raw`), and the read is compared with the photo itself
(standing for the camera's own rendering, which is what the photographer saw and the preview shows) through the
default model: cosine of the two embeddings, and Recall@1 of the RAW reads as queries against the photos.
Synthetic files favour neither way's colour (the demosaic gets the exact camera matrix and white balance); a
real camera's preview is its own rendering, which a demosaic with LibRaw's defaults only approximates.

    .venv/bin/python bench/bench_raw.py [--photos 40] [--side 3000] > bench/results/raw.txt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.real_photo_crops import photos  # noqa: E402
from retrieval.encoder import load_encoder  # noqa: E402
from retrieval.images import decode_raw, load_image  # noqa: E402
from retrieval.modelspec import ModelSpec  # noqa: E402
from tests.dng import write_dng  # noqa: E402

METHODS = ("preview", "demosaic")


def camera_sized(path: Path, side: int):
    """The photo at `side` px on its long side, even width and height (a Bayer mosaic needs them)."""
    image = load_image(path)
    scale = side / max(image.size)
    width, height = (round(image.width * scale) // 2 * 2, round(image.height * scale) // 2 * 2)
    return image.resize((width, height))


def embed(encoder, images) -> torch.Tensor:
    batch = torch.stack([encoder.preprocess(image) for image in images])
    with torch.inference_mode():
        pooled = encoder.encode_batch(batch).pooled
    return torch.nn.functional.normalize(pooled, dim=1)  # (B, N)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=40)
    parser.add_argument("--side", type=int, default=3000, help="long side of the simulated sensor (px)")
    parser.add_argument("--preview-side", type=int, default=1616)
    args = parser.parse_args()
    torch.set_num_threads(1)
    encoder = load_encoder(ModelSpec(), "cpu")
    sources = photos()[: args.photos]
    references, reads = [], {m: [] for m in METHODS}
    seconds: dict[str, list[float]] = {m: [] for m in METHODS}
    sizes = []
    for path in sources:
        photo = camera_sized(path, args.side)
        dng = write_dng(photo, preview_side=args.preview_side)
        sizes.append(len(dng))
        references.append(photo)
        for method in METHODS:  # alternating, so machine noise hits both alike
            start = time.perf_counter()
            image, _ = decode_raw(dng, draft_size=encoder.input_size, method=method)
            seconds[method].append(time.perf_counter() - start)
            reads[method].append(image)
    gallery = torch.cat([embed(encoder, references[i : i + 8]) for i in range(0, len(references), 8)])
    megapixels = statistics.median(r.width * r.height for r in references) / 1e6
    print(
        f"{len(sources)} real photos as DNG, {megapixels:.1f} MP sensor (median), preview {args.preview_side} px, "
        f"file {statistics.median(sizes) / 2**20:.1f} MiB (median); model {encoder.identity['backbone']} "
        f"{encoder.identity['pooling']} {encoder.input_size} px, CPU, 1 thread"
    )
    print(f"{'read':<10} {'ms p50':>8} {'ms p90':>8} {'cos to photo (mean)':>20} {'(min)':>7} {'Recall@1':>9}")
    for method in METHODS:
        queries = torch.cat([embed(encoder, reads[method][i : i + 8]) for i in range(0, len(sources), 8)])
        cosines = (queries * gallery).sum(1)  # (Q,)
        recall = float((torch.argmax(queries @ gallery.T, dim=1) == torch.arange(len(sources))).float().mean())
        ms = np.array(seconds[method]) * 1000
        print(
            f"{method:<10} {np.median(ms):>8.1f} {np.percentile(ms, 90):>8.1f} {float(cosines.mean()):>20.4f} "
            f"{float(cosines.min()):>7.4f} {recall:>9.3f}"
        )
    ratio = np.median(np.array(seconds["demosaic"]) / np.array(seconds["preview"]))
    print(f"demosaic / preview time, per file (median): {ratio:.1f}x")


if __name__ == "__main__":
    main()
