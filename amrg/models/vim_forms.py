"""Between MambaXray-VL's two Vision-Mamba forms (CXPMRG-Bench, seed 002; issue 17): the ARM pre-training
encoder (one causal scan, no class token, fixed sin-cos positions, no ``norm_f``; :data:`amrg.models.vim.VARIANTS`
``pretrain``) and the fine-tune model of stages #2-#3 (4-way scan, middle class token, learned positions,
``norm_f``; ``finetune``).

:func:`finetune_from_pretrain` converts a pretrain-form state dict as the release initialises its CLIP model
from the stage-1 checkpoint (``models/MambaXrayVL_CLIP.py`` loading with ARM's ``interpolate_pos_embed``):

* every forward-direction SSM weight (``conv1d``, ``x_proj``, ``dt_proj``, ``A_log``, ``D``) is copied into
  the ``_b``, ``_c`` and ``_c_b`` directions (the scans the fine-tune form adds);
* ``pos_embed`` (no class slot) is resized bicubically to the new patch grid
  (:func:`amrg.models.vim.resample_pos_embed`) and a zero class slot is inserted at the class position
  (``N//2`` for ``middle``: the release's ``cat(pos[:, :N//2], zeros, pos[:, N//2:])``);
* what the checkpoint lacks keeps the fresh model's initialisation, as the release's non-strict load
  does: ``cls_token`` trunc-normal (std 0.02) and ``norm_f`` ones/zeros. The result loads strictly.
"""

from __future__ import annotations

import re

import torch
from timm.layers import trunc_normal_

from .mamba import SCANS
from .vim import INIT_STD, cls_slot, resample_pos_embed

# a forward-direction SSM weight of a mixer: (prefix, name, tail) -> the other directions' names
_SSM_MODULE = re.compile(r"^(.*mixer\.)(conv1d|x_proj|dt_proj)(\.weight|\.bias)$")
_SSM_PARAM = re.compile(r"^(.*mixer\.)(A)(_log)$|^(.*mixer\.)(D)()$")


def direction_key(key: str, suffix: str) -> str | None:
    """The name of forward-direction SSM weight ``key`` in scan direction ``suffix`` (None: not one)."""
    m = _SSM_MODULE.match(key)
    if m:
        return f"{m.group(1)}{m.group(2)}{suffix}{m.group(3)}"
    m = _SSM_PARAM.match(key)
    if m:
        prefix, name, tail = (m.group(1), m.group(2), m.group(3)) if m.group(1) else (m.group(4), m.group(5), "")
        return f"{prefix}{name}{suffix}{tail}"
    return None


def finetune_from_pretrain(state: dict[str, torch.Tensor], grid: tuple[int, int], scan: str = "4way",
                           cls_position: str = "middle", final_norm: bool = True) -> dict[str, torch.Tensor]:
    """A pretrain-form Vim state dict -> the fine-tune form on ``grid`` (patch rows, columns): see the module."""
    if scan not in SCANS:
        raise ValueError(f"unknown mamba scan {scan!r}; choose from {list(SCANS)}")
    if "pos_embed" not in state or "cls_token" in state:
        raise ValueError("not a pretrain-form Vim state dict (it needs pos_embed and no cls_token)")
    extra = SCANS[scan][1:]
    present = sorted({d for k in state for s in extra if (d := direction_key(k, s)) in state})
    if present:
        raise ValueError(f"not a pretrain-form state dict: it already has other scan directions ({present[:3]})")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        out[key] = value
        for suffix in extra:
            other = direction_key(key, suffix)
            if other is not None:
                out[other] = value.clone()
    pos = state["pos_embed"]
    dim = pos.shape[-1]
    patches = resample_pos_embed(pos, grid, "none")
    at = cls_slot(cls_position, patches.shape[1])
    if at is not None:
        patches = torch.cat([patches[:, :at], patches.new_zeros(1, 1, dim), patches[:, at:]], dim=1)
        cls = torch.zeros(1, 1, dim, dtype=pos.dtype)
        trunc_normal_(cls, std=INIT_STD)
        out["cls_token"] = cls
    out["pos_embed"] = patches
    if final_norm and "norm_f.weight" not in out:
        out["norm_f.weight"], out["norm_f.bias"] = torch.ones(dim, dtype=pos.dtype), torch.zeros(dim, dtype=pos.dtype)
    return out
