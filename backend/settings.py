"""The backend's settings: the one module that reads the environment.

Names follow label-studio-ml where it has one (LABEL_STUDIO_URL,
LABEL_STUDIO_API_KEY, MODEL_DIR, BASIC_AUTH_USER/PASS, LOG_LEVEL, WORKERS,
THREADS, PORT); ours are prefixed with nothing and listed in the README.
`Settings.from_env()` validates everything at start and names the bad variable.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Callable, Mapping

from model.config import (TRAINABLE, BudgetConfig, CompressionConfig, EarlyStoppingConfig,
                          InputConfig, Int8TuneConfig, TrainConfig, ViewsConfig)


# Loggers of libraries that print URLs (with any user:password in them) at INFO.
QUIET_LOGGERS = ('httpx', 'httpcore', 'urllib3')


def configure_logging(level: str) -> None:
  """The one logging set-up of the service's processes (server, workers)."""
  import logging
  logging.basicConfig(level=level, format='%(asctime)s %(levelname)s %(name)s: %(message)s')
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)


class SettingsError(ValueError):
  """A bad environment variable; the message names it and what it should be."""


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the service can be told, with its defaults."""

  model_dir: Path = Path('models')
  label_studio_url: str | None = None
  label_studio_api_key: str | None = dataclasses.field(default=None, repr=False)
  basic_auth_user: str | None = None
  basic_auth_pass: str | None = dataclasses.field(default=None, repr=False)
  log_level: str = 'INFO'
  host: str = '0.0.0.0'
  port: int = 9090
  workers: int = 1
  threads: int = 8
  # Regions below this score are not sent to Label Studio. None: each version's
  # own per label (`model.score_thresholds`), else `predictor.DEFAULT_THRESHOLD`.
  score_threshold: float | None = None
  # Which .tflite of a version serves predictions: int8 (faster) or float.
  model_variant: str = 'int8'
  # Images fetched at once for one /predict batch.
  fetch_concurrency: int = 8
  # Largest image we download, in bytes, and decode, in pixels (checked
  # before decoding: a small PNG can hold a huge image).
  max_image_bytes: int = 50_000_000
  max_image_pixels: int = 50_000_000
  # Largest request body accepted (a /predict of thousands of tasks is a few MB).
  max_request_bytes: int = 64_000_000
  # The downloaded-image cache under MODEL_DIR; least recently used images go first.
  image_cache_bytes: int = 4_000_000_000
  # One image's download, redirects included, in all (not per read).
  image_fetch_timeout_s: float = 30.0
  # /predict answers within this; images not there by then get an empty
  # prediction (Label Studio gives up on a /predict after 100 s).
  predict_deadline_s: float = 60.0
  # With the background completion on (`refreshes`), /predict answers at most
  # this many tasks and leaves the rest to it: Label Studio saves a /predict's
  # answers one at a time in the user's request, the API in bulk.
  predict_max_answered: int = 500
  # Hosts (names, addresses, networks) images may come from although they are
  # private or local; LABEL_STUDIO_URL's host always may (backend/image_sources.py).
  image_hosts_allowed: tuple[str, ...] = ()
  # The folder task images may name by local path (or file://); None: no local paths.
  local_files_document_root: Path | None = None
  # After each published version, predict the project's unannotated tasks in
  # the background and store the predictions in Label Studio (needs
  # LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY); also completes a /predict's
  # tasks left out at its deadline.
  refresh_predictions: bool = True
  # Annotation events that trigger a training run (0: only START_TRAINING does),
  # and the quiet time after the last of them before it starts.
  train_every_n_annotations: int = 5
  train_debounce_s: float = 10.0
  # Cap on a training run's steps (the budget grows with the images up to it),
  # and what trains: 'heads', 'top' (heads + top of the extractor), 'upper' (+ its
  # stride-16 blocks), 'most' (all but the stride-8 stem), 'all'; None ('auto'):
  # most under 100 images where a label is new to the base, where the last version
  # mixed up labels, or with many images of small boxes; else upper with many images
  # or mostly small boxes, else top (TrainConfig.choose_trainable).
  train_max_steps: int = BudgetConfig.max
  # From this many labeled images on, a tenth are held out for early stopping and
  # held-out mAP instead of training (0: never).
  train_hold_out_from: int = EarlyStoppingConfig.min_images
  train_mode: str | None = TrainConfig.trainable
  # Model input side: larger finds smaller objects, at a cost in time.
  # None ('auto'): chosen from the sizes of the labeled boxes.
  train_input_size: int | None = InputConfig.size
  # Zoom-outs (each image also shrunk onto a canvas, for objects smaller in
  # new images than in the labeled ones) as a fraction of the random crops;
  # then quantization-aware training for the int8 file, or pruning to this
  # fraction of zero weights for smaller downloads (both need TRAIN_MODE other than heads).
  train_zoom_out: float = ViewsConfig.zoom_out
  # ... of which this share are 2x2 mosaics of the image's own crops, the rest zoom-outs.
  train_mosaic: float = ViewsConfig.mosaic
  train_qat: bool = CompressionConfig.quantization_aware
  train_prune: float = CompressionConfig.prune_sparsity
  # Without either: a quantization-aware tail for the int8 file where it loses to the
  # float one on the held-out images (model.int8_tune); off, int8 is post-training only.
  train_int8_tail: bool = Int8TuneConfig.tolerance is not None
  # Where training jobs run: 'inprocess' (a thread of the serving process, the
  # embedded default) or 'redis' (RQ workers, `python -m backend worker`).
  training_queue: str = 'inprocess'
  # The in-process training thread imports TensorFlow and traces the augmentation
  # when the backend starts (~10 s in the background, ~0.8 GB), not when the first
  # Start Training waits for it; off, a process that only serves never loads TensorFlow.
  train_warm_up: bool = True
  redis_url: str = 'redis://localhost:6379/0'
  # A worker's hold on a project expires this long after the worker dies.
  training_lock_ttl_s: float = 60.0
  # An RQ training job that runs longer than this is stopped.
  training_timeout_s: int = 3600

  @property
  def auth_enabled(self) -> bool:
    return self.basic_auth_user is not None

  @property
  def label_studio_configured(self) -> bool:
    """Whether the backend may call Label Studio's API (both settings given)."""
    return bool(self.label_studio_url and self.label_studio_api_key)

  @property
  def refreshes(self) -> bool:
    """Whether new versions' and late /predict tasks' predictions go to Label Studio."""
    return self.refresh_predictions and self.label_studio_configured

  def train_config(self) -> TrainConfig:
    return TrainConfig(trainable=self.train_mode).with_overrides({
        'budget.max': self.train_max_steps, 'input.size': self.train_input_size,
        'views.zoom_out': self.train_zoom_out, 'views.mosaic': self.train_mosaic,
        'compression.quantization_aware': self.train_qat,
        'compression.prune_sparsity': self.train_prune,
        'early_stopping.min_images': self.train_hold_out_from or None,
        'int8_tune.tolerance': Int8TuneConfig.tolerance if self.train_int8_tail else None})

  @classmethod
  def from_env(cls, environ: Mapping[str, str] | None = None) -> 'Settings':
    """Reads and validates the environment (`VARIABLES`).

    Raises:
      SettingsError: naming the first bad variable.
    """
    env = os.environ if environ is None else environ
    values = {}
    for variable in VARIABLES:
      name, raw = variable.lookup(env)
      if raw is None:
        continue
      try:
        values[variable.field] = variable.parse(raw)
      except ValueError as error:
        raise SettingsError(f'{name}={raw!r}: {error}') from None
    if ('basic_auth_user' in values) != ('basic_auth_pass' in values):
      raise SettingsError('BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together')
    settings = cls(**values)
    try:
      settings.train_config()
    except ValueError as error:  # a combination the detector refuses, e.g. QAT with heads only
      raise SettingsError(f'TRAIN_MODE/TRAIN_INPUT_SIZE/TRAIN_QAT/TRAIN_PRUNE: {error}') from None
    return settings


