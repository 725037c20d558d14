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

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from retrieval.backbone import Backbone, load_backbone, network_class, randomised_tail
from retrieval.boxes import AUTO, Auto, Box  # noqa: F401 (AUTO re-exported: callers import it from here)
from retrieval.config import DEFAULT_INPUT_SIZE, DEFAULT_POOLING
from retrieval.errors import UsageError
from retrieval.fam import FineInputs
from retrieval.modelspec import ModelSpec, check_precision, check_runtime, describe_backbone, read_layers
from retrieval.onnxbackbone import OnnxBackbone, export_backbone, export_file, onnx_available
from retrieval.pooling import POOLINGS, Objectness, explained_feature_map, load_objectness, pool_feature_map
from retrieval.preprocess import Preprocess
from retrieval.regions import (
    box_weights,
    focus_scores,
    focus_weights,
    layer_outputs,
    top_cells,
)


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
    check_precision(precision)
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and native_bf16() else "fp32"


def resolve_runtime(runtime: str | None, device: torch.device, precision: str) -> str:
    """What runs the backbone's forward pass: None -> 'onnx' (ONNX Runtime, faster than torch on a CPU: see
    `retrieval.config.RUNTIMES`) for fp32 on the CPU when onnxruntime is installed, else 'torch'. An explicit 'onnx'
    where it cannot run (a GPU, bf16, not installed) is a usage error."""
    check_runtime(runtime)
    if runtime == "torch" or (runtime is None and (device.type != "cpu" or precision != "fp32")):
        return "torch"
    if device.type != "cpu" or precision != "fp32":
        raise UsageError(f"--runtime onnx runs fp32 on the CPU only (asked: {precision} on {device.type}); use torch")
    if not onnx_available():
        if runtime is None:
            return "torch"
        raise UsageError("--runtime onnx needs the packages onnxruntime and onnx (pip install onnxruntime onnx)")
    return "onnx"


@dataclass
class Encoded:
    """Photos through the encoder: z and what every explainer reads, on the encoder's device.

    whole_maps (B, N, h, w): the map z pools, over the whole photo (A; √A under sqrt; s·A under attn)
    regions (B, h, w): the cell weights of mean 1 z was pooled over (the focus cells, a box's cells; ones: all)
    emphasis (B, h, w), fine_emphasis (B, 2h, 2w): graded in [0, 1], how much each cell counts (`FineInputs`)
    guides (B, C, 2h, 2w): the backbone's guide layer output, on twice the grid of the maps
    pooled (B, N): z
    """

    whole_maps: Tensor
    regions: Tensor
    emphasis: Tensor
    fine_emphasis: Tensor
    guides: Tensor
    pooled: Tensor

    @property
    def explained_maps(self) -> Tensor:
        """The map z is the spatial mean of, which the paper's explainers weight: (B, N, h, w)."""
        return self.whole_maps * self.regions.unsqueeze(-3)

    def fine(self) -> FineInputs:
        """What `fam.fine_fam` reads of these photos (index the result for some of them)."""
        return FineInputs(self.whole_maps, self.emphasis, self.fine_emphasis, self.guides)

    def pack(self) -> Tensor:
        """One (B, N + 6 + 4C, h, w) tensor (what the map cache stores): the whole map, the region, the emphasis,
        and the fine emphasis and guide folded 2x2 into channels (pixel unshuffle)."""
        fine = torch.cat([self.fine_emphasis.unsqueeze(1), self.guides], dim=1)  # (B, 1 + C, 2h, 2w)
        inside = (self.regions > 0).to(self.whole_maps)  # a region weighs its cells equally: 0/1 is exact in float16
        return torch.cat(
            [self.whole_maps, inside.unsqueeze(1), self.emphasis.unsqueeze(1), F.pixel_unshuffle(fine, 2)], dim=1
        )

    @staticmethod
    def unpack(packed: Tensor, num_features: int, pooled: Tensor) -> Encoded:
        """`pack` undone, for maps of ``num_features`` channels and their z: (B, N + 6 + 4C, h, w) -> Encoded."""
        n = num_features
        fine = F.pixel_shuffle(packed[:, n + 2 :], 2)  # (B, 4 + 4C, h, w) -> (B, 1 + C, 2h, 2w)
        inside = packed[:, n]  # (B, h, w) 0/1 -> weights of mean 1, as `box_weights` / `top_cells` give them
        regions = inside * (inside[0].numel() / inside.sum(dim=(-2, -1), keepdim=True).clamp_min(1))
        return Encoded(packed[:, :n], regions, packed[:, n + 1], fine[:, 0], fine[:, 1:], pooled)


