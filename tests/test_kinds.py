"""One map of kinds: a kind's module owns its params schema; ``attnlab.config`` builds the map
from :data:`attnlab.experiments.KINDS`, keeps every old name, and validates without torch."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import attnlab.config as config
from attnlab.experiments import KINDS
from attnlab.schema import Section

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "attnlab"

#: Every name ``src/attnlab/config.py`` defined before the kinds took their schemas (ee83260):
#: the public API keeps them all.
OLD_NAMES = [
    "ConfigError", "did_you_mean", "Section", "MotionPrepare", "HeadsDivideWidth", "EncoderModel", "Train", "Extract",
    "aggregate_fits_store", "MethodsSection", "HeadOptions", "SequenceOptions", "InputOptions", "SampleCap",
    "Explain", "SpaceTimeExplain", "Sanity", "Knockout", "Evaluate", "ClassifierEvaluate", "Report", "NoSection",
    "ClassifierParams", "MotionParams", "TokensPrepare", "CausalModel", "Aggregate", "TokensExplain",
    "TokensEvaluate", "TokensReport", "TokensParams", "FramesPrepare", "VideoPrepare", "SpaceTimeModel",
    "FramesParams", "VideoParams", "Stream", "FusionPrepare", "FusionModel", "FusionTrain", "FusionExplain",
    "FusionEvaluate", "FusionParams", "PretrainedPrepare", "PretrainedModel", "PretrainedExplain",
    "PretrainedParams", "ExternalPrepare", "ExternalModel", "ExternalExplain", "ExternalParams", "_DEVICE",
    "check_device", "resolve_device", "stage_device", "EXPERIMENTS", "TOP_LEVEL", "Params", "_instance",
    "_knockout_method", "_one_line", "parse_params", "_check_externals", "load_params", "flatten",
]


def _fresh(code: str, **kw) -> str:
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **kw.pop("env", {})}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          **{"cwd": ROOT, **kw})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


# --------------------------------------------------------------------------- (a) no torch
def test_loading_params_and_the_kinds_imports_no_torch():
    out = _fresh("""
        import sys
        from attnlab.config import load_params
        p = load_params("params.yaml")
        [p.experiment(e) for e in p.experiments]
        from attnlab.experiments import KINDS
        print(sorted(m for m in ("torch", "attnlab.items", "attnlab.models", "attnlab.data", "attnlab.training")
                     if m in sys.modules), len(KINDS))
    """)
    assert out == f"[] {len(KINDS)}"


# --------------------------------------------------------------------------- (b) one map
def test_the_map_of_kinds_is_the_kinds_own_schemas():
    assert config.EXPERIMENTS == {name: kind.params for name, kind in KINDS.items()}
    assert list(KINDS) == ["motion", "tokens", "frames", "video", "fusion", "external", "pretrained"]
    assert [kind.order for kind in KINDS.values()] == sorted(kind.order for kind in KINDS.values())
    for name, kind in KINDS.items():
        assert kind.name == name and issubclass(kind.params, Section)
        assert kind.params.__module__ == kind.__module__, f"{name}: its schema lives outside its module"


def _kind_schema_classes() -> set[str]:
    """The names of the Section classes the kind modules define themselves."""
    return {obj.__name__ for kind in KINDS.values() for obj in vars(sys.modules[kind.__module__]).values()
            if isinstance(obj, type) and issubclass(obj, Section) and obj.__module__ == kind.__module__}


def test_config_names_no_kind_schema_except_to_re_export_it():
    tree = ast.parse((SRC / "config.py").read_text())
    imports = {id(n) for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
               for n in ast.walk(node)}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in imports}
    used |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    defined = _kind_schema_classes()
    assert {"MotionParams", "FramesPrepare", "ExternalParams", "SpaceTimeExplain"} <= defined
    assert used & defined == set()
    assert not any(isinstance(n, ast.ClassDef) and n.name in defined for n in ast.walk(tree))


def test_a_new_kind_is_one_module(tmp_path):
    """A throw-away kind added as one module of a copy of the package: params validation
    knows it, in its ``order``, with no edit of ``config`` or ``experiments/__init__``."""
    copy = tmp_path / "src" / "attnlab"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "experiments" / "toy.py").write_text(textwrap.dedent('''
        from pydantic import Field

        from attnlab.experiments.base import ClassifierExperiment
        from attnlab.schema import ClassifierParams, EncoderModel, Section


        class ToyPrepare(Section):
            n: int = Field(10, gt=0)


        class ToyParams(ClassifierParams):
            prepare: ToyPrepare = ToyPrepare()
            model: EncoderModel = EncoderModel()


        class ToyExperiment(ClassifierExperiment):
            name = "toy"
            params = ToyParams
            order = 15
    '''))
    out = _fresh("""
        import sys
        import attnlab.config as c
        from attnlab.config import ConfigError, parse_params
        assert c.__file__.startswith(%r), c.__file__
        p = parse_params({"experiments": ["toy"], "toy": {"prepare": {"n": 3}}})
        print(list(c.EXPERIMENTS)[:3], p.experiment("toy").prepare.n, type(p.experiment("toy")).__module__)
        try:
            parse_params({"experiments": ["toy"], "toy": {"prepare": {"m": 3}}})
        except ConfigError as err:
            print(err)
        print("torch" in sys.modules)
    """ % str(copy), cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "src")})
    assert out.splitlines() == [
        "['motion', 'toy', 'tokens'] 3 attnlab.experiments.toy",
        "params.yaml: toy.prepare: unknown key 'm'; accepted: n",
        "False"]


# --------------------------------------------------------------------------- (c) the old names
@pytest.mark.parametrize("name", OLD_NAMES)
def test_every_old_name_is_still_importable_from_config(name):
    assert hasattr(config, name)


def test_the_old_names_are_the_same_objects_and_import_without_warnings():
    out = _fresh(f"""
        import warnings
        warnings.simplefilter("error")
        from attnlab.config import {", ".join(OLD_NAMES)}
        import attnlab.experiments.motion as motion, attnlab.schema as schema
        assert MotionParams is motion.MotionParams and Train is schema.Train and stage_device is schema.stage_device
        print("ok")
    """)
    assert out == "ok"
