"""Where every artifact of a run lives: the one owner of the layout (pure path names, no DVC).

Each pipeline stage writes one directory under the artifacts root (``dvc.yaml``'s ``outs``; a test
checks the two agree); resumable training state lives outside it, under the checkpoints root, because
DVC deletes a stage's outs before it runs. Stages, :mod:`amrg.inference`, the CLI and the tests all take
paths from a :class:`Layout`; ``Layout("some/dir")`` redirects a whole run without changing directory.
Which stage makes a file is derived from the directory it lies in (:meth:`Layout.stage_of`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# stage -> its output directory under the artifacts root, in pipeline order
STAGE_DIRS: dict[str, str] = {
    "index": "index",
    "preprocess": "preprocess",
    "pretrain_vision": "pretrain/vision",
    "pretrain_contrastive": "pretrain/contrastive",
    "train_classifier": "classifier",
    "mine_cam": "cam",
    "encode_visual_bank": "banks/visual",
    "encode_report_bank": "banks/report",
    "train_generator": "generator",
    "evaluate": "eval",
    "score": "score",
}
PHANTOM_FLAG = "phantom_images"  # key of preprocess/stats.json (and every stage's metrics.json)
RESOLVED_PARAMS = "params.json"  # the params a stage used, written beside its outputs


class MissingArtifacts(FileNotFoundError):
    """A stage output a run needs is absent: the message says which stage builds it."""


@dataclass(frozen=True)
class Layout:
    root: Path = Path("artifacts")
    checkpoints: Path = Path("checkpoints")

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(self, "checkpoints", Path(self.checkpoints))

    def stage_dir(self, stage: str) -> Path:
        if stage not in STAGE_DIRS:
            raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_DIRS)}")
        return self.root / STAGE_DIRS[stage]

    def checkpoint(self, stage: str) -> Path:
        """The resumable training state of ``stage`` (outside its outs)."""
        return self.checkpoints / stage / "state.pt"

    def params(self, stage: str) -> Path:
        """The resolved params ``stage`` ran with."""
        return self.stage_dir(stage) / RESOLVED_PARAMS

    def stage_of(self, path: str | Path) -> str:
        """The stage whose output directory holds ``path`` (the deepest match)."""
        rel = Path(os.path.relpath(Path(path).resolve(), self.root.resolve())).as_posix()
        hits = [s for s, d in STAGE_DIRS.items() if rel == d or rel.startswith(d + "/")]
        if not hits:
            raise ValueError(f"{path} lies in no stage's output directory under {self.root}")
        return max(hits, key=lambda s: len(STAGE_DIRS[s]))

    # -- the files stages hand to each other ------------------------------------------------------
    @property
    def manifest(self) -> Path:
        """The input files preprocess reads, with their sizes and stamps (:mod:`amrg.data.manifest`)."""
        return self.stage_dir("index") / "manifest.tsv"

    @property
    def studies(self) -> Path:
        return self.stage_dir("preprocess") / "studies.parquet"

    @property
    def images(self) -> Path:
        return self.stage_dir("preprocess") / "images.parquet"

    @property
    def pixels(self) -> Path:
        """uint8 ``(N, S, S)`` rows of the images listed in :attr:`images` (:class:`amrg.data.store.RowFile`)."""
        return self.stage_dir("preprocess") / "pixels.npy"

    @property
    def stats(self) -> Path:
        return self.stage_dir("preprocess") / "stats.json"

    def pretrained_encoder(self, stage: str = "pretrain_contrastive") -> tuple[Path, Path]:
        """(weights, spec) of a pre-trained encoder: ``backbone.safetensors`` and ``encoder.json`` (timm name,
        kwargs, image size) of ``stage``, pretrain_vision or pretrain_contrastive (the end of the chain,
        which passes stage #1's encoder through when it is disabled). A disabled chain writes neither."""
        d = self.stage_dir(stage)
        return d / "backbone.safetensors", d / "encoder.json"

    @property
    def classifier_weights(self) -> Path:
        return self.stage_dir("train_classifier") / "model.safetensors"

    @property
    def classifier_config(self) -> Path:
        return self.stage_dir("train_classifier") / "config.json"

    @property
    def regions(self) -> Path:
        return self.stage_dir("mine_cam") / "regions.parquet"

    @property
    def visual_bank(self) -> Path:
        return self.stage_dir("encode_visual_bank") / "bank.safetensors"

    @property
    def report_bank(self) -> Path:
        return self.stage_dir("encode_report_bank") / "bank.safetensors"

    @property
    def generator_weights(self) -> Path:
        return self.stage_dir("train_generator") / "weights.safetensors"

    @property
    def generator_config(self) -> Path:
        return self.stage_dir("train_generator") / "config.json"

    @property
    def predictions(self) -> Path:
        return self.stage_dir("evaluate") / "predictions.parquet"

    @property
    def report_html(self) -> Path:
        return self.stage_dir("evaluate") / "report.html"

    def run_files(self, visual_bank: bool = True, report_bank: bool = True) -> list[Path]:
        """What rebuilding a trained run needs (classifier, the switched-on banks, generator)."""
        return [self.classifier_weights, self.classifier_config] \
            + ([self.visual_bank] if visual_bank else []) + ([self.report_bank] if report_bank else []) \
            + [self.generator_weights, self.generator_config]

    def require(self, files: list[Path]) -> None:
        """Raise :class:`MissingArtifacts` naming the first stage (pipeline order) whose file is absent."""
        missing = sorted((f for f in files if not f.is_file()), key=lambda f: list(STAGE_DIRS).index(self.stage_of(f)))
        if missing:
            stage = self.stage_of(missing[0])
            raise MissingArtifacts(
                f"{missing[0]} not found: the trained artifacts are not built yet. Run `dvc repro {stage}` "
                f"(or `dvc repro` / `make run` for the whole pipeline) in the repository, or pass --run <artifacts dir>")

    def is_phantom(self) -> bool:
        """Whether preprocess drew phantom images (False when it has not run)."""
        return bool(json.loads(self.stats.read_text()).get(PHANTOM_FLAG, False)) if self.stats.is_file() else False
