"""Shared fixtures: tiny pre-trained base models (built once into the cache) and the synthetic data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from metaedit.data.datamodule import SyntheticEditData
from metaedit.editors.io import build_editor
from metaedit.models.loading import load_base_model, load_model_config

ROOT = Path(__file__).resolve().parents[1]
WORLD = {"seed": 0, "n_subjects": 200}


@pytest.fixture(scope="session")
def tiny():
    """tiny(name) -> (model, tokenizer, model_cfg); each tiny model is loaded once per session."""
    loaded: dict[str, tuple] = {}

    def get(name: str):
        if name not in loaded:
            cfg = load_model_config(name)
            model, tok = load_base_model(cfg)
            loaded[name] = (model, tok, cfg)
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "synthetic"


@pytest.fixture(scope="session")
def make_data(data_dir):
    def make(formatter, **kwargs) -> SyntheticEditData:
        return SyntheticEditData(world=WORLD, name="synthetic", data_dir=str(data_dir), formatter=formatter, **kwargs)

    return make


@pytest.fixture(scope="session")
def make_editor(tiny):
    def make(method: str, model_name: str = "tiny-gpt2", **hparams):
        model, tok, cfg = tiny(model_name)
        return build_editor(method, model, cfg, hparams, tokenizer=tok)

    return make


def run_cli(args: list[str], tmp_path: Path, timeout: int = 600, **kw):
    """Run train.py / evaluate.py with all outputs under tmp_path; returns CompletedProcess."""
    import subprocess

    env = {**kw.pop("env", os.environ), "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, *args, f"paths.root_dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, **kw,
    )
