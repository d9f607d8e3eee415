"""`import frugal` prefers a passive OpenMP wait policy (frugal/__init__.py), and the peers benchmark
gives llama.cpp and transformers their defaults back (frugal.bench.worker.worker_env)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PRINT_POLICY = "import frugal, os; print(os.environ.get('OMP_WAIT_POLICY'))"


def _policy_after_import(env: dict[str, str], code: str = PRINT_POLICY) -> str:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def clean_env():
    env = dict(os.environ)
    for key in ("OMP_WAIT_POLICY", "FRUGAL_OMP_DEFAULTS", "FRUGAL_SET_OMP_WAIT_POLICY"):
        env.pop(key, None)
    return env


def test_import_sets_passive_policy(clean_env):
    assert _policy_after_import(clean_env) == "PASSIVE"


def test_user_choice_and_opt_out_are_kept(clean_env):
    assert _policy_after_import({**clean_env, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    assert _policy_after_import({**clean_env, "FRUGAL_OMP_DEFAULTS": "1"}) == "None"
    # torch first: libgomp has read the environment already, so frugal leaves it alone.
    assert _policy_after_import(clean_env, "import torch; " + PRINT_POLICY) == "None"


def test_peer_workers_get_openmp_defaults(clean_env, monkeypatch):
    import frugal
    from frugal.bench.worker import worker_env

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setenv(frugal.OMP_POLICY_MARKER, "1")  # set by frugal, not by the user
    for engine in ("llama.cpp", "hf"):
        env = worker_env(engine)
        assert "OMP_WAIT_POLICY" not in env and env["FRUGAL_OMP_DEFAULTS"] == "1"
    assert worker_env("frugal")["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.delenv(frugal.OMP_POLICY_MARKER)  # the user's own choice reaches every worker
    assert worker_env("hf")["OMP_WAIT_POLICY"] == "PASSIVE"


def test_package_exports_survive_the_early_environment_setup():
    """The imports after `_prefer_passive_openmp()` still provide every public name."""
    import frugal

    for name in frugal.__all__:
        assert getattr(frugal, name) is not None, name
