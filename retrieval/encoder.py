"""The embedding model: backbone -> feature map A -> pooling -> z -> head -> e.

    forward_features(x)  (B, 3, S, S) -> A (B, N, h, w)   last conv map, post-activation
    pool(A)              (B, N, h, w) -> z (B, N)          GAP (the paper's), GeM, sqrt-GAP, or focus:
                                                           GAP over the cells `focus_weights` picks
                                                           (a query box: over the cells it covers)
    head(z)              (B, N)       -> e (B, J)          retrieval.head.Head

A query can be pooled over part of itself: a box the user gives, or ``auto`` (`AUTO`): the cells a
gallery-free saliency cue picks (`focus_weights`), for a whole photo whose object is not framed.
``focus`` pooling does the latter to every photo, query and gallery alike, so an indexed photo still
finds itself at score 1 while photos are compared by what stands out in them (docs/heads.md).

Preprocessing resizes the *whole* image to S x S (no centre crop), so an (h, w) map
up-sampled to the image's own size lines up with the photo.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from retrieval.backbone import Backbone, describe_backbone, load_backbone
from retrieval.config import DEFAULT_POOLING, PRECISIONS

DEFAULT_INPUT_SIZE = 224
POOLINGS = ("gap", "gem", "sqrt", "focus", "attn:FILE")
GEM_P = 3.0


def native_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (AVX512-BF16 or AMX), where oneDNN runs
    the backbone ~2x faster in bf16 than in fp32; elsewhere bf16 is emulated and slower."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> 'bf16' on a CPU with native bf16, else 'fp32'; 'fp32'/'bf16' are kept."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and native_bf16() else "fp32"


@dataclass(frozen=True)
class Objectness:
    """A linear probe on local features, s(hw) = sigmoid(weight·A[:, h, w] + bias), from `famsearch train`."""

    weight: Tensor  # (N,)
    bias: float

    def __call__(self, feature_maps: Tensor) -> Tensor:
        """(..., N, h, w) -> (..., h, w) spatial weights normalised to mean 1 over (h, w)."""
        logits = torch.einsum("...nhw,n->...hw", feature_maps, self.weight.to(feature_maps)) + self.bias
        weights = torch.sigmoid(logits)
        return weights / weights.mean(dim=(-2, -1), keepdim=True).clamp_min(1e-12)

    def save(self, path: Path) -> None:
        torch.save({"kind": "objectness", "weight": self.weight, "bias": float(self.bias)}, path)


def load_objectness(path: str | Path) -> Objectness:
    """Read an objectness file written by `famsearch train`."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise ValueError(f"cannot read objectness file {path}: {error}") from None
    if not isinstance(state, dict) or state.get("kind") != "objectness":
        raise ValueError(f"{path} is not a famsearch objectness file")
    return Objectness(state["weight"].float(), float(state["bias"]))


@functools.lru_cache(maxsize=4)
def _cached_objectness(path: str) -> Objectness:
    return load_objectness(path)


Box = tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the photo, x2 / y2 exclusive
AUTO = "auto"  # in place of a box: let `focus_weights` pick the part of the photo
BOX_FORMAT = "X1,Y1,X2,Y2 (pixels of the photo: left, top, right, bottom) or auto"
FOCUS_SHARE = 0.1  # share of the cells `focus_weights` keeps (chosen on clipart-train, docs/heads.md)


