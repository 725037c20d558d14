"""`famsearch index --ray`: the decode + encode step of a sync as a Ray Data pipeline.

    files (the plan's items) -> read + hash + decode + preprocess (Ray tasks)
          -> encode (a pool of actors, each loading the encoder once; one GPU each where the cluster has GPUs)
          -> streamed back to this process, which commits each batch as the local path does (indexer/sync.py)

Only the decode + encode step moves: the scan, the plan, the commits, the map cache and the index rebuild stay
in the one process that owns the DB and the index, so the crash safety of docs/DESIGN.md §9 is unchanged (a
batch is durable once committed here; a killed driver leaves uncommitted files to the next run).

Rows cross the cluster as bytes (the preprocessed pixels, z and the packed maps in float16), so every column
has one Arrow type whatever a batch holds. The cluster runs this process's own code: the `retrieval` and
`indexer` packages travel in the tasks' runtime environment. The photos must be readable at the same path on
every node (a shared file system), as must a --weights or attn:FILE file.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from indexer.scan import FileStat
from indexer.sync import Decoded, EncodedBatch, IndexOptions, decode_file
from retrieval.encoder import Encoder, Preprocess, load_encoder
from retrieval.errors import UsageError
from retrieval.images import PhotoMeta
from retrieval.modelspec import ModelSpec

if TYPE_CHECKING:
    import ray.data

LOGGER = logging.getLogger(__name__)
LOCAL = "local"  # --ray without an address: a Ray instance on this machine, for this run
INSTALL_HINT = "--ray needs Ray: pip install 'famsearch[cluster]' (or: pip install 'ray[data]')"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # holds retrieval/ and indexer/, shipped to the cluster
DECODE_MEMORY = 512 * 2**20  # bytes a decode task reserves: a 150 MP photo (the --max-megapixels cap) as RGB
ROWS_PER_BLOCK = 32  # files per decode task: small enough that the encoders start early, big enough to amortise


def require_ray() -> None:
    """UsageError with the install command when Ray is missing (checked before anything is scanned)."""
    import importlib.util

    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.data") is None:
        raise UsageError(INSTALL_HINT)


def connect(address: str) -> bool:
    """Join the cluster at ``address`` ("auto", "HOST:PORT", "ray://HOST:PORT") or start a local instance
    (`LOCAL`). Returns whether this call started Ray (and so should shut it down)."""
    require_ray()
    import ray

    if ray.is_initialized():
        return False
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
            configure_logging=False,
            runtime_env={"py_modules": [str(PACKAGE_ROOT / name) for name in ("retrieval", "indexer")]},
        )
    except (ConnectionError, ValueError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"--ray {address}: cannot join a Ray cluster there ({first}); start one with `ray start --head`, "
            "or give --ray alone for a local instance"
        ) from None
    return True


def _quiet_ray_data() -> None:
    """Ray Data's console lines (its INFO and advice) off; its log file in the session folder keeps them."""
    for handler in logging.getLogger("ray.data").handlers:
        if not type(handler).__name__.endswith("FileHandler"):
            handler.setLevel(logging.ERROR)


def model_spec_of(encoder: Encoder, device: str) -> ModelSpec:
    """The spec an actor rebuilds the driver's encoder from: precision and runtime as the driver resolved them for
    CPU actors; a GPU actor resolves its runtime for its own device (`retrieval.encoder.resolve_runtime`)."""
    runtime = encoder.runtime if device == "cpu" else None
    return ModelSpec(
        encoder.backbone_name, encoder.weights, encoder.input_size, encoder.pooling, encoder.precision, runtime
    )


# ---------------------------------------------------------------------------------------------- rows
def item_row(row_id: int | None, stat: FileStat, known_hash: str | None) -> dict[str, Any]:
    return {"row_id": -1 if row_id is None else row_id, "path": stat.path, "size": stat.size,
            "mtime_ns": stat.mtime_ns, "known_hash": known_hash or ""}  # fmt: skip


def decode_row(row: dict[str, Any], preprocess: Preprocess, max_megapixels: float) -> dict[str, Any]:
    """A Ray task's unit: one planned file -> its `Decoded` fields as JSON and its pixels as float32 bytes."""
    row_id = None if row["row_id"] < 0 else int(row["row_id"])
    stat = FileStat(row["path"], int(row["size"]), int(row["mtime_ns"]))
    item = decode_file(row_id, stat, preprocess, max_megapixels, row["known_hash"] or None)
    pixels = b"" if item.pixels is None else item.pixels.astype(np.float32).tobytes()  # (3, S, S)
    return {"meta": json.dumps(_meta_of(item)), "pixels": pixels}


def _meta_of(item: Decoded) -> dict[str, Any]:
    return {
        "row_id": item.row_id,
        "stat": [item.stat.path, item.stat.size, item.stat.mtime_ns],
        "digest": item.digest,
        "size": list(item.size) if item.size else None,
        "error": item.error,
        "meta": None if item.meta is None else {**vars(item.meta), "taken_at": item.meta.taken_at.isoformat()},
        "vanished": item.vanished,
        "same_content": item.same_content,
    }


def _decoded_of(meta: dict[str, Any]) -> Decoded:
    path, size, mtime_ns = meta["stat"]
    image_size = tuple(meta["size"]) if meta["size"] else None
    photo = meta["meta"] and PhotoMeta(**{**meta["meta"], "taken_at": datetime.fromisoformat(meta["meta"]["taken_at"])})
    return Decoded(meta["row_id"], FileStat(path, size, mtime_ns), None, meta["digest"], image_size,
                   meta["error"], photo or None, meta["vanished"], meta["same_content"])  # fmt: skip


