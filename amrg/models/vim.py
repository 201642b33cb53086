"""Vision Mamba (Vim; Zhu et al. 2024) as MambaXray-VL builds it (CXPMRG-Bench, seed 002; issue 17), timm-registered.

An image is cut into 16-px patches by a strided conv (``patch_embed.proj``), a class token (``cls_token``)
is inserted at ``cls_position`` (``middle``: sequence position N//2, as the release; ``first``; ``none``), an
absolute position embedding (``pos_embed``: ``learn``, fixed 2-D ``sincos`` as ARM pre-training, or ``none``)
is added, then ``depth`` blocks and a final norm (``norm_f``). ``block`` selects the block layout:

* ``swiglu`` (MambaXray-VL, both the ARM encoder and the fine-tune model; ``arm/Finetuning/models_mamba.py``):
  ``x + mixer(norm1(x))`` then ``x + mlp(norm2(x))`` with a SwiGLU MLP ``w3(silu(w1 x) ⊙ w2 x)`` of hidden
  width ``dim*4*2//3``; all norms LayerNorm in the release (whatever its ``rms_norm`` flag says);
* ``mamba`` (hustvl Vim): ``x + mixer(norm(x))``, no MLP (Vim's add-then-norm residual stream is the
  same function); Vim's checkpoints use ``norm="rms"``.

The mixer is :class:`amrg.models.mamba.MambaMixer` (``scan`` ``forward | bi | 4way``, ``backend``,
``scan_chunk``). State-dict names are the release's, so converted MambaXray-VL weights load strictly
(``python -m amrg.convert_mambaxray``): ``patch_embed.proj.*``, ``cls_token``, ``pos_embed``,
``layers.{i}.{norm1,norm2,norm}.*``, ``layers.{i}.mixer.{in_proj,conv1d{s},x_proj{s},dt_proj{s},A{s}_log,D{s},
out_proj}``, ``layers.{i}.mlp.{w1,w2,w3}.*``, ``norm_f.*``.

``forward_features`` returns ``[cls, patches]`` ``(B, 1+N, C)`` whatever ``cls_position`` (the middle token is
moved to the front on output; ``num_prefix_tokens = 1``), or the ``N`` patch tokens without a class token,
so :class:`amrg.models.vision.VisionEncoder` takes it like a ViT. A checkpoint whose ``pos_embed`` was
trained at another size is resampled (bicubic, the class slot kept) when it is loaded.

Registered names: ``amrg_vim_tiny_pz16`` (64 x 2, d_state 8: a CPU test size), ``amrg_vim_base_pz16``
(MambaXray-VL-B, 768 x 12) and ``amrg_vim_large_pz16`` (MambaXray-VL-L, 1024 x 24), each the fine-tune
architecture (4-way scan, middle class token, learned position embedding) unless kwargs say otherwise;
:data:`VARIANTS` has the ARM pre-training encoder's overrides.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, PatchEmbed, lecun_normal_, trunc_normal_
from timm.models import register_model
from torch import nn
from torch.utils.checkpoint import checkpoint

from .mamba import DEFAULT_CHUNK, MambaMixer

PATCH = 16
CLS_POSITIONS = ("none", "first", "middle")
POS_EMBEDS = ("learn", "sincos", "none")
BLOCKS = ("swiglu", "mamba")
NORMS = {"layer": nn.LayerNorm, "rms": nn.RMSNorm}
INIT_STD = 0.02  # trunc-normal std of cls_token / learned pos_embed (the release's)
SINCOS_TEMPERATURE = 10000.0

PRESETS = {  # name -> (embed_dim, depth, d_state)
    "tiny": (64, 2, 8),
    "base": (768, 12, 16),
    "large": (1024, 24, 16),
}
# architecture overrides of the released model families (kwargs of VisionMamba)
VARIANTS = {
    # MambaXray-VL stages 2-3 (CLIP, SFT): bimamba "v3", middle class token, learned pos_embed, 224 px
    "finetune": dict(scan="4way", cls_position="middle", pos_embed="learn", final_norm=True, img_size=224),
    # MambaXray-VL stage 1 (ARM encoder): one causal scan, no class token, fixed sin-cos, no norm_f, 192 px
    "pretrain": dict(scan="forward", cls_position="none", pos_embed="sincos", final_norm=False, img_size=192),
}


def swiglu_hidden(dim: int) -> int:
    """The release's SwiGLU width ``dim*4*2//3`` (2048 at 768, 2730 at 1024)."""
    return dim * 4 * 2 // 3


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE's 1-D sin-cos code: ``[sin(p ω), cos(p ω)]``, ω_i = T^(-i/(dim/2)); ``(P,) -> (P, dim)``."""
    omega = 1.0 / SINCOS_TEMPERATURE ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int]) -> torch.Tensor:
    """MAE's fixed 2-D position code (``get_2d_sincos_pos_embed``): half the channels code the column,
    half the row, row-major over the grid; ``(H*W, dim)`` float32."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return emb.float()


def cls_slot(cls_position: str, num_patches: int) -> int | None:
    """Sequence position of the class token (``middle``: N//2, as the release's ``token_position = M // 2``)."""
    return {"none": None, "first": 0, "middle": num_patches // 2}[cls_position]


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: tuple[int, int], cls_position: str) -> torch.Tensor:
    """``(1, P, C)`` -> the embedding of ``new_grid``: the patch part resized bicubically (square old grid,
    align_corners False, as the release's ``interpolate_pos_embed``), the class slot (``cls_position``) kept
    and re-inserted at its position in the new sequence."""
    has_cls = cls_position != "none"
    n_old = pos_embed.shape[1] - has_cls
    side = math.isqrt(n_old)
    if side * side != n_old:
        raise ValueError(f"pos_embed of {n_old} patch positions is not a square grid")
    if (side, side) == tuple(new_grid):
        return pos_embed
    old = cls_slot(cls_position, n_old)
    if old is None:
        cls, patches = None, pos_embed
    else:
        cls = pos_embed[:, old:old + 1]
        patches = torch.cat([pos_embed[:, :old], pos_embed[:, old + 1:]], dim=1)
    grid = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    patches = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    if cls is None:
        return patches
    at = cls_slot(cls_position, patches.shape[1])
    return torch.cat([patches[:, :at], cls, patches[:, at:]], dim=1)


class SwiGLU(nn.Module):
    """The release's MLP: ``w3(silu(w1 x) ⊙ w2 x)`` (biased linears, no sub-LN)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(dim, hidden), nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class VimBlock(nn.Module):
    """``x + mixer(norm1 x)`` then ``x + mlp(norm2 x)`` (``swiglu``), or ``x + mixer(norm x)`` (``mamba``)."""

    def __init__(self, dim: int, block: str, norm: str, norm_eps: float, drop_path: float, **mixer_kw):
        super().__init__()
        self.block = block
        self.mixer = MambaMixer(dim, **mixer_kw)
        if block == "swiglu":
            self.norm1, self.norm2 = NORMS[norm](dim, eps=norm_eps), NORMS[norm](dim, eps=norm_eps)
            self.mlp = SwiGLU(dim, swiglu_hidden(dim))
        else:
            self.norm = NORMS[norm](dim, eps=norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, grid: tuple[int, int], cls_index: int | None) -> torch.Tensor:
        if self.block == "mamba":
            return x + self.drop_path(self.mixer(self.norm(x), grid, cls_index))
        x = x + self.drop_path(self.mixer(self.norm1(x), grid, cls_index))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VisionMamba(nn.Module):
    """Vision Mamba encoder with MambaXray-VL's parameter names; timm's model interface (``forward_features``,
    ``forward_head``, ``num_features``, ``num_prefix_tokens``, ``pretrained_cfg``)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = PATCH, in_chans: int = 3,
                 num_classes: int = 0, embed_dim: int = 768, depth: int = 12, d_state: int = 16,
                 d_conv: int = 4, expand: int = 1, dt_rank: int | str = "auto", scan: str = "4way",
                 cls_position: str = "middle", pos_embed: str = "learn", block: str = "swiglu",
                 norm: str = "layer", norm_eps: float = 1e-5, final_norm: bool = True, backend: str = "auto",
                 scan_chunk: int = DEFAULT_CHUNK, drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 global_pool: str | None = None):
        super().__init__()
        for what, value, allowed in (("cls_position", cls_position, CLS_POSITIONS),
                                     ("pos_embed", pos_embed, POS_EMBEDS), ("block", block, BLOCKS),
                                     ("norm", norm, tuple(NORMS))):
            if value not in allowed:
                raise ValueError(f"unknown vim {what} {value!r}; choose from {list(allowed)}")
        self.in_chans, self.num_classes = in_chans, num_classes
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.cls_position = cls_position
        self.num_prefix_tokens = 0 if cls_position == "none" else 1
        self.global_pool = global_pool or ("token" if self.num_prefix_tokens else "avg")
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.grid = tuple(self.patch_embed.grid_size)
        n = self.patch_embed.num_patches
        self.cls_index = cls_slot(cls_position, n)
        if self.num_prefix_tokens:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            trunc_normal_(self.cls_token, std=INIT_STD)
        self.pos_embed_kind = pos_embed
        if pos_embed != "none":
            pe = torch.zeros(1, n + self.num_prefix_tokens, embed_dim)
            if pos_embed == "learn":
                trunc_normal_(pe, std=INIT_STD)
            else:  # fixed, but a state-dict entry as in the release (requires_grad False); class slot zero
                code = sincos_2d(embed_dim, self.grid)
                keep = [i for i in range(pe.shape[1]) if i != self.cls_index]
                pe[0, keep] = code
            self.pos_embed = nn.Parameter(pe, requires_grad=pos_embed == "learn")
        self.pos_drop = nn.Dropout(drop_rate)
        # the release's inter_dpr: block i gets linspace(0, rate, depth)[i - 1], block 0 none
        dpr = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList([
            VimBlock(embed_dim, block, norm, norm_eps, dpr[i], d_state=d_state, d_conv=d_conv, expand=expand,
                     dt_rank=dt_rank, scan=scan, backend=backend, scan_chunk=scan_chunk)
            for i in range(depth)])
        self.norm_f = NORMS[norm](embed_dim, eps=norm_eps) if final_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(depth)
        self.pretrained_cfg = self.default_cfg = {
            "input_size": (in_chans, *self.patch_embed.img_size), "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "num_classes": num_classes, "first_conv": "patch_embed.proj",
            "classifier": "head"}
        self._register_load_state_dict_pre_hook(self._resample_on_load)

    @torch.no_grad()
    def _init_weights(self, depth: int) -> None:
        """The release's init: lecun-normal patch conv; Linear biases zero (not dt_proj's); out_proj weights
        kaiming-uniform / sqrt(depth) (GPT-2's rescaled residual init); norms ones/zeros."""
        lecun_normal_(self.patch_embed.proj.weight)
        nn.init.zeros_(self.patch_embed.proj.bias)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and m.bias is not None and not getattr(m.bias, "_no_reinit", False):
                nn.init.zeros_(m.bias)
            if name.endswith("mixer.out_proj"):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
                m.weight /= math.sqrt(depth)

    def _resample_on_load(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "pos_embed"
        if hasattr(self, "pos_embed") and key in state_dict and state_dict[key].shape != self.pos_embed.shape:
            state_dict[key] = resample_pos_embed(state_dict[key], self.grid, self.cls_position)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_chans, H, W)`` -> ``[cls, patches]`` ``(B, 1+N, C)`` (or ``(B, N, C)`` without a class token)."""
        x = self.patch_embed(x)
        ci = self.cls_index
        if ci is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :ci], cls, x[:, ci:]], dim=1)
        if self.pos_embed_kind != "none":
            x = x + self.pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, self.grid, ci, use_reentrant=False)
            else:
                x = layer(x, self.grid, ci)
        x = self.norm_f(x)
        if ci:  # the class token to the front
            x = torch.cat([x[:, ci:ci + 1], x[:, :ci], x[:, ci + 1:]], dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def create_vim(preset: str, variant: str = "finetune", **kwargs) -> VisionMamba:
    """A preset (:data:`PRESETS`) of a released family (:data:`VARIANTS`); kwargs override either."""
    if preset not in PRESETS:
        raise ValueError(f"unknown vim preset {preset!r}; choose from {list(PRESETS)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown vim variant {variant!r}; choose from {list(VARIANTS)}")
    dim, depth, d_state = PRESETS[preset]
    return VisionMamba(**{"embed_dim": dim, "depth": depth, "d_state": d_state, **VARIANTS[variant], **kwargs})


def _timm_entry(preset: str, pretrained: bool, kwargs: dict) -> VisionMamba:
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    if pretrained:
        raise ValueError(f"amrg_vim_{preset}_pz16 has no hub weights: convert a MambaXray-VL checkpoint with "
                         "`python -m amrg.convert_mambaxray` and give the .safetensors as the checkpoint")
    return create_vim(preset, **kwargs)


@register_model
def amrg_vim_tiny_pz16(pretrained: bool = False, **kwargs) -> VisionMamba:
    """64 wide, 2 deep, d_state 8: the CPU test size of the MambaXray-VL architecture."""
    return _timm_entry("tiny", pretrained, kwargs)


@register_model
def amrg_vim_base_pz16(pretrained: bool = False, **kwargs) -> VisionMamba:
    """MambaXray-VL-B (the release's ``arm_base_pz16``): 768 wide, 12 deep."""
    return _timm_entry("base", pretrained, kwargs)


@register_model
def amrg_vim_large_pz16(pretrained: bool = False, **kwargs) -> VisionMamba:
    """MambaXray-VL-L (the release's ``arm_large_pz16``): 1024 wide, 24 deep."""
    return _timm_entry("large", pretrained, kwargs)
