"""Report-generation metrics: NLG (pycocoevalcap, R2Gen protocol) and clinical efficacy (CheXpert labels)."""

from amrg.metrics.ce import ce_scores
from amrg.metrics.nlg import nlg_scores

__all__ = ["ce_scores", "nlg_scores"]