# ------------------------------------------------------------- how each is read


def _integer(low: int, high: int) -> Callable[[str], int]:
  def parse(raw: str) -> int:
    try:
      value = int(raw)
    except ValueError:
      raise ValueError('not a whole number') from None
    if not low <= value <= high:
      raise ValueError(f'must be between {low} and {high}')
    return value
  return parse


def _real(low: float, high: float) -> Callable[[str], float]:
  def parse(raw: str) -> float:
    try:
      value = float(raw)
    except ValueError:
      raise ValueError('not a number') from None
    if not math.isfinite(value) or not low <= value <= high:
      raise ValueError(f'must be a number between {low:g} and {high:g}')
    return value
  return parse


def _choice(*options: str) -> Callable[[str], str]:
  def parse(raw: str) -> str:
    if raw.lower() not in options:
      raise ValueError(f'must be {", ".join(options[:-1])} or {options[-1]}')
    return raw.lower()
  return parse


def _upper_choice(*options: str) -> Callable[[str], str]:
  lower = _choice(*(o.lower() for o in options))
  return lambda raw: lower(raw).upper()


def _boolean(raw: str) -> bool:
  return _choice('true', 'false', '1', '0')(raw) in ('true', '1')


def _url(*schemes: str) -> Callable[[str], str]:
  def parse(raw: str) -> str:
    if not raw.startswith(schemes):
      raise ValueError(f'must start with {" or ".join(schemes)}')
    return raw.rstrip('/')
  return parse


def _names(raw: str) -> tuple[str, ...]:
  """A comma-separated list."""
  return tuple(name.strip().lower() for name in raw.split(',') if name.strip())


def _folder(raw: str) -> Path:
  path = Path(raw)
  if not path.is_absolute() or not path.is_dir():
    raise ValueError('must be an existing folder, given by its absolute path')
  return path


