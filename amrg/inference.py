"""A trained run rebuilt from its artifacts: classifier + memory banks + report generator.

One way to turn stage outputs back into models, used by the ``evaluate`` stage and by ``amrg generate``:

    run = load_run(Layout("artifacts"), device)         # checks every file first, names the stage to run
    f, fd = run.features(pixels, view_rows, batch_size) # frozen stage-1 features (F, F_d) per study
    reports = run.generate(f, fd, decode, batch_size)   # decoded reports
    probs = run.probabilities(pixels, rows, batch_size) # classifier sigmoid per image
    cams = run.cams(pixels[rows], diseases, "gradcam")  # CAM maps in [0, 1] per (image, disease)
    where = run.explain(pixels, view_rows, study_probs, cam)  # per study: CAMs of its predicted diseases

The generator is rebuilt from its :class:`~amrg.models.generator.GeneratorSpec` (``generator/config.json``)
through the same factory as in training, in the same LLM dtype; so is its generator-side vision encoder
(``generator_vision`` other than ``classifier``: :attr:`Run.vision`, weights from ``generator/vision.safetensors``),
which then gives F while the classifier gives F_d.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .io import autocast, load_tensors, progress, read_json
from .labels.schema import CHEXPERT_14, DECISION_THRESHOLD, NO_FINDING
from .layout import Layout, MissingArtifacts  # noqa: F401  (MissingArtifacts re-exported for callers)

if TYPE_CHECKING:
    from .models.generator import GeneratorSpec

MAX_CAMS = 3  # predicted diseases (No Finding aside) whose CAM is computed per study


def predicted(probs: np.ndarray) -> list[tuple[int, float]]:
    """(disease, p) of one study's ``(14,)`` probabilities above the decision threshold, most probable first."""
    return [(int(d), float(probs[d])) for d in np.argsort(-probs) if probs[d] > DECISION_THRESHOLD]


def study_probabilities(img_probs: np.ndarray, img_rows: np.ndarray, view_rows: np.ndarray) -> np.ndarray:
    """Study-level ``(S, 14)`` probabilities: the mean over each study's distinct views; ``img_probs[k]``
    belongs to image row ``img_rows[k]``."""
    pos = {int(r): k for k, r in enumerate(img_rows)}
    return np.stack([img_probs[[pos[r] for r in dict.fromkeys(v.tolist())]].mean(0) for v in view_rows])


@dataclass
class Run:
    layout: Layout
    classifier: torch.nn.Module
    generator: torch.nn.Module
    spec: GeneratorSpec
    device: torch.device
    precision: str
    vision: torch.nn.Module | None = None  # the generator-side encoder of F (None: the classifier's tokens)

    @property
    def image_size(self) -> int:
        return int(self.classifier.spec.img_size)

    def iter_features(self, pixels, view_rows: np.ndarray, batch_size: int):
        """:meth:`features` batch by batch (memory: one batch)."""
        from .models.features import iter_study_features

        return iter_study_features(self.classifier, pixels, view_rows, self.spec.visual_pool, self.device,
                                   self.precision, batch_size, self.spec.views, self.vision)

    def features(self, pixels: torch.Tensor, view_rows: np.ndarray, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's inputs (F, F_d) for studies ``view_rows (S, 2)`` of uint8 ``pixels``: F from the
        generator-side encoder when the run has one, else from the frozen classifier; F_d from the classifier."""
        from .models.features import study_features

        return study_features(self.classifier, pixels, view_rows, self.spec.visual_pool, self.device,
                              self.precision, batch_size, self.spec.views, self.vision)

    @torch.no_grad()
    def generate(self, f: torch.Tensor, fd: torch.Tensor, decode, batch_size: int, desc: str = "generate") -> list[str]:
        out: list[str] = []
        for s in progress(range(0, len(f), batch_size), desc, unit="batch"):
            with autocast(self.device, self.precision):
                out += self.generator.generate(f[s:s + batch_size].to(self.device), fd[s:s + batch_size].to(self.device),
                                               decode)
        return out

    def probabilities(self, pixels: torch.Tensor, rows, batch_size: int) -> np.ndarray:
        """Classifier sigmoid ``(len(rows), 14)`` for the images ``pixels[rows]``."""
        from .models.classifier import predict_proba

        return predict_proba(self.classifier, pixels, np.asarray(rows), self.device, self.precision, batch_size)

    def cams(self, images: torch.Tensor, diseases: list[int], method: str, batch_size: int = 32,
             backend: str = "auto") -> np.ndarray:
        """CAM maps ``(K, H, W)`` in [0, 1] of uint8 ``images (K, H, W)``, one target disease each
        (``backend``: ``cam.backend``, :class:`amrg.cam.CamMiner`)."""
        from .cam import CamMiner

        if len(diseases) == 0:
            return np.zeros((0, self.image_size, self.image_size), np.float32)
        miner = CamMiner(self.classifier, method, backend, self.precision)
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
        maps = self.cams(pixels[[r for *_, r in jobs]], [d for _, d, _ in jobs], cam.method, batch_size, cam.backend)
        for (s, d, r), m in zip(jobs, maps):
            out[s].append({"disease": d, "label": CHEXPERT_14[d], "image": r, "map": m,
                           **cam_location(m, cam.patch, cam.tau)})
        return out


def load_run(layout: Layout, device: torch.device, precision: str = "fp32") -> Run:
    """Rebuild the classifier and the report generator (with its banks) of the run in ``layout``;
    :class:`~amrg.layout.MissingArtifacts` names the first stage whose output is missing."""
    from .banks import load_banks
    from .models.generator import GeneratorSpec, create_generator
    from .models.load import load_classifier, load_generator_vision

    if not layout.generator_config.is_file():
        layout.require(layout.run_files())
    spec = GeneratorSpec.from_dict(read_json(layout.generator_config)["spec"])
    layout.require(layout.run_files(spec.hopfield.visual, spec.hopfield.report))
    classifier = load_classifier(layout.stage_dir("train_classifier"), device)
    model = create_generator(spec, *load_banks(layout, spec.hopfield), saved=layout.stage_dir("train_generator"))
    model.load_trainable(load_tensors(layout.generator_weights))
    vision = load_generator_vision(spec, layout.stage_dir("train_generator"), device)
    return Run(layout, classifier, model.to(device).eval(), spec, device, precision, vision)


def run_params(layout: Layout, params_file: str | None = None):
    """The settings a trained run is used with (:class:`amrg.config.Params`): its own ``decode``, ``cam``,
    ``runtime`` and ``labels``, as the ``evaluate`` stage resolved them beside its scores
    (``eval/params.json``), or those of an explicit ``params_file``. Neither present is an error: a
    run is never decoded with defaults it did not use."""
    from .config import load_params, parse_params

    if params_file is not None:
        return load_params(params_file)
    resolved = layout.params("evaluate")
    if not resolved.is_file():
        raise MissingArtifacts(f"{resolved} not found: the run's decode and CAM settings are written by the "
                               "evaluate stage. Run `dvc repro evaluate`, or pass --params FILE")
    return parse_params(read_json(resolved))
