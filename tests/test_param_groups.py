"""AdamW param groups of amrg.train.fit: a per-prefix lr, no decay on 1-D parameters, clear errors."""

import pytest
import torch

from amrg.train import LoopConfig, param_groups


def _named():
    net = torch.nn.ModuleDict({"enc": torch.nn.Linear(3, 4), "head": torch.nn.Sequential(torch.nn.LayerNorm(4),
                                                                                      torch.nn.Linear(4, 2))})
    names, params = zip(*net.named_parameters())
    return list(names), list(params)


def _by_name(groups, names, params):
    where = {id(p): n for n, p in zip(names, params)}
    return [(sorted(where[id(p)] for p in g["params"]), g.get("lr"), g.get("weight_decay")) for g in groups]


def test_default_is_one_group_of_everything():
    names, params = _named()
    groups = param_groups(names, params, LoopConfig(1, 2, 0.1))
    assert _by_name(groups, names, params) == [(sorted(names), None, None)]


def test_prefix_lr_and_no_decay_on_1d():
    names, params = _named()
    cfg = LoopConfig(1, 2, 0.1, weight_decay=0.05, lr_by_prefix={"enc.": 0.01}, no_decay_1d=True)
    got = _by_name(param_groups(names, params, cfg), names, params)
    assert got == [(["head.1.weight"], None, None), (["head.0.bias", "head.0.weight", "head.1.bias"], None, 0.0),
                   (["enc.weight"], 0.01, None), (["enc.bias"], 0.01, 0.0)]
    opt = torch.optim.AdamW(param_groups(names, params, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.05), (0.1, 0.0), (0.01, 0.05),
                                                                        (0.01, 0.0)]


def test_a_prefix_matching_nothing_is_an_error():
    names, params = _named()
    with pytest.raises(ValueError, match="no trainable parameter name starts with 'encoder.'"):
        param_groups(names, params, LoopConfig(1, 2, 0.1, lr_by_prefix={"encoder.": 0.01}))
