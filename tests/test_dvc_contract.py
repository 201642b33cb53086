"""dvc.yaml keeps its promises, checked the way DVC's own tests check caching (no training needed):

(a) each stage's code deps equal its import closure inside the repository (from the source, by ast),
    and its outs are the directories amrg.layout names;
(b) changing one leaf key makes ``dvc status`` name exactly the stages that read it (a table of keys);
(c) on a fresh copy of the tree (with bytecode lying around), ``dvc status`` finds no changed code,
    data or params against the committed dvc.lock: only outputs that are not there yet.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from amrg.config import parse_params
from amrg.layout import STAGE_DIRS, Layout

from ._contract import ROOT, code_deps, import_closure
from ._workspace import make_workspace

DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
STAGES = DVC_YAML["stages"]


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_the_import_closure(stage):
    body = STAGES[stage]
    assert body["cmd"] == f"python -m stages.{stage}"
    closure, declared = import_closure(f"stages.{stage}"), code_deps(body["deps"])
    assert declared == closure, (f"{stage}: undeclared {sorted(closure - declared)}; "
                                 f"declared but never imported {sorted(declared - closure)}")


def test_outs_are_the_layout_and_data_paths_come_from_params():
    layout = Layout(Path("artifacts"))
    assert list(STAGES) == list(STAGE_DIRS)
    for stage, body in STAGES.items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in body["outs"]]
        assert outs == [layout.stage_dir(stage).as_posix()], stage
        data = [d for d in body["deps"] if not d.startswith(("amrg/", "stages/"))]
        assert all(d.startswith("artifacts/") or d.startswith("${") for d in data), (stage, data)
    # the data enters through the manifest of the always-changed index stage, listed uncached
    assert STAGES["index"]["always_changed"] is True
    assert STAGES["index"]["outs"] == [{layout.manifest.parent.as_posix(): {"cache": False}}]
    assert layout.manifest.parent.as_posix() in STAGES["preprocess"]["deps"]
    for m in DVC_YAML["metrics"]:  # every metrics file lies in some stage's output directory
        layout.stage_of(m)


def test_every_declared_param_is_a_leaf_key():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage, body in STAGES.items():
        for key in body["params"]:
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{stage}: {key} is not in params.yaml"
                node = node[part]
            assert not isinstance(node, dict) or key in DICT_PARAMS, f"{stage}: {key} is a section"


# params whose value is a mapping, tracked whole (timm / VisionMamba keyword overrides)
DICT_PARAMS = {"vision.kwargs", "pretrain_vision.kwargs", "pretrain_contrastive.vision_kwargs", "generator_vision.kwargs"}

# the knobs no stage tracks, because they cannot change a result (README: "The pipeline")
UNTRACKED = {
    "runtime.device", "runtime.num_threads",  # rounding only / speed
    "runtime.num_processes",  # N processes follow one process's gradient exactly (tests/test_distributed.py)
    "classifier.checkpoint_every", "generator.checkpoint_every",  # resumability only
    "pretrain_vision.checkpoint_every", "pretrain_contrastive.checkpoint_every",
    "decode.backend", "decode.compile",  # how the tokens are found, not which (tests/test_decoding.py)
    "llm.gradient_checkpointing",  # same gradients (tests/test_training.py)
    "cam.batch_size", "banks.visual.batch_size", "banks.report.batch_size", "evaluate.batch_size",
    "score.batch_size",  # inference batch sizes
    "data.chunk_images", "data.workers", "runtime.loader_workers",  # how preprocess / loaders run: same bytes
}


def _leaves(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out |= _leaves(v, key + ".") if isinstance(v, dict) and key not in DICT_PARAMS else {key}
    return out


def test_every_params_key_is_read_by_a_stage_or_untracked_with_a_reason():
    declared = {k for body in STAGES.values() for k in body["params"]}
    leaves = _leaves(yaml.safe_load((ROOT / "params.yaml").read_text()))
    assert not declared & UNTRACKED, sorted(declared & UNTRACKED)
    assert leaves == declared | UNTRACKED, (f"neither tracked nor untracked: {sorted(leaves - declared - UNTRACKED)}; "
                                            f"tracked but not in params.yaml: {sorted((declared | UNTRACKED) - leaves)}")


# key -> a new value, and the stages that must rerun (none: a knob that cannot change a result)
PER_KEY = [
    ("runtime.seed", 7, {"preprocess", "pretrain_vision", "pretrain_contrastive", "train_classifier", "mine_cam",
                         "encode_report_bank", "train_generator", "evaluate", "score"}),
    ("runtime.precision", "bf16", {"pretrain_vision", "pretrain_contrastive", "train_classifier", "mine_cam", "encode_visual_bank", "encode_report_bank",
                                   "train_generator", "evaluate"}),
    ("runtime.num_threads", 1, set()),
    ("runtime.num_processes", 2, set()),
    ("runtime.device", "cpu", set()),
    ("data.image_size", 128, {"preprocess"}),
    ("data.dataset", "annotation", {"index", "preprocess"}),
    ("data.annotation", "data/other.json", {"index", "preprocess"}),
    ("data.sections", "impression", {"preprocess"}),
    ("data.chunk_images", 7, set()),
    ("data.workers", 1, set()),
    ("runtime.loader_workers", 2, set()),
    ("labels.source", "dataset", {"preprocess"}),
    ("data.max_studies", 5, {"preprocess"}),
    ("labels.chexbert_tokenizer", "bert-base-uncased", {"preprocess", "train_generator", "evaluate"}),
    ("classifier.lr", 0.01, {"train_classifier"}),
    ("classifier.checkpoint_every", 7, set()),
    ("cam.tau", 0.6, {"mine_cam", "evaluate"}),
    ("cam.batch_size", 4, set()),
    ("banks.visual.batch_size", 4, set()),
    ("banks.report.size", 10, {"encode_report_bank"}),
    ("banks.index.nprobe", 4, {"train_generator"}),
    ("hopfield.beta", 8.0, {"train_generator"}),
    ("hopfield.scaling", "beta", {"train_generator"}),
    ("qformer.kind", "blip2", {"train_classifier"}),
    ("cam.max_patches", 6, {"mine_cam"}),
    ("banks.visual.unit", "patch", {"encode_visual_bank"}),
    ("banks.report.pooling", "cls", {"encode_report_bank"}),
    ("generator.views", "mean", {"train_generator"}),
    ("generator.word_dropout", 0.25, {"train_generator"}),
    ("decode.length_penalty", 2.0, {"train_generator", "evaluate"}),
    ("llm.gradient_checkpointing", True, set()),
    ("generator.epochs", 1, {"train_generator"}),
    ("generator.tvc_weight", 1.0, {"train_generator"}),
    ("generator.checkpoint_every", 7, set()),
    ("decode.num_beams", 1, {"train_generator", "evaluate"}),  # train_generator: select_decode=configured
    ("evaluate.bootstrap", 10, {"evaluate", "score"}),  # score's CIs use evaluate's resamples
    ("evaluate.reference_max_tokens", 60, {"evaluate"}),
    ("score.bertscore_layer", 3, {"score"}),
    ("score.batch_size", 8, set()),
    ("evaluate.batch_size", 4, set()),
    ("cam.backend", "native", {"mine_cam", "evaluate"}),
    ("decode.backend", "hf", set()),
    ("pretrain_vision.epochs", 3, {"pretrain_vision"}),
    ("pretrain_vision.checkpoint_every", 7, set()),
    ("pretrain_vision.name", "amrg_vim_base_pz16", {"pretrain_vision", "pretrain_contrastive"}),
    ("pretrain_contrastive.enabled", True, {"pretrain_contrastive"}),
    ("generator_vision.lr", 1.0e-4, {"train_generator"}),
    ("generator.query_tokens", False, {"train_generator"}),
]


def _set(raw: dict, key: str, value) -> dict:
    out = copy.deepcopy(raw)
    node = out
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    return out


def _changed_params(status: dict) -> dict[str, set[str]]:
    """stage -> the params keys ``dvc status`` says changed."""
    out: dict[str, set[str]] = {}
    for stage, entries in status.items():
        for entry in entries:
            if isinstance(entry, dict):
                for f, changes in entry.get("changed deps", {}).items():
                    if f == "params.yaml" and isinstance(changes, dict):
                        out.setdefault(stage, set()).update(changes)
    return out


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A copy of the tree as a fresh clone has it, plus bytecode a run leaves behind."""
    ws = make_workspace(tmp_path_factory.mktemp("fresh"), tiny=False, keep_lock=True)
    for pkg in ("amrg/data", "amrg/labels", "stages"):
        (ws / pkg / "__pycache__").mkdir(exist_ok=True)
        (ws / pkg / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    return ws


def _status(ws: Path) -> dict:
    from dvc.repo import Repo

    cwd = os.getcwd()
    try:
        os.chdir(ws)  # DVC resolves ${...} templating and params.yaml from the repo root
        with Repo(str(ws)) as repo:
            return repo.status()
    finally:
        os.chdir(cwd)


def test_each_leaf_key_reruns_exactly_its_stages(fresh):
    raw = yaml.safe_load((fresh / "params.yaml").read_text())
    original = (fresh / "params.yaml").read_text()
    problems = []
    try:
        for key, value, expected in PER_KEY:
            changed = _set(raw, key, value)
            parse_params(changed)  # the new value is a valid one
            (fresh / "params.yaml").write_text(yaml.safe_dump(changed, sort_keys=False))
            rerun = {s for s, keys in _changed_params(_status(fresh)).items() if key in keys}
            if rerun != expected:
                problems.append(f"{key}: dvc status names {sorted(rerun)}, expected {sorted(expected)}")
    finally:
        (fresh / "params.yaml").write_text(original)
    assert not problems, "\n".join(problems)


def test_fresh_clone_matches_the_committed_lock(fresh):
    status = _status(fresh)
    outs = {next(iter(d)) if isinstance(d, dict) else d for body in STAGES.values() for d in body["outs"]}
    problems = []
    for stage, entries in status.items():
        for entry in entries:
            if isinstance(entry, str):  # "always changed" etc.
                if not (stage == "index" and entry == "always changed"):
                    problems.append(f"{stage}: {entry}")
                continue
            for f, change in entry.get("changed deps", {}).items():
                if f == "params.yaml" or change != "deleted" or f not in outs:
                    problems.append(f"{stage}: changed dep {f}: {change}")
            for f, change in entry.get("changed outs", {}).items():
                if change not in ("deleted", "not in cache"):
                    problems.append(f"{stage}: changed out {f}: {change}")
    assert not problems, "dvc.lock does not match the tree (rerun `dvc repro` and commit dvc.lock):\n" + "\n".join(problems)
