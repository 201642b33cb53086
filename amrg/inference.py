"""A trained run rebuilt from its artifacts directory: classifier + memory banks + report generator.

One way to turn stage outputs back into models, used by the ``evaluate`` stage and by ``amrg generate``:

    run = load_run("artifacts", device)                 # checks every file first, names the stage to run
    f, fd = run.features(pixels, view_rows)             # frozen stage-1 features (F, F_d) per study
    reports = run.generate(f, fd, decode, batch_size)   # decoded reports
    probs = run.probabilities(pixels, rows, batch_size) # classifier sigmoid per image
    cams = run.cams(pixels[rows], diseases, "gradcam")  # CAM maps in [0, 1] per (image, disease)
    where = run.explain(pixels, view_rows, study_probs, cam)  # per study: CAMs of its predicted diseases
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .io import autocast, load_tensors, read_json
from .labels.schema import CHEXPERT_14

MAX_CAMS = 3  # predicted diseases (No Finding aside) whose CAM is computed per study
NO_FINDING = CHEXPERT_14.index("No Finding")

# what each file of a run is, and the stage that writes it
RUN_FILES: tuple[tuple[str, str], ...] = (
    ("classifier/model.safetensors", "train_classifier"),
    ("classifier/config.json", "train_classifier"),
    ("banks/visual/bank.safetensors", "encode_visual_bank"),
    ("banks/report/bank.safetensors", "encode_report_bank"),
    ("generator/weights.safetensors", "train_generator"),
    ("generator/config.json", "train_generator"),
)


class MissingArtifacts(FileNotFoundError):
    """A stage output a run needs is absent: the message says which stage builds it."""


def check_run(root: str | Path, need: tuple[str, ...] | None = None) -> None:
    """Raise :class:`MissingArtifacts` naming the first stage (in pipeline order) whose output is missing."""
    root = Path(root)
    missing = [(rel, stage) for rel, stage in RUN_FILES if (need is None or rel in need) and not (root / rel).is_file()]
    if missing:
        rel, stage = missing[0]
        raise MissingArtifacts(
            f"{root / rel} not found: the trained artifacts are not built yet. Run `dvc repro {stage}` "
            f"(or `dvc repro` / `make run` for the whole pipeline) in the repository, or pass --run <artifacts dir>")


def predicted(probs: np.ndarray) -> list[tuple[int, float]]:
    """(disease, p) of one study's ``(14,)`` probabilities above 0.5, most probable first."""
    return [(int(d), float(probs[d])) for d in np.argsort(-probs) if probs[d] > 0.5]


def study_probabilities(img_probs: np.ndarray, img_rows: np.ndarray, view_rows: np.ndarray) -> np.ndarray:
    """Study-level ``(S, 14)`` probabilities: the mean over each study's distinct views; ``img_probs[k]``
    belongs to image row ``img_rows[k]``."""
    pos = {int(r): k for k, r in enumerate(img_rows)}
    return np.stack([img_probs[[pos[r] for r in dict.fromkeys(v.tolist())]].mean(0) for v in view_rows])