def parse_box(text: str) -> Box | str:
    """'x1,y1,x2,y2' -> a box, 'auto' -> `AUTO`; ValueError naming the format on anything else."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4 or not (values[2] > values[0] and values[3] > values[1]):
        raise ValueError(f"a box is {BOX_FORMAT} with X2 > X1 and Y2 > Y1; got {text!r}")
    return values  # type: ignore[return-value]


def box_json(box: Box | str) -> list | str:
    """A parsed box as `--json` echoes it: `AUTO` as is, whole pixel values as ints."""
    return box if box == AUTO else [int(v) if float(v).is_integer() else v for v in box]


def clip_box(box: Box, size: tuple[int, int]) -> Box:
    """The box cut to a (width, height) photo; ValueError if nothing of it is left. `AUTO` stays."""
    if box == AUTO:
        return box
    width, height = size
    x1, y1, x2, y2 = max(box[0], 0), max(box[1], 0), min(box[2], width), min(box[3], height)
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"the box {','.join(f'{v:g}' for v in box)} lies outside the {width}x{height} photo")
    return x1, y1, x2, y2


def fit_box(box: Box, photo_size: tuple[int, int], image_size: tuple[int, int]) -> Box:
    """A box in pixels of the full-size photo -> clipped, in pixels of its decoded image (JPEG
    draft decoding shrinks the photo by 1/2^k; the box shrinks with it). `AUTO` stays."""
    if box == AUTO:
        return box
    x1, y1, x2, y2 = clip_box(box, photo_size)
    sx, sy = image_size[0] / photo_size[0], image_size[1] / photo_size[1]
    return x1 * sx, y1 * sy, x2 * sx, y2 * sy


def box_weights(box: Box, image_size: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """Cell weights (h, w) that restrict pooling to a box: the cells whose centre lies in it, scaled
    so the weights average 1 (GAP of weights·A is then the mean of A over those cells). A box
    smaller than a cell keeps the cell holding its centre. The preprocessing keeps the whole photo,
    so cell (i, j) covers the same fraction of the photo whatever its size."""
    width, height = image_size
    h, w = grid
    x1, y1, x2, y2 = clip_box(box, image_size)
    centres_x = (torch.arange(w, dtype=torch.float64) + 0.5) * width / w
    centres_y = (torch.arange(h, dtype=torch.float64) + 0.5) * height / h
    inside = ((centres_y >= y1) & (centres_y < y2))[:, None] & ((centres_x >= x1) & (centres_x < x2))[None, :]
    if not inside.any():
        inside[min(int((y1 + y2) / 2 * h / height), h - 1), min(int((x1 + x2) / 2 * w / width), w - 1)] = True
    weights = inside.float()
    return weights * (h * w) / weights.sum()


def focus_weights(mid_maps: Tensor, grid: tuple[int, int], share: float = FOCUS_SHARE) -> Tensor:
    """Cell weights (B, h, w) that restrict pooling to the photo's most salient cells, with no box,
    no training and no gallery: the `AUTO` focus. From a mid-level map (B, C, h', w') of the same
    forward pass (the backbone's ``focus_layer``: Lite0's block 11, whose features inside an object
    mask identify the instance best, docs/heads.md), each cell scores

        d² · ‖a‖ / mean ‖a‖,   d = 1 − cos(a, mean direction of the photo's cells)

    — unlike the rest of the photo (mostly the background that fills it) and strongly activated. The
    outer ring of cells scores 0: those cells see the convolutions' zero padding, which alone makes
    them look unlike the rest (on a uniform texture the corners stood out). The scores are smoothed
    3×3 (edges repeated), so a ring cell next to a salient one can still be picked, resampled to the
    pooling grid (h, w), and the top ``share`` of cells (at least one; ties kept) get equal weight,
    scaled so the weights average 1 as `box_weights` do. The choices (score, ring, smoothing, share)
    were made on clipart-train, never on the evaluation sets (bench/explore_focus.py).
    """
    cells = mid_maps.float().clamp_min(0).flatten(2).transpose(1, 2)  # (B, h'w', C)
    norms = cells.norm(dim=2)  # (B, h'w')
    unit = cells / norms.clamp_min(1e-6).unsqueeze(2)
    mean = F.normalize(unit.mean(dim=1, keepdim=True), dim=2)
    distinct = (1.0 - (unit * mean).sum(dim=2)).clamp_min(1e-6)
    score = distinct ** 2 * norms / norms.mean(dim=1, keepdim=True).clamp_min(1e-12)
    score = score.reshape(len(score), 1, *mid_maps.shape[-2:])
    if min(score.shape[-2:]) > 2:  # the padding ring; a map of 1-2 cells across is all ring: keep it
        inner = torch.zeros_like(score)
        inner[..., 1:-1, 1:-1] = 1.0
        score = score * inner
    score = F.avg_pool2d(F.pad(score, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    if tuple(score.shape[-2:]) != tuple(grid):
        score = F.interpolate(score, size=grid, mode="bilinear", align_corners=False)
    score = score.flatten(1)  # (B, hw)
    kth = score.topk(max(1, int(share * score.shape[1])), dim=1).values[:, -1:]
    inside = (score >= kth).float()
    return (inside * (score.shape[1] / inside.sum(dim=1, keepdim=True))).reshape(len(score), *grid)


@contextlib.contextmanager
def focus_layer_outputs(backbone: Backbone) -> Iterator[list[Tensor]]:
    """While open, every forward pass of ``backbone`` appends its ``focus_layer`` output (the map
    `focus_weights` reads) to the yielded list; the hook is removed on exit."""
    caught: list[Tensor] = []
    layer = backbone.model.get_submodule(backbone.focus_layer)
    handle = layer.register_forward_hook(lambda _module, _inputs, output: caught.append(output))
    try:
        yield caught
    finally:
        handle.remove()


def explained_feature_map(feature_maps: Tensor, pooling: str, objectness: Objectness | None = None,
                          region: Tensor | None = None) -> Tensor:
    """The map z is the spatial mean of, which the explainers weight: (..., N, h, w) -> same.

    ``region`` (..., h, w), from `box_weights` or `focus_weights`, zeroes the cells outside a query box and scales the
    rest, so z stays the spatial mean of this map and every explainer weights exactly what was compared.
    `focus` pooling is GAP with its region always set (the photo's own focus cells, or a query box).

    `gap` and `gem`: A itself. `sqrt`: √A (power-normalised activations; z = GAP(√A) is linear
    in this map, so fam-exact and closed-form Grad-CAM stay exact on it). Under `gem` z is not
    linear in A: maps are built from A, but fam-exact no longer sums to the score and the
    closed-form Grad-CAM is an approximation (see docs/heads.md).
    """
    if pooling == "sqrt":
        explained = feature_maps.clamp_min(0).sqrt()
    elif pooling.startswith("attn"):  # s(hw)·A, s of mean 1: its GAP is the attention-weighted mean
        if objectness is None and pooling.startswith("attn:"):
            objectness = _cached_objectness(pooling[5:])
        if objectness is None:
            raise ValueError("attn pooling needs an objectness probe (attn:FILE, from famsearch train)")
        explained = feature_maps * objectness(feature_maps).unsqueeze(-3)
    elif pooling == "focus" and region is None:
        raise ValueError("focus pooling needs the focus weights of the same forward pass "
                         "(Encoder.encode / Encoder.embed_batch), not the feature map alone")
    else:
        explained = feature_maps
    return explained if region is None else explained * region.unsqueeze(-3)


def pool_feature_map(
    feature_maps: Tensor, pooling: str = "gap", p: float = GEM_P, objectness: Objectness | None = None,
    region: Tensor | None = None,
) -> Tensor:
    """(..., N, h, w) -> (..., N). GAP; GeM (mean A^p)^(1/p) (p = 1 is GAP); sqrt: GAP of √A;
    attn:FILE: GAP of s·A, with s a learnt objectness map (see `Objectness`); focus: GAP over
    ``region``, which must be given. ``region`` (..., h, w) from `box_weights` or `focus_weights`:
    pool over those cells only."""
    if pooling == "gem":
        powered = feature_maps.clamp_min(1e-6).pow(p)
        powered = powered if region is None else powered * region.unsqueeze(-3)
        return powered.mean(dim=(-2, -1)).pow(1.0 / p)
    if pooling in ("gap", "sqrt", "focus") or pooling.startswith("attn:"):
        return explained_feature_map(feature_maps, pooling, objectness, region).mean(dim=(-2, -1))
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


@dataclass(frozen=True)
class Preprocess:
    """RGB PIL image -> normalised (3, S, S) float tensor, whole image kept (picklable for workers)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, image: Image.Image) -> Tensor:
        resized = image.convert("RGB").resize((self.input_size, self.input_size), Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)  # (S, S, 3)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (pixels.permute(2, 0, 1) - mean) / std  # (S, S, 3) -> (3, S, S)


@dataclass
class Encoder:
    """A backbone plus the preprocessing and pooling that define z.

    The backbone is loaded on first use (``backbone``): identity and preprocessing come from
    `describe_backbone`, so a caller that only checks identity (a re-index with nothing to
    embed) never builds the model. ``precision`` 'bf16' runs the backbone under CPU autocast;
    the maps and vectors it returns are float32 either way.
    """

    backbone_name: str = "efficientnet_lite0"
    input_size: int = DEFAULT_INPUT_SIZE
    pooling: str = DEFAULT_POOLING
    device: torch.device = torch.device("cpu")
    weights: str | None = None  # an explicit weights file; None = the backbone's bundled one
    objectness: Objectness | None = None  # for pooling "attn:FILE"
    precision: str = "fp32"
    _backbone: Backbone | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.mean, self.std, self._backbone_identity = describe_backbone(self.backbone_name, self.weights)

    @property
    def backbone(self) -> Backbone:
        """The loaded backbone (built on first access), eval mode, channels_last, on the device."""
        if self._backbone is None:
            loaded = load_backbone(self.backbone_name, self.weights)
            loaded.model.to(self.device).eval().to(memory_format=torch.channels_last)
            self._backbone = loaded
        return self._backbone

    @property
    def loaded(self) -> bool:
        return self._backbone is not None

    @property
    def identity(self) -> dict:
        """What the stored pooled vectors depend on; a change means re-embedding. ``precision``
        is recorded but not compared: bf16 vectors differ from fp32 ones by rounding only (cosine
        > 0.995, tests/test_encoder.py), so switching it does not force a re-embed."""
        identity = {**self._backbone_identity, "pooling": self.pooling, "input_size": self.input_size}
        if self.objectness is not None:
            digest = hashlib.sha256(self.objectness.weight.float().numpy().tobytes() + str(self.objectness.bias).encode())
            identity["objectness_sha256"] = digest.hexdigest()[:16]
        identity["precision"] = self.precision
        return identity

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.input_size, self.mean, self.std)

    @torch.inference_mode()
    def forward_features(self, batch: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, N, h, w) float32 on the encoder's device."""
        model = self.backbone.model
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return model.forward_features(batch).float()

    def forward_features_and_focus(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, S, S) -> the feature maps (B, N, h, w) and `focus_weights` (B, h, w), one forward
        pass: the backbone's ``focus_layer`` output is caught on the way."""
        with focus_layer_outputs(self.backbone) as caught:
            feature_maps = self.forward_features(batch)
        return feature_maps, focus_weights(caught[0], tuple(feature_maps.shape[-2:])).to(feature_maps)

    def pool(self, feature_maps: Tensor, region: Tensor | None = None) -> Tensor:
        """(B, N, h, w) -> (B, N) with this encoder's pooling (over a box's cells with ``region``)."""
        return pool_feature_map(feature_maps, self.pooling, objectness=self.objectness, region=region)

    def pooled(self, batch: Tensor) -> Tensor:
        """Preprocessed images (B, 3, S, S) -> pooled vectors z (B, N) on the encoder's device."""
        return self.embed_batch(batch)[1]

    def embed_batch(self, batch: Tensor, boxes: list[Box | str | None] | None = None,
                    sizes: list[tuple[int, int]] | None = None) -> tuple[Tensor, Tensor]:
        """Preprocessed images (B, 3, S, S) -> the maps the explainers weight (B, N, h, w) and z (B, N).

        ``boxes`` as in `encode`, each in the pixels of a (width, height) in ``sizes``. Under `focus`
        pooling a photo without a box is pooled over its own focus cells, as `AUTO` pools a query."""
        boxes = [AUTO if box is None and self.pooling == "focus" else box
                 for box in (boxes if boxes is not None else [None] * len(batch))]
        if AUTO in boxes:
            feature_maps, focus = self.forward_features_and_focus(batch)
        else:
            feature_maps, focus = self.forward_features(batch), None
        region = None
        if any(box is not None for box in boxes):
            grid = tuple(feature_maps.shape[-2:])
            region = torch.stack([
                torch.ones(grid).to(feature_maps) if box is None else focus[i] if box == AUTO
                else box_weights(box, sizes[i], grid).to(feature_maps)
                for i, box in enumerate(boxes)])
        return (explained_feature_map(feature_maps, self.pooling, self.objectness, region),
                self.pool(feature_maps, region))

    def encode(self, images: list[Image.Image], boxes: list[Box | str | None] | None = None) -> tuple[Tensor, Tensor]:
        """Photos -> the feature maps the explainers weight (B, N, h, w) and pooled vectors (B, N).

        ``boxes``: per photo a box in its pixels (or None) to pool over that part of it alone, or
        `AUTO` to pool over the cells `focus_weights` picks."""
        batch = torch.stack([self.preprocess(im) for im in images])
        return self.embed_batch(batch, boxes, [im.size for im in images])


def load_encoder(
    backbone: str = "efficientnet_lite0",
    weights: str | None = None,
    input_size: int = DEFAULT_INPUT_SIZE,
    pooling: str = DEFAULT_POOLING,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    lazy: bool = False,
) -> Encoder:
    """An Encoder on a device; the backbone is loaded now unless ``lazy`` (then on first use).

    ``precision``: 'fp32', 'bf16' (CPU autocast), or 'auto' = bf16 on a CPU with native bf16
    (see `native_bf16`), else fp32.
    Raises ValueError for an unknown backbone, pooling or precision, before loading anything.
    """
    if pooling not in POOLINGS and not pooling.startswith("attn:"):
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    objectness = load_objectness(pooling.split(":", 1)[1]) if pooling.startswith("attn:") else None
    device = torch.device(device)
    weights = None if weights is None else str(Path(weights).resolve())
    encoder = Encoder(backbone, input_size, pooling, device, weights, objectness, resolve_precision(precision, device))
    if not lazy:
        encoder.backbone  # noqa: B018 (loads it)
    return encoder
