"""Where famsearch keeps its state: one frozen settings object, built by the shells."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

ENV_PREFIX = "FAMSEARCH_"
MAP_CACHE_MAX_GB = 20.0  # index --map-cache-max-gb: ~125,000 photos at 166 KiB (retrieval/featcache.py)
# Names only (loading lives in retrieval.backbone): the CLI lists them without importing torch/timm.
BACKBONES = ("efficientnet_lite0", "resnet50", "toy")
# The inner layers the encoder reads of each backbone, by submodule name, so that the torch-free query path names
# them without importing torch (the network classes take theirs from here). focus: the mid-level map
# `retrieval.regions.focus_weights` reads (Lite0: stage 6's first block, 192 ch, stride 32; ResNet-50: layer3, 1024
# ch, stride 16); guide: a finer map (stride 16) whose features up-sample the graded maps (Lite0: stage 5's last
# block, 112 ch).
BACKBONE_LAYERS = {
    "efficientnet_lite0": {"focus": "_blocks.11", "guide": "_blocks.10"},
    "resnet50": {"focus": "net.layer3", "guide": "net.layer3"},
    "toy": {"focus": "conv1", "guide": "conv1"},
}
# Backbone arithmetic: fp32 (default), bf16, or auto = bf16 on CPUs with native bf16 (AVX512-BF16/AMX).
# bf16 halves the forward time there but moved one of 60 top-1 answers on clipart-composites
# (Recall@1 11.7 -> 10.0, bench/results/precision.txt), more than the 1-point allowance of docs/DESIGN.md §13.
PRECISIONS = ("fp32", "bf16", "auto")
# What runs the backbone's forward pass. onnx (ONNX Runtime, CPU, fp32) is the default where it can run: the same
# maps and vectors to float rounding (tests/test_onnx.py), faster than torch: 7.1 vs 12.8 ms/img measured on a quiet
# day (issue 20), a query's embed part 2.7 vs 15.5 s on a loaded one (bench/results/query-runtime.txt); torch for
# GPUs and bf16.
RUNTIMES = ("torch", "onnx")
# How photos are pooled unless asked otherwise: focus (GAP over the cells the automatic focus picks, on every
# photo) found the object rather than the background on clipart-composites, Recall@1 51.7% vs 11.7% for GAP at
# 224 px with no training, and localised better (bench/results/pooling.txt, docs/heads.md). GAP stays "gap".
DEFAULT_POOLING = "focus"
FOCUS_SHARE = 0.1  # share of the cells `focus_weights` keeps (chosen on clipart-train, docs/heads.md)
# What famsearch shows unless asked otherwise: fam-fine, the paper's FAM weights on the whole photo's map, graded
# by how much each cell counts in the pooling, at twice the resolution (retrieval.fam.fine_fam). On
# clipart-composites it beat the paper's map (`fam`, still there by name) on IoU, the pointing game, AD, IC,
# deletion and insertion, on both sides; it loses on Proportion and on the model-randomisation check (docs/eval.md).
DEFAULT_EXPLAINER = "fam-fine"
# Names only (the maths lives in retrieval.fam): the CLI lists them without importing torch.
EXPLAINER_NAMES = ("fam-fine", "fam", "fam-exact", "gradcam")
FINE_EXPLAINER = "fam-fine"  # the one that reads `FineInputs` (retrieval.fam.fine_fam, retrieval.lean.fine.fine_fam)
# fam-fine's emphasis e_c^2 on the coarse map, e_f on the fine one: chosen with experiments/explore_fine_maps.py
# (bench/results/fine-maps.txt) among floors 0-0.2 and powers 0.5-3. Here, not in retrieval.fam, so that the torch
# map and its numpy twin (retrieval.lean.fine) read one value.
COARSE_EMPHASIS_POWER = 2.0
# `famsearch duplicates`: the least cosine of two photos that counts them as near-duplicates. On 1,233 real photos
# and edited copies with look-alike photos among them, 0.88 grouped with the best F1 (precision 62.0 %, recall
# 75.6 %; mirror images 89 %, 20 % crops 38 %), keeping all but 9 of 55 look-alike photos apart
# (bench/duplicates.py -> bench/results/duplicates.txt).
DEFAULT_DUPLICATE_THRESHOLD = 0.88
# Photos handed over by a person or a program (the UI's uploads, `famsearch api`): refused over this size before
# decoding, and over this many pixels before decoding them (a small file can still decode to a huge bitmap).
MAX_UPLOAD_MB = 20
MAX_UPLOAD_MEGAPIXELS = 60.0
# How many of the top results a search (`famsearch search`, the UI, the API) and `famsearch eval` re-rank by matched
# parts unless asked otherwise (retrieval/rerank.py; README, Measured: bench/results/query-speed.txt): 0 = off.
DEFAULT_RERANK = 50
# Threads a QueryEngine that answers queries (search, explain, the UI, the API) gives torch and ONNX Runtime on a CPU:
# one query's operations are small, and on this project's 2-core machine two threads made a query slower, not faster
# (p50 49.6 -> 32.3 ms at one thread; --rerank 50: 93.4 -> 55.2 ms; bench/results/query-threads.txt). Concurrent
# queries (UI sessions, API requests) use the other cores. Batch work (eval, duplicates, index) keeps every core.
QUERY_THREADS = 1
# Threads of the backbone's forward pass in `famsearch search` on the lean engine (retrieval/lean): a command answers
# its queries one at a time, so the forward pass may take a second core: 6.6 against 10.7 ms at 224 px, and the whole
# 12 MP query at 10k photos 35.4 against 39.8 ms, on the 2-core machine (bench/results/lean.txt). numpy's BLAS stays
# on QUERY_THREADS: on two threads the re-ranker's small products made a query slower, not faster.
SEARCH_FORWARD_THREADS = 2


def default_rerank() -> int:
    """The UI's and the API's re-ranking: $FAMSEARCH_RERANK (the twin of `search --rerank`), else `DEFAULT_RERANK`."""
    text = os.environ.get(ENV_PREFIX + "RERANK") or ""
    return int(text) if text.strip().isdigit() else DEFAULT_RERANK


DEFAULT_INPUT_SIZE = 224  # the square side photos are resized to; 320 measured better at 2x the cost (README)


def index_generation(index_meta: dict | None) -> int:
    """The committed generation recorded in the DB's meta "index" (0: a home from before generations)."""
    return int((index_meta or {}).get("generation", 0))