def load_banks(hopfield, root: str | Path = "artifacts") -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The memory banks that the Hopfield switches turn on (None for a switched-off memory)."""
    root = Path(root)
    v = load_tensors(root / "banks" / "visual" / "bank.safetensors")["bank"] if hopfield.visual else None
    r = load_tensors(root / "banks" / "report" / "bank.safetensors")["bank"] if hopfield.report else None
    return v, r


@dataclass
class Run:
    root: Path
    classifier: torch.nn.Module
    generator: torch.nn.Module
    config: dict  # generator/config.json
    device: torch.device
    precision: str

    @property
    def image_size(self) -> int:
        return int(self.classifier.spec.img_size)

    def features(self, pixels: torch.Tensor, view_rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen stage-1 inputs of the generator for studies ``view_rows (S, 2)`` of uint8 ``pixels``."""
        from .models.features import study_features

        return study_features(self.classifier, pixels, view_rows, self.config["visual_pool"], self.device,
                              self.precision)

    @torch.no_grad()
    def generate(self, f: torch.Tensor, fd: torch.Tensor, decode, batch_size: int, desc: str = "generate") -> list[str]:
        out: list[str] = []
        starts = range(0, len(f), batch_size)
        for s in tqdm(starts, desc=desc, unit="batch", leave=False, mininterval=5, disable=len(starts) < 2):
            with autocast(self.device, self.precision):
                out += self.generator.generate(f[s:s + batch_size].to(self.device), fd[s:s + batch_size].to(self.device),
                                               decode)
        return out

    def probabilities(self, pixels: torch.Tensor, rows, batch_size: int) -> np.ndarray:
        """Classifier sigmoid ``(len(rows), 14)`` for the images ``pixels[rows]``."""
        from .models.classifier import predict_proba

        return predict_proba(self.classifier, pixels, np.asarray(rows), self.device, self.precision, batch_size)

    def cams(self, images: torch.Tensor, diseases: list[int], method: str, batch_size: int = 32) -> np.ndarray:
        """CAM maps ``(K, H, W)`` in [0, 1] of uint8 ``images (K, H, W)``, one target disease each."""
        from .cam import CamMiner

        if len(diseases) == 0:
            return np.zeros((0, self.image_size, self.image_size), np.float32)
        miner = CamMiner(self.classifier, method)
        try:
            with torch.enable_grad():
                return np.concatenate([miner(images[s:s + batch_size].to(self.device), diseases[s:s + batch_size])
                                       for s in range(0, len(diseases), batch_size)])
        finally:
            miner.close()

    def explain(self, pixels: torch.Tensor, view_rows: np.ndarray, study_probs: np.ndarray, cam,
                batch_size: int) -> list[list[dict]]:
        """Per study, for each of its first MAX_CAMS predicted diseases (No Finding aside) and each
        distinct view: ``{"disease", "label", "image" (row), "map" (H, W CAM), **cam_location}``.
        ``cam`` is :class:`amrg.config.Cam` (method, patch, tau); one CAM batch serves every study."""
        from .cam import cam_location

        jobs = []  # (study, disease, image row)
        for s, rows in enumerate(view_rows):
            diseases = [d for d, _ in predicted(study_probs[s]) if d != NO_FINDING][:MAX_CAMS]
            jobs += [(s, d, r) for d in diseases for r in dict.fromkeys(int(x) for x in rows)]
        out: list[list[dict]] = [[] for _ in view_rows]
        maps = self.cams(pixels[[r for *_, r in jobs]], [d for _, d, _ in jobs], cam.method, batch_size)
        for (s, d, r), m in zip(jobs, maps):
            out[s].append({"disease": d, "label": CHEXPERT_14[d], "image": r, "map": m,
                           **cam_location(m, cam.patch, cam.tau)})
        return out


def load_run(root: str | Path, device: torch.device, precision: str = "fp32") -> Run:
    """Rebuild the classifier and the report generator (with its banks) of the run in ``root``."""
    from .config import Hopfield
    from .models.generator import ReportGenerator
    from .models.llm import load_llm
    from .models.load import load_classifier

    root = Path(root)
    check_run(root, need=tuple(rel for rel, _ in RUN_FILES if not rel.startswith("banks/")))
    cfg = read_json(root / "generator" / "config.json")
    hop = Hopfield(**cfg["hopfield"])
    check_run(root, need=(("banks/visual/bank.safetensors",) if hop.visual else ())
              + (("banks/report/bank.safetensors",) if hop.report else ()))
    classifier = load_classifier(root / "classifier", device)
    llm, tokenizer = load_llm(root / "generator", cfg["llm"])
    model = ReportGenerator(llm, tokenizer, cfg["visual_dim"], cfg["query_dim"], *load_banks(hop, root), hop,
                            cfg["prompt"], cfg.get("index"))
    model.load_trainable(load_tensors(root / "generator" / "weights.safetensors"))
    return Run(root, classifier, model.to(device).eval(), cfg, device, precision)