class EmbedActor:
    """One encoder per actor, loaded once; batches of decoded rows -> z (float32) and packed maps (float16)."""

    def __init__(self, spec: ModelSpec, device: str, with_maps: bool):
        self.encoder = load_encoder(spec, device)
        self.with_maps = with_maps

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        size = self.encoder.input_size
        good = [i for i, pixels in enumerate(batch["pixels"]) if len(pixels)]
        pooled: list[bytes] = [b""] * len(batch["pixels"])
        packed: list[bytes] = [b""] * len(batch["pixels"])
        shapes: dict[str, list[int]] = {}
        if good:
            pixels = np.stack([np.frombuffer(batch["pixels"][i], np.float32) for i in good])
            encoded = self.encoder.encode_batch(torch.from_numpy(pixels.reshape(-1, 3, size, size)))
            z = encoded.pooled.float().cpu().numpy()  # (G, N)
            maps = encoded.pack().cpu().numpy().astype(np.float16) if self.with_maps else None  # (G, N+6+4C, h, w)
            shapes = {"pooled": list(z.shape[1:]), "packed": [] if maps is None else list(maps.shape[1:])}
            for j, i in enumerate(good):
                pooled[i] = z[j].tobytes()
                packed[i] = b"" if maps is None else maps[j].tobytes()
        return {
            "meta": batch["meta"],
            "shapes": np.array([json.dumps(shapes)] * len(batch["meta"]), dtype=object),
            "pooled": np.array(pooled, dtype=object),
            "packed": np.array(packed, dtype=object),
        }


def batch_of(columns: dict[str, np.ndarray]) -> EncodedBatch:
    """Bytes from the actors -> the `EncodedBatch` the commit takes."""
    items = [_decoded_of(json.loads(meta)) for meta in columns["meta"]]
    pooled: dict[int, np.ndarray] = {}
    packed: list[np.ndarray] = []
    for i, (shapes, z, maps) in enumerate(zip(columns["shapes"], columns["pooled"], columns["packed"])):
        if len(z):
            shape = json.loads(shapes)
            pooled[i] = np.frombuffer(z, np.float32).reshape(shape["pooled"])
            if len(maps):
                packed.append(np.frombuffer(maps, np.float16).reshape(shape["packed"]))
    has_maps = bool(packed) and len(packed) == len(pooled)
    return EncodedBatch(items, pooled, np.stack(packed) if has_maps else None)


# ---------------------------------------------------------------------------------------------- pipeline
def actor_resources() -> tuple[int, str, tuple[int, int]]:
    """GPUs an actor takes, the actors' device and the pool's (min, max) size, from the cluster's resources: one
    GPU an actor where the cluster has GPUs, else a CPU an actor on at most half its CPUs (the rest decode)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return 1, "cuda", (1, gpus)
    return 0, "cpu", (1, max(1, int(resources.get("CPU", 1)) // 2))


def pipeline(
    encoder: Encoder, items: list[tuple[int | None, FileStat]], options: IndexOptions, known_hashes: dict[int, str]
) -> ray.data.Dataset:
    """The lazy Ray Data pipeline over the plan's items (nothing runs until it is iterated)."""
    import ray.data

    _quiet_ray_data()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own tqdm bar counts committed files
    context.print_on_execution_start = False
    rows = [item_row(row_id, stat, None if row_id is None else known_hashes.get(row_id)) for row_id, stat in items]
    gpus, device, pool = actor_resources()
    blocks = max(1, -(-len(rows) // ROWS_PER_BLOCK))
    return (
        ray.data.from_items(rows, override_num_blocks=blocks)
        .map(
            partial(decode_row, preprocess=encoder.preprocess, max_megapixels=options.max_megapixels),
            num_cpus=1,
            memory=DECODE_MEMORY,  # also keeps Ray from fusing decoding into the actors: decoding stays in tasks
        )
        .map_batches(
            EmbedActor,
            fn_constructor_kwargs={
                "spec": model_spec_of(encoder, device),
                "device": device,
                "with_maps": options.map_cache,
            },
            batch_size=options.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1]),
            num_cpus=1,
            num_gpus=gpus,
        )
    )


def encode_on_ray(
    encoder: Encoder, items: list[tuple[int | None, FileStat]], options: IndexOptions, known_hashes: dict[int, str]
) -> Iterator[EncodedBatch]:
    """The files decoded and encoded on the cluster at `options.ray`, streamed back in batches of
    `options.batch_size` as the actors finish them (in no particular order)."""
    assert options.ray is not None
    start = time.perf_counter()
    started = connect(options.ray)
    joined, first, streamed = time.perf_counter(), None, 0
    try:
        dataset = pipeline(encoder, items, options, known_hashes)
        for columns in dataset.iter_batches(batch_size=options.batch_size, batch_format="numpy", prefetch_batches=2):
            if first is None:
                first = time.perf_counter()
            else:
                streamed += len(columns["meta"])  # after the first batch: the steady rate, start-up left out
            yield batch_of(columns)
        if first is not None:
            after = time.perf_counter() - first
            LOGGER.info(
                "ray: joined in %.1f s, first batch after %.1f s more, then %d images in %.1f s (%.2f images/s)",
                joined - start, first - joined, streamed, after, streamed / after if after > 0 else 0.0,
            )  # fmt: skip
    finally:
        if started:
            import ray

            ray.shutdown()
