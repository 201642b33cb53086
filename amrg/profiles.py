"""Profiles: a named configuration (``configs/paper-*.yaml``, ``configs/official-*.yaml``) written as an overlay
of the embedded default ``params.yaml``: only the keys that differ, plus an optional ``extends: <profile>``
(a file name in the same folder, ``.yaml`` optional) whose keys are applied first.

    params.yaml  <-  paper-mimic  <-  paper-iu           (paper-iu.yaml holds only what IU X-ray changes)

:func:`materialise` resolves the chain root first, applies each overlay with :func:`amrg.config.merge_overlay`
over a copy of the base and validates the result with :func:`amrg.config.parse_params` (unknown keys, types,
ranges: one :class:`amrg.config.ParamsError` naming every problem). A mapping-valued key (``vision.kwargs``) is
replaced, not merged, so ``kwargs: {}`` clears the default's tiny-Swin preset. ``python -m amrg.cli profile
configs/official-iu.yaml -o params.yaml`` writes the full file, headed by :data:`HEADER`; such a file is
refused as the base of another profile (it is not the embedded default any more: restore params.yaml,
e.g. ``git checkout params.yaml``, or pass ``--base``).
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from .config import Params, ParamsError, merge_overlay, parse_params

EXTENDS = "extends"
HEADER = "# amrg profile:"  # the first line of a materialised profile


def chain(profile: str | Path) -> list[Path]:
    """The profile files of ``profile``, root first (``[paper-mimic.yaml, paper-iu.yaml]``)."""
    out: list[Path] = []
    path: Path | None = Path(profile)
    while path is not None:
        if path.resolve() in [p.resolve() for p in out]:
            raise ParamsError(f"profile {profile}: `extends` loops back to {path}")
        out.append(path)
        parent = read_overlay(path).get(EXTENDS)
        if parent is not None and not isinstance(parent, str):
            raise ParamsError(f"{path}: `extends` must name one profile, got {parent!r}")
        path = None if parent is None else path.parent / (parent if parent.endswith(".yaml") else f"{parent}.yaml")
    return out[::-1]


def read_overlay(path: Path) -> dict[str, Any]:
    """One profile file as a mapping (``extends`` included)."""
    if not path.is_file():
        raise ParamsError(f"profile {path} not found")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"profile {path} must be a mapping, got {type(raw).__name__}")
    return raw


def apply_overlay(base: dict[str, Any], overlay: dict[str, Any], cls: type = Params) -> dict[str, Any]:
    """``base`` with ``overlay`` written over it (:func:`amrg.config.merge_overlay`; ``base`` is updated); a
    key whose field in ``cls`` is a mapping but not a section (``vision.kwargs``) takes the overlay's value whole."""
    hints = typing.get_type_hints(cls)
    for key, value in overlay.items():
        hint = hints.get(key)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict) and isinstance(base.get(key), dict):
            apply_overlay(base[key], value, hint)
        elif isinstance(value, dict) and key in base:
            base.pop(key)  # a mapping-valued leaf (or a bad key parse_params reports): replaced, not merged
    return merge_overlay(base, overlay)


def materialise(profile: str | Path, base: str | Path = "params.yaml") -> tuple[dict[str, Any], Params]:
    """The full params of ``profile`` over ``base`` (the embedded default): the raw mapping and its validated
    :class:`~amrg.config.Params`. Raises :class:`~amrg.config.ParamsError` on an unknown key, a bad value, a
    loop of ``extends`` or a base that is itself a materialised profile."""
    base = Path(base)
    if not base.is_file():
        raise ParamsError(f"{base} not found (run from the repository root, or pass the embedded default)")
    text = base.read_text(encoding="utf-8")
    if text.startswith(HEADER):
        raise ParamsError(f"{base} is itself a materialised profile ({text.splitlines()[0][len(HEADER):].strip()}), "
                          "not the embedded default: restore it (git checkout params.yaml) or pass another base")
    raw = yaml.safe_load(text) or {}
    for path in chain(profile):
        overlay = {k: v for k, v in read_overlay(path).items() if k != EXTENDS}
        try:
            raw = apply_overlay(raw, copy.deepcopy(overlay))
            parse_params(raw)  # each link must be valid alone: the error names the file that broke it
        except ParamsError as exc:
            raise ParamsError(f"profile {path}: {exc}") from None
    return raw, parse_params(raw)


def render(profile: str | Path, raw: dict[str, Any], base: str | Path = "params.yaml") -> str:
    """A materialised profile as a params file: :data:`HEADER` with the chain, then every key."""
    links = " <- ".join(p.as_posix() for p in chain(profile))
    head = (f"{HEADER} {Path(profile).as_posix()}\n# = {Path(base).as_posix()} <- {links}\n"
            f"# written by `python -m amrg.cli profile {Path(profile).as_posix()}`: edit the profile and write it\n"
            "# again rather than this file (the keys' comments: params.yaml and the profiles).\n")
    return head + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True, width=120)