def _train_mode(raw: str) -> str | None:
  mode = _choice('auto', *TRAINABLE)(raw)
  return None if mode == 'auto' else mode


def _input_size(raw: str) -> int | None:
  return None if raw.lower() == 'auto' else _integer(128, 1024)(raw)


@dataclasses.dataclass(frozen=True)
class Variable:
  """One environment variable: the `Settings` field it sets and how its text is read.

  `parse` raises ValueError with what the value should be; `aliases` are read
  when the name itself is unset.
  """

  name: str
  field: str
  parse: Callable[[str], object] = str
  aliases: tuple[str, ...] = ()

  def lookup(self, env: Mapping[str, str]) -> tuple[str, str | None]:
    """(the name found, its stripped value), or (name, None) when unset or empty."""
    for name in (self.name, *self.aliases):
      value = env.get(name, '').strip()
      if value:
        return name, value
    return self.name, None


# Every variable the backend reads; the README and .env.example list them all.
VARIABLES = (
    Variable('MODEL_DIR', 'model_dir', Path),
    # LABEL_STUDIO_HOST: the name older label-studio-ml examples and the SDK use.
    Variable('LABEL_STUDIO_URL', 'label_studio_url', _url('http://', 'https://'),
             aliases=('LABEL_STUDIO_HOST',)),
    Variable('LABEL_STUDIO_API_KEY', 'label_studio_api_key'),
    Variable('BASIC_AUTH_USER', 'basic_auth_user'),
    Variable('BASIC_AUTH_PASS', 'basic_auth_pass'),
    Variable('LOG_LEVEL', 'log_level', _upper_choice('DEBUG', 'INFO', 'WARNING', 'ERROR')),
    Variable('HOST', 'host'),
    Variable('PORT', 'port', _integer(1, 65535)),
    Variable('WORKERS', 'workers', _integer(1, 64)),
    Variable('THREADS', 'threads', _integer(1, 256)),
    Variable('MODEL_VARIANT', 'model_variant', _choice('int8', 'float')),
    Variable('SCORE_THRESHOLD', 'score_threshold', _real(0.0, 1.0)),
    Variable('FETCH_CONCURRENCY', 'fetch_concurrency', _integer(1, 64)),
    Variable('MAX_IMAGE_BYTES', 'max_image_bytes', _integer(1000, 10**12)),
    Variable('MAX_IMAGE_PIXELS', 'max_image_pixels', _integer(10_000, 200_000_000)),
    Variable('MAX_REQUEST_BYTES', 'max_request_bytes', _integer(10_000, 10**10)),
    Variable('IMAGE_CACHE_BYTES', 'image_cache_bytes', _integer(10_000_000, 10**13)),
    Variable('IMAGE_FETCH_TIMEOUT_S', 'image_fetch_timeout_s', _real(1.0, 90.0)),
    Variable('PREDICT_DEADLINE_S', 'predict_deadline_s', _real(1.0, 90.0)),
    Variable('PREDICT_MAX_ANSWERED', 'predict_max_answered', _integer(1, 10**6)),
    Variable('IMAGE_HOSTS_ALLOWED', 'image_hosts_allowed', _names),
    Variable('LOCAL_FILES_DOCUMENT_ROOT', 'local_files_document_root', _folder),
    Variable('REFRESH_PREDICTIONS', 'refresh_predictions', _boolean),
    Variable('TRAIN_EVERY_N_ANNOTATIONS', 'train_every_n_annotations', _integer(0, 10**6)),
    Variable('TRAIN_DEBOUNCE_S', 'train_debounce_s', _real(0.0, 3600.0)),
    Variable('TRAIN_MAX_STEPS', 'train_max_steps', _integer(10, 100_000)),
    Variable('TRAIN_HOLD_OUT_FROM', 'train_hold_out_from', _integer(0, 10**6)),
    Variable('TRAIN_MODE', 'train_mode', _train_mode),
    Variable('TRAIN_INPUT_SIZE', 'train_input_size', _input_size),
    Variable('TRAIN_ZOOM_OUT', 'train_zoom_out', _real(0.0, 1.0)),
    Variable('TRAIN_MOSAIC', 'train_mosaic', _real(0.0, 1.0)),
    Variable('TRAIN_QAT', 'train_qat', _boolean),
    Variable('TRAIN_PRUNE', 'train_prune', _real(0.0, 0.95)),
    Variable('TRAIN_INT8_TAIL', 'train_int8_tail', _boolean),
    Variable('TRAINING_QUEUE', 'training_queue', _choice('inprocess', 'redis')),
    Variable('TRAIN_WARM_UP', 'train_warm_up', _boolean),
    Variable('REDIS_URL', 'redis_url', _url('redis://', 'rediss://', 'unix://')),
    Variable('TRAINING_LOCK_TTL_S', 'training_lock_ttl_s', _real(2.0, 3600.0)),
    Variable('TRAINING_TIMEOUT_S', 'training_timeout_s', _integer(60, 10**7)),
)
