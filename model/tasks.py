"""Label Studio tasks (JSON export format) -> training and evaluation examples.

The backend feeds the same structures it fetches from the Label Studio API, so
this is the one place that reads RectangleLabels.

A task's boxes come from its latest non-cancelled annotation; results other
than rectangles are ignored; boxes are clipped to the image and dropped when
nothing usable is left (counted and logged).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

log = logging.getLogger(__name__)

TRAIN, TEST, UNLABELED = 'train', 'test', 'unlabeled'
# Boxes thinner than this fraction of the image side are degenerate.
MIN_BOX_SIDE = 1e-3


class TaskError(ValueError):
  """A malformed task; the message names it (id or position) and the field."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One labeled image.

  Attributes:
    task_id: the task's `id` (or its position in the file when it has none).
    image: `data.image` as written in the task.
    split: `meta.split` ('train', 'test', 'unlabeled') or '' when absent.
    boxes: float32 [K, 4] (ymin, xmin, ymax, xmax) normalized to [0, 1] of the
      original, upright image.
    labels: K label names, one per box.
    labeled: whether a non-cancelled annotation exists (an annotation with no
      boxes says "nothing here", which is a useful negative).
  """

  task_id: Any
  image: str
  split: str
  boxes: np.ndarray
  labels: tuple[str, ...]
  labeled: bool


@dataclasses.dataclass
class ParseStats:
  """What parsing skipped, so the caller can log one line about it."""

  tasks: int = 0
  boxes: int = 0
  clipped: int = 0
  dropped_degenerate: int = 0
  ignored_results: int = 0
  cancelled_annotations: int = 0

  def summary(self) -> str:
    return (f'{self.tasks} tasks, {self.boxes} boxes; clipped {self.clipped}, '
            f'dropped {self.dropped_degenerate} degenerate, ignored '
            f'{self.ignored_results} non-rectangle results and '
            f'{self.cancelled_annotations} cancelled annotations')


def load_tasks_file(path: Path) -> list[dict]:
  """Reads a Label Studio JSON export (a list of tasks).

  Raises:
    TaskError: unreadable file, invalid JSON, or not a list of objects.
  """
  try:
    tasks = json.loads(Path(path).read_text())
  except OSError as error:
    raise TaskError(f'{path}: cannot read ({error.strerror or error})') from error
  except json.JSONDecodeError as error:
    raise TaskError(f'{path}: not valid JSON ({error})') from error
  if isinstance(tasks, dict):
    tasks = [tasks]
  if not isinstance(tasks, list):
    raise TaskError(f'{path}: expected a list of tasks, got {type(tasks).__name__}')
  return tasks


def latest_annotation(task: dict, name: str) -> dict | None:
  """The newest annotation that was not cancelled, or None."""
  annotations = task.get('annotations') or []
  if not isinstance(annotations, list):
    raise TaskError(f'{name}: "annotations" must be a list')
  valid = [a for a in annotations if isinstance(a, dict) and not a.get('was_cancelled')]
  if not valid:
    return None
  return max(valid, key=lambda a: (str(a.get('updated_at') or a.get('created_at') or ''),
                                   _sortable_id(a.get('id'))))


def _sortable_id(value) -> float:
  return value if isinstance(value, (int, float)) else -1


def rectangle_to_yxyx(value: dict, width: float | None, height: float | None,
                      name: str) -> np.ndarray:
  """A RectangleLabels `value` in percent -> normalized (ymin, xmin, ymax, xmax), unclipped.

  A rotated rectangle (rotation in degrees, clockwise about its top-left
  corner, in pixels) becomes the axis-aligned box around it; that needs the
  image size, so a rotated box without `original_width/height` is an error.
  """
  try:
    x, y = float(value['x']), float(value['y'])
    w, h = float(value['width']), float(value['height'])
  except (KeyError, TypeError, ValueError) as error:
    raise TaskError(f'{name}: rectangle needs numeric x, y, width, height ({error})') from error
  if not all(math.isfinite(v) for v in (x, y, w, h)):
    raise TaskError(f'{name}: rectangle has a non-finite coordinate')
  rotation = float(value.get('rotation') or 0.0) % 360
  if rotation:
    if not width or not height:
      raise TaskError(f'{name}: a rotated rectangle needs original_width and original_height')
    theta = math.radians(rotation)
    # Corners in pixels, rotated about the top-left corner.
    px, py, pw, ph = x * width / 100, y * height / 100, w * width / 100, h * height / 100
    xs, ys = [], []
    for dx, dy in ((0, 0), (pw, 0), (pw, ph), (0, ph)):
      xs.append(px + dx * math.cos(theta) - dy * math.sin(theta))
      ys.append(py + dx * math.sin(theta) + dy * math.cos(theta))
    return np.array([min(ys) / height, min(xs) / width, max(ys) / height, max(xs) / width],
                    np.float32)
  return np.array([y, x, y + h, x + w], np.float32) / 100.0


def parse_task(task: Any, position: int, stats: ParseStats) -> Example:
  """One task -> Example. Raises TaskError naming the task on malformed input."""
  if not isinstance(task, dict):
    raise TaskError(f'task #{position}: expected an object, got {type(task).__name__}')
  task_id = task.get('id', position)
  name = f'task {task_id}'
  data = task.get('data')
  if not isinstance(data, dict) or not isinstance(data.get('image'), str) or not data['image']:
    raise TaskError(f'{name}: missing data.image (the image URL or path)')
  meta = task.get('meta') or {}
  split = str(meta.get('split') or '') if isinstance(meta, dict) else ''
  annotations = task.get('annotations') or []
  if isinstance(annotations, list):
    stats.cancelled_annotations += sum(
        1 for a in annotations if isinstance(a, dict) and a.get('was_cancelled'))
  annotation = latest_annotation(task, name)
  boxes, labels = [], []
  for result in (annotation or {}).get('result') or []:
    if not isinstance(result, dict) or result.get('type') != 'rectanglelabels':
      stats.ignored_results += 1
      continue
    value = result.get('value')
    if not isinstance(value, dict):
      raise TaskError(f'{name}: rectanglelabels result without a value')
    names = value.get('rectanglelabels')
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
      raise TaskError(f'{name}: rectanglelabels result without a label')
    raw = rectangle_to_yxyx(value, result.get('original_width'),
                            result.get('original_height'), name)
    clipped = np.clip(raw, 0.0, 1.0)
    stats.boxes += 1
    if not np.allclose(raw, clipped):
      stats.clipped += 1
    if (clipped[2] - clipped[0] < MIN_BOX_SIDE) or (clipped[3] - clipped[1] < MIN_BOX_SIDE):
      stats.dropped_degenerate += 1
      continue
    boxes.append(clipped)
    labels.append(names[0])
  stats.tasks += 1
  return Example(task_id=task_id, image=data['image'], split=split,
                 boxes=np.array(boxes, np.float32).reshape(-1, 4),
                 labels=tuple(labels), labeled=annotation is not None)


def parse_tasks(tasks: Iterable[Any]) -> tuple[list[Example], ParseStats]:
  """All tasks -> examples, in order, plus what was skipped."""
  stats = ParseStats()
  examples = [parse_task(task, i, stats) for i, task in enumerate(tasks)]
  return examples, stats


def training_examples(examples: list[Example]) -> list[Example]:
  """Labeled tasks whose split is `train` or absent (never `test` or `unlabeled`)."""
  return [e for e in examples if e.labeled and e.split in ('', TRAIN)]


def evaluation_examples(examples: list[Example], split: str = TEST) -> list[Example]:
  """Labeled tasks of `split`; all labeled tasks when no task has any split."""
  if not any(e.split for e in examples):
    return [e for e in examples if e.labeled]
  return [e for e in examples if e.labeled and e.split == split]


def example_key(example: Example) -> str:
  """Names a labeled image by its task, image reference, boxes and labels: what an
  iteration trained on, for the next to tell which images are new to it (changed
  boxes make a new key; the image's bytes are not read)."""
  digest = hashlib.sha256(repr((example.task_id, example.image, example.labels)).encode())
  digest.update(np.asarray(example.boxes, np.float32).tobytes())
  return digest.hexdigest()[:32]


def label_set(examples: Iterable[Example]) -> list[str]:
  """Labels in order of first appearance (stable class ids for a given task file)."""
  seen = {}
  for example in examples:
    for label in example.labels:
      seen.setdefault(label, None)
  return list(seen)


def resolve_image(example: Example, images_root: Path) -> Path:
  """`data.image` as a local path: relative to `images_root`, or a `/data/local-files/?d=` path."""
  image = example.image
  if image.startswith('/data/local-files/?d='):
    image = image.split('?d=', 1)[1]
  path = Path(image)
  return path if path.is_absolute() else images_root / path


def load_example_images(examples: list[Example], images_root: Path,
                        max_side: int | None = None):
  """Decodes each example's image; unreadable ones are logged and left out.

  Args:
    max_side: larger images are shrunk to this on their longer side (`images.load_image`).

  Returns:
    (the examples kept, their upright RGB images), aligned.
  """
  from model.images import ImageError, load_image
  kept, images = [], []
  for example in examples:
    try:
      images.append(load_image(resolve_image(example, images_root), max_side=max_side))
      kept.append(example)
    except ImageError as error:
      log.warning('Task %s left out: %s', example.task_id, error)
  return kept, images
