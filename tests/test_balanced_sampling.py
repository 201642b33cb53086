"""Class-balanced epochs of the generator (generator.balance, amrg.train.balanced_weights)."""

import numpy as np
import torch

from amrg.train import balanced_weights, epoch_batches


def test_weights_are_the_rarest_findings_repeat_factor():
    labels = np.array([[1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [np.nan, -1, 0]])
    w = balanced_weights(labels, 0.5)
    n = len(labels)  # n_0 = 4, n_1 = 2, label 2 has no positive (never a factor)
    f0, f1 = (n / 4) ** 0.5, (n / 2) ** 0.5
    assert torch.allclose(w, torch.tensor([f0, f0, f0, f1, max(f0, f1), 1.0, 1.0], dtype=torch.float64))
    assert balanced_weights(labels, 0.0) is None and balanced_weights(np.zeros((3, 2)), 1.0) is None


def test_uniform_epochs_are_unchanged_and_weighted_epochs_follow_the_weights():
    # no weights: the same seeded permutation as before (every row once)
    g = torch.Generator().manual_seed(3 * 1000 + 2)
    assert all(torch.equal(a, b) for a, b in zip(epoch_batches(10, 4, 3, 2), torch.randperm(10, generator=g).split(4)))
    w = torch.tensor([1.0, 1.0, 8.0])
    draws = torch.cat([torch.cat(epoch_batches(3, 3, 0, e, w)) for e in range(4000)])
    share = torch.bincount(draws, minlength=3).double() / len(draws)
    assert torch.allclose(share, w.double() / w.sum(), atol=0.01)
    assert sum(len(b) for b in epoch_batches(7, 3, 0, 0, torch.ones(7))) == 7  # an epoch keeps its size
    assert all(torch.equal(a, b) for a, b in zip(epoch_batches(7, 3, 5, 1, w.repeat(3)[:7]),
                                                 epoch_batches(7, 3, 5, 1, w.repeat(3)[:7])))  # seeded
