"""Convert a released MambaXray-VL checkpoint (CXPMRG-Bench, seed 002; issue 17) to a safetensors file that
:class:`amrg.models.vim.VisionMamba` loads strictly.

    python -m amrg.convert_mambaxray IN.pth OUT.safetensors [--preset base|large|tiny]
        [--variant finetune|pretrain] [--img-size 224] [--kwargs '{"scan": "bi"}']

The release (Event-AHU/Medical_Image_Analysis, ``CXPMRG_Bench_MambaXray_VL/``) saves torch pickles:
``{"model": state, "config": hparams, "epoch", "step"}`` from ``save_checkpoint`` of the CLIP / SFT models
(state keys ``visual_encoder.*`` beside the LLM projection or text encoder), and MAE-style
``{"model", "optimizer", "epoch", "scaler", "args": argparse.Namespace}`` from ARM pre-training (the
encoder's keys bare, beside the ARM decoder). The file is read with ``torch.load(weights_only=True)``:
no code runs. The only classes allowed beyond tensors and plain containers are the metadata wrappers
those files pickle (``argparse.Namespace``; Lightning's ``AttributeDict``, read as a plain dict), for
this one load only. Everything else is refused: an unknown pickled class, and any non-tensor entry in
the state dict.

The state is then the encoder's: the DDP ``module.`` and the ``visual_encoder.`` prefixes are stripped
(with ``visual_encoder.`` keys present, every other key belongs to another module and is dropped), the
ARM decoder (``dec_block``, ``enc2dec``, ``norm_1..4``, ``ar_*``, ``dec_pos_embed``, ``mask``) and a
classification ``head`` are dropped, and the rest must match the preset's state dict exactly (names and
shapes; ``pos_embed`` is resampled to ``--img-size``). ``--variant pretrain`` is the ARM encoder (one
causal scan, no class token, sin-cos positions, no ``norm_f``, 192 px); ``finetune`` (default) the 4-way
model of stages 2-3 (224 px). Not done: copying a pre-trained encoder's forward-scan weights into the
``_b``/``_c``/``_c_b`` directions (the release's CLIP initialisation).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .io import save_tensors
from .models.vim import PRESETS, VARIANTS, create_vim, resample_pos_embed


class ConversionError(ValueError):
    pass


# Lightning's AttributeDict (a dict subclass) is read as a plain dict
METADATA_CLASSES = [argparse.Namespace] + [(dict, f"{m}.AttributeDict") for m in (
    "lightning.fabric.utilities.data", "lightning_fabric.utilities.data", "pytorch_lightning.utilities.parsing")]
STATE_KEYS = ("model", "state_dict", "module")  # where wrappers keep the state dict, first found wins
PREFIXES = ("module.", "visual_encoder.")
ENCODER_PREFIX = "visual_encoder."
# keys of the ARM pre-training model (pretrain/models_pretrain.py) outside its encoder, and a classifier head
NON_ENCODER = ("dec_block.", "enc2dec.", "norm_1.", "norm_2.", "norm_3.", "norm_4.", "ar_norm.", "ar_pred.",
               "ar_token", "dec_pos_embed", "mask", "head.")


def load_release_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict of a release checkpoint (every value a tensor) and the names of the metadata entries
    beside it, read with ``weights_only=True`` and the metadata wrappers allowed for this load only."""
    try:
        with torch.serialization.safe_globals(METADATA_CLASSES):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError and friends: say why and refuse
        raise ConversionError(f"{path}: refused by torch.load(weights_only=True): {exc}") from exc
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: expected a dict, got {type(obj).__name__}")
    metadata: list[str] = []
    for key in STATE_KEYS:
        if isinstance(obj.get(key), dict):
            metadata = sorted(str(k) for k in obj if k != key)
            obj = obj[key]
            break
    bad = [f"{k} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: the state dict has non-tensor entries: {bad[:5]}")
    return obj, metadata


def strip_prefix(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
    return key


def encoder_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The encoder's tensors under the model's names, and counts of what was dropped (by reason)."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    dropped = {"other_modules": 0, "arm_decoder_or_head": 0}
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        dropped["other_modules"] = sum(not k.startswith(ENCODER_PREFIX) for k in state)
        state = {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    out = {}
    for k, v in state.items():
        name = strip_prefix(k)
        if name.startswith(NON_ENCODER):
            dropped["arm_decoder_or_head"] += 1
        else:
            out[name] = v
    return out, dropped


def check_against(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with ``pos_embed`` resampled to the model's grid; refuses missing, unexpected or misshapen keys."""
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    if missing or unexpected:
        raise ConversionError(f"keys do not match the preset: {len(missing)} missing {missing[:5]}, "
                              f"{len(unexpected)} unexpected {unexpected[:5]}")
    if "pos_embed" in state and state["pos_embed"].shape != want["pos_embed"].shape:
        state = {**state, "pos_embed": resample_pos_embed(state["pos_embed"], model.grid, model.cls_position)}
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(want[k].shape)}" for k in want if state[k].shape != want[k].shape]
    if wrong:
        raise ConversionError(f"{len(wrong)} tensors have the wrong shape for the preset: {wrong[:5]}")
    return state


def convert(src: str | Path, dst: str | Path, preset: str = "base", variant: str = "finetune",
            img_size: int | None = None, **kwargs) -> dict:
    """Read ``src``, check it against ``create_vim(preset, variant, img_size, **kwargs)``, write ``dst``."""
    state, metadata = load_release_checkpoint(src)
    state, dropped = encoder_state(state)
    arch = {**kwargs, **({"img_size": img_size} if img_size else {})}
    with torch.device("meta"):  # names and shapes only, no weights allocated
        model = create_vim(preset, variant, **arch)
    state = check_against(model, state)
    seen, out = set(), {}
    for k, v in state.items():  # safetensors refuses tensors that share storage
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    spec = {"preset": preset, "variant": variant, **{k: v for k, v in arch.items()}}
    save_tensors(dst, out, metadata={"source": Path(src).name, "vim": json.dumps(spec, sort_keys=True)})
    return {"out": str(dst), "tensors": len(out), "parameters": int(sum(v.numel() for v in out.values())),
            "dropped": dropped, "metadata_entries": metadata, **spec}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m amrg.convert_mambaxray", description=__doc__.splitlines()[0])
    ap.add_argument("src", help="released checkpoint (.pth)")
    ap.add_argument("dst", help="output .safetensors")
    ap.add_argument("--preset", default="base", choices=sorted(PRESETS))
    ap.add_argument("--variant", default="finetune", choices=sorted(VARIANTS))
    ap.add_argument("--img-size", type=int, default=None, help="resample pos_embed to this size (default: the variant's)")
    ap.add_argument("--kwargs", default="{}", help="JSON of further VisionMamba arguments (e.g. scan, block)")
    args = ap.parse_args(argv)
    try:
        summary = convert(args.src, args.dst, args.preset, args.variant, args.img_size, **json.loads(args.kwargs))
    except ConversionError as exc:
        print(f"convert failed: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
