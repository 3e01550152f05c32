"""One training job: a project's labeled tasks from Label Studio -> a published version.

The job fetches the label config and the tasks with their annotations through
label-studio-sdk, downloads the images (cached), turns the tasks into the JSON
export form `model/` reads, trains an iteration warm-started from the current
version, and publishes it as the next version folder in one rename.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from typing import Callable

from backend.errors import BackendError
from backend.images import ImageFetcher
from backend.label_config import RectangleTarget, parse_label_config
from backend.label_studio_api import ANNOTATED_TASKS, LabelStudioAPI
from backend.settings import Settings
from backend.store import ModelStore
from model.images import ImageError
from model.run_folder import TFLITE_FILES, pending_files

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingStatus:
  """What /train/status shows for a project."""

  state: str = 'idle'  # idle | queued | running | failed
  # While running: fetching, downloading_images, then the pipeline's stages
  # (load_examples, build_model, make_views, start_class_head, train, export, evaluate,
  # tune_int8, publish, after_publishing).
  stage: str | None = None
  step: int = 0
  total_steps: int = 0
  loss: float | None = None
  eta_s: float | None = None
  images_per_s: float | None = None
  model_version: str | None = None
  last_error: str | None = None
  started_at: float | None = None
  finished_at: float | None = None
  runs: int = 0

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def update(self, progress) -> None:
    """Takes the pipeline's progress: a stage's name as it begins, or a `train.Progress`."""
    if isinstance(progress, str):
      self.stage = progress
      return
    self.step, self.total_steps, self.loss = progress.step, progress.total_steps, progress.loss
    self.eta_s, self.images_per_s = progress.eta_s, progress.images_per_s


def fetch_project(settings: Settings, project: int) -> tuple[str, list[dict]]:
  """The project's label config and its annotated tasks (the unlabeled ones stay in Label Studio).

  Raises:
    BackendError(503): Label Studio not configured or unreachable; 404 unknown project.
  """
  api = LabelStudioAPI(settings)
  return api.label_config(project), list(api.tasks(project, ANNOTATED_TASKS))


def to_training_tasks(tasks: list[dict], target: RectangleTarget, fetcher: ImageFetcher,
                      concurrency: int = 1) -> list[dict]:
  """Label Studio tasks -> the export form `model/` reads, images on local disk.

  Keeps annotated tasks whose image can be fetched (`concurrency` at a time, in
  task order); keeps only this control's rectangles with labels from the
  config (others are logged and dropped).
  """
  annotated = []
  for task in tasks:
    annotations = [a for a in task.get('annotations') or [] if not a.get('was_cancelled')]
    if annotations:
      annotated.append((task, annotations))

  def local_path(task):
    try:
      return fetcher.local_path((task.get('data') or {}).get(target.image_key), task.get('id'))
    except ImageError as error:
      return error

  with concurrent.futures.ThreadPoolExecutor(concurrency, thread_name_prefix='train-fetch') as pool:
    paths = list(pool.map(local_path, [task for task, _ in annotated]))
  ready, skipped_images, foreign = [], 0, 0
  for (task, annotations), path in zip(annotated, paths):
    if isinstance(path, ImageError):
      skipped_images += 1
      log.warning('Task %s left out of training: %s', task.get('id'), path)
      continue
    kept_annotations = []
    for annotation in annotations:
      results = []
      for result in annotation.get('result') or []:
        if result.get('type') != 'rectanglelabels' or result.get('from_name') != target.from_name:
          continue
        labels = (result.get('value') or {}).get('rectanglelabels') or []
        if not labels or labels[0] not in target.labels:
          foreign += 1
          continue
        results.append(result)
      kept_annotations.append({**annotation, 'result': results})
    ready.append({'id': task.get('id'), 'data': {'image': str(path)},
                  'annotations': kept_annotations})
  if skipped_images or foreign:
    log.warning('Training data: %d tasks without a readable image, %d boxes with labels not '
                'in the config were left out', skipped_images, foreign)
  return ready


def train_project(settings: Settings, store: ModelStore, fetcher: ImageFetcher, project: int,
                  on_progress: Callable | None = None,
                  on_published: Callable[[str], None] | None = None) -> str:
  """Trains and publishes the next version of `project`; returns its model version.

  The version is published, and `on_published` called with its name, as soon
  as the .tflite it serves (MODEL_VARIANT) is written; the other one follows.

  Raises:
    BackendError: Label Studio unreachable, a bad config, or nothing to train on.
    model.run_folder.RunError: training itself refused (no boxes, ...).
  """
  from model import pipeline
  started = time.monotonic()
  report = _logged(project, on_progress)
  store.remove_staging(project)
  report('fetching')
  config, tasks = fetch_project(settings, project)
  target = parse_label_config(config)
  report('downloading_images')
  # Half the fetch slots, as a refresh takes: /predict shares the fetcher meanwhile.
  training_tasks = to_training_tasks(tasks, target, fetcher,
                                     max(1, settings.fetch_concurrency // 2))
  if not training_tasks:
    raise BackendError(409, f'project {project} has no annotated tasks with readable images yet')
  log.info('Project %s: training on %d annotated tasks', project, len(training_tasks))
  current = store.current(project)
  previous = current.path if current is not None and not current.is_base else None
  out = store.next_version_dir(project)
  # Image paths are absolute (the cache), so the images root is never used.
  later = tuple(kind for kind in TFLITE_FILES if kind != settings.model_variant)

  def published(run):
    version = store.find(project, 'latest').name
    following = pending_files(run.root)
    log.info('Project %s: published %s in %.0f s%s', project, version, time.monotonic() - started,
             f' ({", ".join(following)} to follow)' if following else '')
    if on_published is not None:
      on_published(version)
  pipeline.train_iteration(training_tasks, fetcher.cache_dir, out, settings.model_dir,
                            previous=previous, config=settings.train_config(),
                            progress=report, on_stage=report,
                            export_kinds=(settings.model_variant,), export_later=later,
                            on_published=published)
  return store.find(project, 'latest').name


def _logged(project: int, on_progress: Callable | None) -> Callable:
  """A progress callback (a stage's name, or a training step) that also logs every
  tenth of the training steps."""
  def report(p):
    if on_progress is not None:
      on_progress(p)
    if isinstance(p, str):
      return
    if p.step == p.total_steps or p.step % max(10, p.total_steps // 10) == 0:
      log.info('Project %s: training step %d/%d, loss %.4f, %.0f img/s, ETA %.0f s', project,
               p.step, p.total_steps, p.loss, p.images_per_s, p.eta_s)
  return report
