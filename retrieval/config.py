"""Where famsearch keeps its state: one frozen settings object, built by the shells."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs

ENV_PREFIX = "FAMSEARCH_"
# Names only (loading lives in retrieval.backbone): the CLI lists them without importing torch/timm.
BACKBONES = ("efficientnet_lite0", "resnet50", "toy")
# Backbone arithmetic: auto = bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32.
PRECISIONS = ("auto", "fp32", "bf16")
# What famsearch shows unless asked otherwise: closed-form Grad-CAM localised best at FAM's cost on
# clipart-composites (query-side Proportion 55.9% vs paper FAM 36.6%, centre prior 33.4%; docs/eval.md).
# Paper FAM stays available as "fam".
DEFAULT_EXPLAINER = "gradcam"


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

    @property
    def index_path(self) -> Path:
        return self.home / "index.faiss"

    @property
    def head_path(self) -> Path:
        return self.home / "head.pt"
