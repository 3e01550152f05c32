"""The backend's settings: the one module that reads the environment.

Names follow label-studio-ml where it has one (LABEL_STUDIO_URL,
LABEL_STUDIO_API_KEY, MODEL_DIR, BASIC_AUTH_USER/PASS, LOG_LEVEL, WORKERS,
THREADS, PORT); ours are prefixed with nothing and listed in the README.
`Settings.from_env()` validates everything at start and names the bad variable.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Mapping

from model.config import TrainConfig


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
  # Regions below this score are not sent to Label Studio.
  score_threshold: float = 0.25
  # Which .tflite of a version serves predictions: int8 (faster) or float.
  model_variant: str = 'int8'
  # Images fetched at once for one /predict batch.
  fetch_concurrency: int = 8
  # Largest image we download, in bytes.
  max_image_bytes: int = 50_000_000
  # Annotation events that trigger a training run (0: only START_TRAINING does),
  # and the quiet time after the last of them before it starts.
  train_every_n_annotations: int = 5
  train_debounce_s: float = 10.0
  # Cap on a training run's steps (the budget grows with the images up to it),
  # and what trains: 'heads', 'top' (heads + top of the extractor) or 'all'.
  train_max_steps: int = TrainConfig.max_steps
  train_mode: str = TrainConfig.trainable
  # Model input side: larger finds smaller objects, at a cost in time.
  # None ('auto'): chosen from the sizes of the labeled boxes.
  train_input_size: int | None = TrainConfig.input_size
  # Zoom-outs (each image also shrunk onto a canvas, for objects smaller in
  # new images than in the labeled ones) as a fraction of the random crops;
  # then quantization-aware training for the int8 file, or pruning to this
  # fraction of zero weights for smaller downloads (both need TRAIN_MODE top or all).
  train_zoom_out: float = TrainConfig.zoom_out_views
  train_qat: bool = TrainConfig.quantization_aware
  train_prune: float = TrainConfig.prune_sparsity
  # Where training jobs run: 'inprocess' (a thread of the serving process, the
  # embedded default) or 'redis' (RQ workers, `python -m backend worker`).
  training_queue: str = 'inprocess'
  redis_url: str = 'redis://localhost:6379/0'
  # A worker's hold on a project expires this long after the worker dies.
  training_lock_ttl_s: float = 60.0
  # An RQ training job that runs longer than this is stopped.
  training_timeout_s: int = 3600

  @property
  def auth_enabled(self) -> bool:
    return self.basic_auth_user is not None

  def train_config(self) -> TrainConfig:
    return TrainConfig(max_steps=self.train_max_steps, trainable=self.train_mode,
                       input_size=self.train_input_size, zoom_out_views=self.train_zoom_out,
                       quantization_aware=self.train_qat,
                       prune_sparsity=self.train_prune)

  @classmethod
  def from_env(cls, environ: Mapping[str, str] | None = None) -> 'Settings':
    """Reads and validates the environment.

    Raises:
      SettingsError: naming the first bad variable.
    """
    env = os.environ if environ is None else environ
    defaults = cls()

    def text(name, default=None):
      value = env.get(name, '').strip()
      return value or default

    def number(name, default, kind=int, minimum=None, maximum=None):
      raw = text(name)
      if raw is None:
        return default
      try:
        value = kind(raw)
      except ValueError:
        raise SettingsError(f'{name}={raw!r} is not a {kind.__name__}') from None
      if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise SettingsError(f'{name}={raw} must be between {minimum} and {maximum}')
      return value

    url = text('LABEL_STUDIO_URL')
    if url is not None and not url.startswith(('http://', 'https://')):
      raise SettingsError(f'LABEL_STUDIO_URL={url!r} must start with http:// or https://')
    user, password = text('BASIC_AUTH_USER'), text('BASIC_AUTH_PASS')
    if (user is None) != (password is None):
      raise SettingsError('BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together')
    variant = text('MODEL_VARIANT', defaults.model_variant).lower()
    if variant not in ('int8', 'float'):
      raise SettingsError(f'MODEL_VARIANT={variant!r} must be int8 or float')
    log_level = text('LOG_LEVEL', defaults.log_level).upper()
    if log_level not in ('DEBUG', 'INFO', 'WARNING', 'ERROR'):
      raise SettingsError(f'LOG_LEVEL={log_level!r} must be DEBUG, INFO, WARNING or ERROR')
    training_queue = text('TRAINING_QUEUE', defaults.training_queue).lower()
    if training_queue not in ('inprocess', 'redis'):
      raise SettingsError(f'TRAINING_QUEUE={training_queue!r} must be inprocess or redis')
    redis_url = text('REDIS_URL', defaults.redis_url)
    if not redis_url.startswith(('redis://', 'rediss://', 'unix://')):
      raise SettingsError(f'REDIS_URL={redis_url!r} must start with redis://, rediss:// or unix://')
    train_mode = text('TRAIN_MODE', defaults.train_mode).lower()
    if train_mode not in ('heads', 'top', 'all'):
      raise SettingsError(f'TRAIN_MODE={train_mode!r} must be heads, top or all')
    train_qat = text('TRAIN_QAT', str(defaults.train_qat)).lower()
    if train_qat not in ('true', 'false', '1', '0'):
      raise SettingsError(f'TRAIN_QAT={train_qat!r} must be true or false')
    settings = cls(
        model_dir=Path(text('MODEL_DIR', str(defaults.model_dir))),
        label_studio_url=url.rstrip('/') if url else None,
        label_studio_api_key=text('LABEL_STUDIO_API_KEY'),
        basic_auth_user=user,
        basic_auth_pass=password,
        log_level=log_level,
        host=text('HOST', defaults.host),
        port=number('PORT', defaults.port, minimum=1, maximum=65535),
        workers=number('WORKERS', defaults.workers, minimum=1, maximum=64),
        threads=number('THREADS', defaults.threads, minimum=1, maximum=256),
        model_variant=variant,
        score_threshold=number('SCORE_THRESHOLD', defaults.score_threshold, float, 0.0, 1.0),
        fetch_concurrency=number('FETCH_CONCURRENCY', defaults.fetch_concurrency, minimum=1,
                                 maximum=64),
        max_image_bytes=number('MAX_IMAGE_BYTES', defaults.max_image_bytes, minimum=1000),
        train_every_n_annotations=number('TRAIN_EVERY_N_ANNOTATIONS',
                                         defaults.train_every_n_annotations, minimum=0),
        train_debounce_s=number('TRAIN_DEBOUNCE_S', defaults.train_debounce_s, float, 0.0, 3600.0),
        train_max_steps=number('TRAIN_MAX_STEPS', defaults.train_max_steps, minimum=10,
                               maximum=100_000),
        train_mode=train_mode,
        train_input_size=(None if text('TRAIN_INPUT_SIZE', 'auto').lower() == 'auto' else
                          number('TRAIN_INPUT_SIZE', defaults.train_input_size, minimum=128,
                                 maximum=1024)),
        train_zoom_out=number('TRAIN_ZOOM_OUT', defaults.train_zoom_out, kind=float, minimum=0.0,
                              maximum=1.0),
        train_qat=train_qat in ('true', '1'),
        train_prune=number('TRAIN_PRUNE', defaults.train_prune, kind=float, minimum=0.0,
                           maximum=0.95),
        training_queue=training_queue,
        redis_url=redis_url,
        training_lock_ttl_s=number('TRAINING_LOCK_TTL_S', defaults.training_lock_ttl_s, float,
                                   2.0, 3600.0),
        training_timeout_s=number('TRAINING_TIMEOUT_S', defaults.training_timeout_s, minimum=60),
    )
    try:
      settings.train_config()
    except ValueError as error:  # a combination the detector refuses, e.g. QAT with heads only
      raise SettingsError(f'TRAIN_MODE/TRAIN_INPUT_SIZE/TRAIN_QAT/TRAIN_PRUNE: {error}') from None
    return settings
