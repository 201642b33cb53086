"""Multi-label classification metrics: per-label AUROC, average precision and F1 at the decision threshold
(:data:`amrg.labels.schema.DECISION_THRESHOLD`, 0.5)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from ..labels.schema import CHEXPERT_14, DECISION_THRESHOLD


def multilabel_metrics(targets: np.ndarray, probs: np.ndarray) -> dict:
    """``targets`` binary ``(N, 14)``, ``probs`` ``(N, 14)``. A label whose targets are all one class has
    no AUROC/AP (null) and is left out of the means, which say over how many labels they average."""
    per = {}
    for j, name in enumerate(CHEXPERT_14):
        t, p = targets[:, j], probs[:, j]
        both = 0 < t.sum() < len(t)
        per[name] = {"auroc": float(roc_auc_score(t, p)) if both else None,
                     "ap": float(average_precision_score(t, p)) if both else None,
                     "f1": float(f1_score(t, p > DECISION_THRESHOLD, zero_division=0)), "positives": int(t.sum())}
    aurocs = [v["auroc"] for v in per.values() if v["auroc"] is not None]
    aps = [v["ap"] for v in per.values() if v["ap"] is not None]
    return {"mean_auroc": float(np.mean(aurocs)) if aurocs else None,
            "mean_ap": float(np.mean(aps)) if aps else None,
            "n_labels_scored": len(aurocs), "per_label": per}