def default_device(device: str | None = None) -> str:
    """``device`` as given, else cuda when torch sees a GPU, else cpu."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_home() -> Path:
    """$FAMSEARCH_HOME, else the user data directory (never inside the photo folders)."""
    return Path(os.environ.get(ENV_PREFIX + "HOME") or platformdirs.user_data_dir("famsearch"))


@dataclass(frozen=True)
class Settings:
    """Paths of one famsearch home; `db_url` overrides the SQLite file (e.g. PostgreSQL)."""

    home: Path
    db_url: str | None = None

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{(self.home / 'famsearch.db').resolve()}"

    # Each rebuild of the index writes a new generation of the FAISS and head files and records
    # its number in the DB (meta "index") in the same transaction as the model it goes with, so a
    # reader that read the meta opens a matching pair even while a re-index swaps in the next
    # one; the writer keeps the previous generation and deletes older ones. Generation 0 is the
    # name homes had before generations (index.faiss, head.pt).
    def index_file(self, generation: int = 0) -> Path:
        return self.home / ("index.faiss" if generation == 0 else f"index-{generation}.faiss")

    @property
    def export_dir(self) -> Path:
        """Where the backbone's ONNX exports are cached (`retrieval.onnxsession.export_file`)."""
        return self.home / "onnx"

    def head_file(self, generation: int = 0) -> Path:
        return self.home / ("head.pt" if generation == 0 else f"head-{generation}.pt")

    def generation_files(self) -> dict[int, list[Path]]:
        """{generation: its index/head files present in the home}."""
        found: dict[int, list[Path]] = {}
        for path in [*self.home.glob("index*.faiss"), *self.home.glob("index*.ivfdata"), *self.home.glob("head*.pt")]:
            stem = path.stem.partition("-")[2]
            if path.stem in ("index", "head") or stem.isdigit():
                found.setdefault(int(stem or 0), []).append(path)
        return found


def home_has_index(settings: Settings) -> bool:
    """Whether a home has a metadata database to read (an explicit database URL always counts)."""
    return settings.db_url is not None or (settings.home / "famsearch.db").exists()
