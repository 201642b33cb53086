"""Label-blind and oracle baselines, scored beside the model on every evaluation.

- **most frequent**: the most common training report, for every test study.
- **nearest neighbour**: the report of the training study whose classifier disease features F_d
  (14 x D, flattened, L2-normalised) are closest in cosine similarity to the test study's.
- **oracle template**: a report written from the test study's *true* labels out of training sentences:
  for each positive observation, the most frequent training sentence that the labeler marks positive
  for that observation and for no other one; then the sentences of the most frequent training report
  that say nothing about those observations. A study with no positive observation gets the most
  frequent report. It is the ceiling a generator can approach when it recognises every finding.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

import numpy as np
import torch

from .data.clean import report_sentences
from .labels.schema import CHEXPERT_14, NO_FINDING, binarize


def most_frequent_report(train_reports: list[str]) -> str:
    return Counter(train_reports).most_common(1)[0][0]


def nearest_neighbour_reports(train_features: torch.Tensor | Iterable[torch.Tensor], train_reports: list[str],
                              test_features: torch.Tensor) -> list[str]:
    """Each test study gets the report of its most cosine-similar training study (the first on ties).
    ``train_features``: one tensor, or its batches in training order (streamed: memory holds one batch)."""
    test = torch.nn.functional.normalize(test_features.flatten(1).float(), dim=1)
    best = torch.full((len(test),), -float("inf"))
    arg = torch.zeros(len(test), dtype=torch.long)
    start = 0
    for chunk in ([train_features] if isinstance(train_features, torch.Tensor) else train_features):
        train = torch.nn.functional.normalize(chunk.flatten(1).float(), dim=1)
        if len(train):
            sim, idx = (test @ train.T).max(1)  # the first maximum within the chunk
            better = sim > best  # strictly: an earlier chunk keeps a tie
            best, arg = torch.where(better, sim, best), torch.where(better, idx + start, arg)
        start += len(train)
    if start != len(train_reports):
        raise ValueError(f"{start} training feature rows for {len(train_reports)} training reports")
    return [train_reports[i] for i in arg.tolist()]


def oracle_reports(test_labels: np.ndarray, train_reports: list[str],
                   labeler: Callable[[list[str]], np.ndarray], uncertain_as: str = "negative") -> list[str]:
    counts = Counter(s for r in train_reports for s in report_sentences(r))
    sentences = [s for s, _ in counts.most_common()]
    sent_labels = labeler(sentences)
    positive = binarize(sent_labels, "negative")  # a sentence counts for a finding it states, not one it doubts
    positive[:, NO_FINDING] = False
    only_one = positive.sum(1) == 1
    finding_sentence = {}
    for k in range(len(CHEXPERT_14)):
        hits = np.flatnonzero(only_one & positive[:, k])
        if len(hits):
            finding_sentence[k] = sentences[hits[0]]  # sentences are in frequency order
    default = most_frequent_report(train_reports)
    default_sents = report_sentences(default)
    default_labels = labeler(default_sents)
    wanted = binarize(test_labels, uncertain_as)
    out = []
    for row in wanted:
        ks = [k for k in np.flatnonzero(row) if k != NO_FINDING and k in finding_sentence]
        if not ks:
            out.append(default)
            continue
        keep = [s for s, lab in zip(default_sents, default_labels) if np.isnan(lab[ks]).all()]
        out.append(" . ".join([finding_sentence[k] for k in ks] + keep) + " .")
    return out
