"""Helpers shared by the test modules (import with ``from helpers import ...``; pytest puts
``tests/`` on ``sys.path``).

* :func:`snapshot` — everything an attention recorder could leave behind on a model;
* :func:`assert_close` — ``torch.testing.assert_close`` with the project's tolerances;
* :func:`tiny_params` — ``params.yaml`` cut down to a few experiments with tiny sizes, for
  running stages in a test (no DVC);
* :func:`run_stages` — the stage runner (``attnlab.pipeline.run``) on such a params file.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

#: Sizes that make every stage of these kinds take seconds (the same spirit as test_pipeline's).
TINY: dict[str, dict[str, Any]] = {
    "tokens": {"prepare": {"n": 120, "max_len": 12, "vocab_size": 16, "n_rules": 3},
               "model": {"d_model": 16, "dim_feedforward": 16},
               "train": {"epochs": 1},
               "aggregate": {"min_count": 1},
               "evaluate": {"resamples": 20, "steps": 3, "sanity": {"samples": 2, "independent": False}},
               "report": {"examples": 1, "heatmap_tokens": 6}},
}


def snapshot(model: torch.nn.Module) -> tuple:
    """Everything a recorder could leave behind: per module its type, attributes and hooks,
    the MHA fast-path switch and the torch-function mode stack."""
    return ([(n, type(m), sorted(m.__dict__), len(m._forward_hooks), len(m._forward_pre_hooks),
              len(m._backward_hooks), len(m._forward_hooks_with_kwargs),
              len(getattr(m, "_forward_hooks_always_called", {})))
             for n, m in model.named_modules()],
            torch.backends.mha.get_fastpath_enabled(), torch._C._len_torch_function_stack())


def assert_close(a: Any, b: Any, atol: float = 1e-5, rtol: float = 1e-5, equal_nan: bool = True) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, equal_nan=equal_nan)


def _merge(into: dict, more: dict) -> dict:
    for key, value in more.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def tiny_params(experiments: Iterable[str] = ("tokens",), **changes: dict) -> dict:
    """``params.yaml`` with only ``experiments`` (each with :data:`TINY` sizes and
    ``changes[name]`` merged in), no externals, on the CPU."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    experiments = list(experiments)
    out = {"experiments": experiments, "externals": {}, "device": "cpu"}
    for name in experiments:
        out[name] = _merge(_merge(copy.deepcopy(params[name]), TINY.get(name, {})), changes.get(name, {}))
    return out


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def run_stages(stages: Iterable[str], experiment: str, params_file: Path, data: Path) -> None:
    """Run ``stages`` of ``experiment`` in order through the stage runner, as
    ``python stages/<stage>.py <experiment> --params ... --data ...`` would (no DVC)."""
    from attnlab.pipeline import run

    for stage in stages:
        run(stage, [experiment, "--params", str(params_file), "--data", str(data)], progress=False)