@dataclass
class Encoder:
    """A backbone plus the preprocessing and pooling that define z.

    The backbone is loaded on first use (``backbone``): identity and preprocessing come from
    `describe_backbone`, so a caller that only checks identity (a re-index with nothing to
    embed) never builds the model. ``precision`` 'bf16' runs the backbone under CPU autocast;
    the maps and vectors it returns are float32 either way. ``runtime`` 'onnx' runs the forward pass in ONNX
    Runtime (`retrieval.onnxbackbone`), from an export cached in ``export_dir`` (None: exported in memory); the
    torch backbone is still what it is exported from, and what training and gradients use.
    """

    backbone_name: str = "efficientnet_lite0"
    input_size: int = DEFAULT_INPUT_SIZE
    pooling: str = DEFAULT_POOLING
    device: torch.device = torch.device("cpu")
    weights: str | None = None  # an explicit weights file; None = the backbone's bundled one
    objectness: Objectness | None = None  # for pooling "attn:FILE"
    precision: str = "fp32"
    runtime: str = "torch"
    export_dir: Path | None = None
    _backbone: Backbone | None = field(default=None, repr=False)
    _onnx: OnnxBackbone | None = field(default=None, repr=False)

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

    def randomised(self, seed: int = 0, blocks: tuple[str, ...] | None = None) -> Encoder:
        """This encoder over a copy of its backbone whose last blocks (or ``blocks``) are re-initialised
        (`randomised_tail`): the model of the randomisation sanity check. Same preprocessing, pooling and precision."""
        encoder = replace(self, _backbone=None, _onnx=None, runtime="torch")  # no export of a random model
        encoder._backbone = randomised_tail(self.backbone, seed, blocks)
        return encoder

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
            digest = hashlib.sha256(
                self.objectness.weight.float().numpy().tobytes() + str(self.objectness.bias).encode()
            )
            identity["objectness_sha256"] = digest.hexdigest()[:16]
        identity["precision"] = self.precision
        return identity

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.input_size, self.mean, self.std)

    @property
    def focus_layer(self) -> str:
        """The backbone's layer whose output `focus_scores` reads (named without building the backbone)."""
        return network_class(self.backbone_name).focus_layer

    @property
    def guide_layer(self) -> str:
        """The backbone's layer whose features up-sample the graded maps (`fam.fine_fam`)."""
        return network_class(self.backbone_name).guide_layer

    @property
    def read_layers(self) -> tuple[str, ...]:
        """The backbone's inner layers whose outputs `encode_batch` reads besides its last map (each once, in order).
        The ONNX export outputs exactly these, so a cached export needs no torch backbone built."""
        return read_layers(self.backbone_name)

    @property
    def onnx(self) -> OnnxBackbone:
        """The ONNX Runtime session (created on first access, with as many threads as torch has then): from the
        export cached in ``export_dir`` for these weights, input size and `read_layers`, exported when missing."""
        if self._onnx is None:
            layers = self.read_layers
            cached = None
            if self.export_dir is not None:
                cached = export_file(self.export_dir, self._backbone_identity, self.input_size, layers)
            export = lambda: export_backbone(self.backbone, self.input_size, layers)  # noqa: E731
            self._onnx = OnnxBackbone.cached(cached, export, layers, torch.get_num_threads())
        return self._onnx

    def forward_layers(self, batch: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """(B, 3, S, S) -> the last map (B, N, h, w) float32 and {layer: output} for each of `read_layers`, one
        forward pass, on the encoder's device (the ONNX runtime runs on the CPU)."""
        if self.runtime == "onnx":
            return self.onnx(batch)
        with torch.inference_mode(), layer_outputs(self.backbone, self.read_layers) as caught:
            feature_maps = self._torch_features(batch)
        return feature_maps, {name: outputs[0] for name, outputs in caught.items()}

    def forward_features(self, batch: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, N, h, w) float32 on the encoder's device."""
        return self.forward_layers(batch)[0] if self.runtime == "onnx" else self._torch_features(batch)

    @torch.inference_mode()
    def _torch_features(self, batch: Tensor) -> Tensor:
        model = self.backbone.model
        batch = batch.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            return model.forward_features(batch).float()

    def forward_features_and_focus(self, batch: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, S, S) -> the feature maps (B, N, h, w) and `focus_weights` (B, h, w), one forward
        pass: the backbone's ``focus_layer`` output is caught on the way."""
        feature_maps, caught = self.forward_layers(batch)
        h, w = feature_maps.shape[-2:]
        return feature_maps, focus_weights(caught[self.focus_layer], (h, w)).to(feature_maps)

    def pool(self, feature_maps: Tensor, region: Tensor | None = None) -> Tensor:
        """(B, N, h, w) -> (B, N) with this encoder's pooling (over a box's cells with ``region``)."""
        return pool_feature_map(feature_maps, self.pooling, objectness=self.objectness, region=region)

    def pooled(self, batch: Tensor) -> Tensor:
        """Preprocessed images (B, 3, S, S) -> pooled vectors z (B, N) on the encoder's device."""
        return self.embed_batch(batch)[1]

    def encode_batch(
        self, batch: Tensor, boxes: list[Box | Auto | None] | None = None, sizes: list[tuple[int, int]] | None = None
    ) -> Encoded:
        """Preprocessed images (B, 3, S, S) -> z and what every explainer reads (`Encoded`), one forward pass.

        ``boxes`` as in `encode`, each in the pixels of a (width, height) in ``sizes``. Under `focus`
        pooling a photo without a box is pooled over its own focus cells, as `AUTO` pools a query."""
        boxes = [
            AUTO if box is None and self.pooling == "focus" else box
            for box in (boxes if boxes is not None else [None] * len(batch))
        ]
        feature_maps, caught = self.forward_layers(batch)
        h, w = feature_maps.shape[-2:]
        grid, fine_grid = (h, w), (2 * h, 2 * w)
        guides = _on_grid(caught[self.guide_layer].float(), fine_grid)  # (B, C, 2h, 2w)
        focus = None
        if AUTO in boxes:  # the focus cells and their graded scores, on both grids
            focus = (
                focus_scores(caught[self.focus_layer], grid).to(feature_maps),
                focus_scores(guides, fine_grid).to(feature_maps),
            )
        weights = [_cell_weights(box, i, sizes, focus, grid, feature_maps) for i, box in enumerate(boxes)]
        regions, emphasis, fine_emphasis = (torch.stack(column) for column in zip(*weights))
        whole = explained_feature_map(feature_maps, "gap" if self.pooling == "focus" else self.pooling, self.objectness)
        pooled = self.pool(feature_maps, regions if any(box is not None for box in boxes) else None)
        return Encoded(whole, regions, emphasis, fine_emphasis, guides, pooled)

    def embed_batch(
        self, batch: Tensor, boxes: list[Box | Auto | None] | None = None, sizes: list[tuple[int, int]] | None = None
    ) -> tuple[Tensor, Tensor]:
        """`encode_batch`'s maps the paper's explainers weight (B, N, h, w) and z (B, N)."""
        encoded = self.encode_batch(batch, boxes, sizes)
        return encoded.explained_maps, encoded.pooled

    def encode_full(self, images: list[Image.Image], boxes: list[Box | Auto | None] | None = None) -> Encoded:
        """Photos -> `Encoded` (z and what every explainer reads); ``boxes`` as in `encode`."""
        batch = torch.stack([self.preprocess(im) for im in images])
        return self.encode_batch(batch, boxes, [im.size for im in images])

    def encode(self, images: list[Image.Image], boxes: list[Box | Auto | None] | None = None) -> tuple[Tensor, Tensor]:
        """Photos -> the feature maps the explainers weight (B, N, h, w) and pooled vectors (B, N).

        ``boxes``: per photo a box in its pixels (or None) to pool over that part of it alone, or
        `AUTO` to pool over the cells `focus_weights` picks."""
        batch = torch.stack([self.preprocess(im) for im in images])
        return self.embed_batch(batch, boxes, [im.size for im in images])


def _on_grid(maps: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, C, H, W) resampled to ``grid`` where it is not on it already (an input size not a multiple of 32)."""
    if tuple(maps.shape[-2:]) == tuple(grid):
        return maps
    return F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)


def _cell_weights(
    box: Box | Auto | None,
    i: int,
    sizes: list[tuple[int, int]] | None,
    focus: tuple[Tensor, Tensor] | None,
    grid: tuple[int, int],
    like: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Photo i's region (h, w) of mean 1 and its graded emphasis in [0, 1] on the grid and on twice the grid: all
    ones without a box, the top focus cells and the focus scores over their maximum for `AUTO`, the box's cells."""
    fine_grid = (2 * grid[0], 2 * grid[1])
    if box is None:
        return torch.ones(grid).to(like), torch.ones(grid).to(like), torch.ones(fine_grid).to(like)
    if box == AUTO:
        assert focus is not None, "AUTO needs the focus scores of the same pass"
        scores, fine_scores = focus[0][i], focus[1][i]
        return (
            top_cells(scores[None])[0],
            scores / scores.max().clamp_min(1e-12),
            fine_scores / fine_scores.max().clamp_min(1e-12),
        )
    assert sizes is not None, "a box in pixels needs the sizes of the photos"
    region = box_weights(box, sizes[i], grid).to(like)
    return region, (region > 0).to(like), (box_weights(box, sizes[i], fine_grid) > 0).to(like)


def load_encoder(
    spec: ModelSpec = ModelSpec(),
    device: str | torch.device = "cpu",
    lazy: bool = False,
    export_dir: Path | None = None,
) -> Encoder:
    """The encoder of a model spec on a device; the backbone is loaded now unless ``lazy`` (then on first use).

    ``spec.precision``: 'fp32', 'bf16' (CPU autocast), or 'auto' = bf16 on a CPU with native bf16
    (see `native_bf16`), else fp32. ``spec.runtime``: see `resolve_runtime`; the ONNX export is cached in
    ``export_dir`` (a home's `Settings.export_dir`; None: exported in memory each time).
    Raises UsageError for an unknown backbone, pooling, precision or runtime, before loading anything.
    """
    pooling = spec.pooling
    if pooling not in POOLINGS and not pooling.startswith("attn:"):
        raise UsageError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
    objectness = load_objectness(pooling.split(":", 1)[1]) if pooling.startswith("attn:") else None
    device = torch.device(device)
    weights = None if spec.weights is None else str(Path(spec.weights).resolve())
    precision = resolve_precision(spec.precision, device)
    runtime = resolve_runtime(spec.runtime, device, precision)
    encoder = Encoder(
        spec.backbone, spec.input_size, pooling, device, weights, objectness, precision, runtime, export_dir
    )
    if not lazy:
        encoder.onnx if runtime == "onnx" else encoder.backbone  # noqa: B018 (loads it)
    return encoder
