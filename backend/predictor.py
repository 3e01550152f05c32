"""Tasks in, Label Studio predictions out, with the project's current .tflite.

No TensorFlow here: detectors are ai-edge-litert interpreters, loaded once per
(project, version) and kept in memory. Images of one batch are fetched
concurrently; a task whose image can't be read gets an empty prediction and a
log line, never a failed batch.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import uuid
from pathlib import Path

from backend.images import ImageFetcher
from backend.label_config import RectangleTarget
from backend.store import ModelStore, Version
from model.tflite_detector import TFLiteDetector
from model.images import ImageError

log = logging.getLogger(__name__)


class DetectorCache:
  """One TFLite interpreter per model file, built on first use.

  Interpreters are not thread-safe, so each holds a lock while it runs. A
  project's new version replaces its older one in memory (a request still
  running on the old one finishes with it).
  """

  def __init__(self, num_threads: int = 2):
    self.num_threads = num_threads
    self._detectors: dict[str, tuple[TFLiteDetector, threading.Lock]] = {}
    self._lock = threading.Lock()

  def get(self, version: Version) -> tuple[TFLiteDetector, threading.Lock]:
    key = str(version.tflite)
    with self._lock:
      if key not in self._detectors:
        log.info('Loading %s (%s)', version.name, version.tflite)
        # Versions of one project share a parent folder (the base has its own).
        older = [k for k in self._detectors
                 if Path(k).parent.parent == version.tflite.parent.parent]
        for stale in older:
          del self._detectors[stale]
        self._detectors[key] = (TFLiteDetector(version.tflite, list(version.labels),
                                               self.num_threads), threading.Lock())
      return self._detectors[key]

  def loaded(self) -> list[str]:
    """The model files held in memory now."""
    with self._lock:
      return sorted(self._detectors)


def to_region(detection, target: RectangleTarget, label: str, width: int, height: int) -> dict:
  """A Detection (pixel box) as a Label Studio rectanglelabels region (percent of the image)."""
  x1, y1, x2, y2 = detection.box
  return {
      'id': uuid.uuid4().hex[:10],
      'from_name': target.from_name,
      'to_name': target.to_name,
      'type': 'rectanglelabels',
      'original_width': width,
      'original_height': height,
      'image_rotation': 0,
      'value': {'x': 100.0 * x1 / width, 'y': 100.0 * y1 / height,
                'width': 100.0 * (x2 - x1) / width, 'height': 100.0 * (y2 - y1) / height,
                'rotation': 0, 'rectanglelabels': [label]},
      'score': round(float(detection.score), 4),
  }


class Predictor:
  """Predictions for a batch of tasks."""

  def __init__(self, store: ModelStore, fetcher: ImageFetcher, score_threshold: float,
               fetch_concurrency: int):
    self.store = store
    self.fetcher = fetcher
    self.score_threshold = score_threshold
    self.detectors = DetectorCache()
    self.pool = concurrent.futures.ThreadPoolExecutor(fetch_concurrency,
                                                      thread_name_prefix='fetch')

  def predict(self, project: int, tasks: list[dict], target: RectangleTarget) -> list[dict]:
    """Exactly one prediction per task, in order."""
    version = self.store.current(project)
    if version is None:
      log.warning('Project %s: no model yet (run python -m model fetch-base)', project)
      return [self._empty('none') for _ in tasks]
    if version.is_base and not any(target.label_for(name) for name in version.labels):
      # The base knows none of this project's labels: nothing useful to say.
      return [self._empty(version.name) for _ in tasks]
    detector, lock = self.detectors.get(version)
    images = list(self.pool.map(lambda task: self._image(task, target), tasks))
    predictions = []
    for task, image in zip(tasks, images):
      if image is None:
        predictions.append(self._empty(version.name))
        continue
      with lock:
        found = detector.detect(image, min_score=self.score_threshold)
      regions = []
      for detection in found:
        label = target.label_for(detection.label)
        if label is not None:
          regions.append(to_region(detection, target, label, image.width, image.height))
      score = sum(r['score'] for r in regions) / len(regions) if regions else 0.0
      predictions.append({'model_version': version.name, 'score': round(score, 4),
                          'result': regions})
    return predictions

  def _image(self, task: dict, target: RectangleTarget):
    data = task.get('data') if isinstance(task, dict) else None
    url = data.get(target.image_key) if isinstance(data, dict) else None
    try:
      return self.fetcher.load(url, task.get('id') if isinstance(task, dict) else None)
    except ImageError as error:
      log.warning('Task %s: no prediction, image unreadable: %s',
                  task.get('id') if isinstance(task, dict) else '?', error)
      return None

  @staticmethod
  def _empty(version: str) -> dict:
    return {'model_version': version, 'score': 0.0, 'result': []}
