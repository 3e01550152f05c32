"""The run folder: one trained iteration on disk, and how folders are published.

  model.tflite        float32 input in [-1, 1], post-processing inside
  model_int8.tflite   full-integer, uint8 input, float outputs
  labels.txt          real labels, one per line, in class-id order
  metrics.json        losses per step, wall time, choices made, evaluation, mAP history
  report.png          loss curve, mAP per iteration, a few detections
  run.json            labels, input size, anchors, each label's score threshold for
                      pre-annotations, the images it trained on (their keys),
                      where it started from, settings
  ckpt.index, ckpt.data-*   the three named parts, for the next iteration
  views.npz           the training views and the frozen part's outputs, for the
                      next iteration (`model.views`);
                      only the newest iteration of a chain keeps them

Folders (runs, the converted base) are written into a staging folder
`.<name>.<random>` beside their target and renamed into place by
`published_folder`, so a crash or kill never leaves half a folder behind.
What serving does not need and the next iteration can do without (report.png,
views.npz, a .tflite the backend does not serve) is added to the published
folder afterwards, each file by a rename (`add_file`); a kill leaves it out.
No TensorFlow at import: the backend reads run folders too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

FLOAT, INT8 = 'float', 'int8'
TFLITE_FILES = {FLOAT: 'model.tflite', INT8: 'model_int8.tflite'}
LABELS_FILE = 'labels.txt'
METRICS_FILE = 'metrics.json'
REPORT_FILE = 'report.png'
RUN_INFO_FILE = 'run.json'
CHECKPOINT_PREFIX = 'ckpt'
VIEWS_FILE = 'views.npz'
# run.json's label -> the score from which pre-annotations show its boxes.
SCORE_THRESHOLDS_KEY = 'score_thresholds'
# run.json's keys (`tasks.example_key`) of the images the run trained on: the next
# iteration's new images are those it lacks.
TRAINED_ON_KEY = 'trained_on'
# Names the artifacts a published run has yet to get (`add_file`: its report, a .tflite
# made after publishing) and the process writing them; gone when none are left.
PENDING_FILE = 'pending.json'
# A writer on another host (a Redis worker sharing MODEL_DIR) is trusted this long;
# on this host, while its process lives.
PENDING_TRUST_S = 1800.0
# What a published run offers for download; nothing else in it is ever served.
ARTIFACTS = (*TFLITE_FILES.values(), LABELS_FILE, METRICS_FILE, REPORT_FILE)


class RunError(RuntimeError):
  """An iteration that cannot be trained or a run folder that cannot be read."""


@dataclasses.dataclass(frozen=True)
class RunPaths:
  """The files of a run folder."""

  root: Path

  @property
  def checkpoint_prefix(self) -> Path:
    return self.root / CHECKPOINT_PREFIX

  @property
  def labels(self) -> Path:
    return self.root / LABELS_FILE

  @property
  def metrics(self) -> Path:
    return self.root / METRICS_FILE

  @property
  def report(self) -> Path:
    return self.root / REPORT_FILE

  @property
  def run_info(self) -> Path:
    return self.root / RUN_INFO_FILE

  @property
  def views(self) -> Path:
    return self.root / VIEWS_FILE

  def tflite(self, kind: str) -> Path:
    """The .tflite of `kind` (FLOAT or INT8)."""
    if kind not in TFLITE_FILES:
      raise ValueError(f'unknown .tflite kind {kind!r}; kinds are {", ".join(TFLITE_FILES)}')
    return self.root / TFLITE_FILES[kind]


def read_labels_file(path: Path) -> list[str]:
  """labels.txt: one real label per line, in class-id order."""
  return [line.rstrip('\n') for line in Path(path).read_text().splitlines() if line.strip()]


def write_labels_file(path: Path, labels: list[str]) -> None:
  """Writes labels.txt (one label per line, class-id order, no background)."""
  Path(path).write_text(''.join(f'{label}\n' for label in labels))


def write_json(path: Path, value) -> None:
  Path(path).write_text(json.dumps(value, indent=1) + '\n')


def read_run(run_dir: Path) -> tuple[RunPaths, list[str], dict]:
  """Paths, labels and run.json of a finished run folder.

  Raises:
    RunError: when the folder is not a complete run.
  """
  paths = RunPaths(Path(run_dir))
  if not paths.run_info.is_file() or not paths.labels.is_file():
    raise RunError(f'{run_dir} is not a finished run folder (no {RUN_INFO_FILE} / {LABELS_FILE})')
  return paths, read_labels_file(paths.labels), json.loads(paths.run_info.read_text())


def _run_info_value(run_dir: Path, key: str):
  """run.json's `key`, or None where it has none (an older run) or cannot be read."""
  try:
    return json.loads((Path(run_dir) / RUN_INFO_FILE).read_text()).get(key)
  except (OSError, ValueError, AttributeError):
    return None


def read_trainable(run_dir: Path) -> str | None:
  """What trained in the run (`TrainConfig.trainable` as chosen); None where run.json
  does not say (an older run) or cannot be read."""
  config = _run_info_value(run_dir, 'train_config')
  trainable = config.get('trainable') if isinstance(config, dict) else None
  return trainable if isinstance(trainable, str) else None


def read_score_thresholds(run_dir: Path) -> dict[str, float]:
  """label -> the run's score threshold for pre-annotations; {} where run.json has
  none (an older run) or cannot be read."""
  chosen = _run_info_value(run_dir, SCORE_THRESHOLDS_KEY)
  if not isinstance(chosen, dict):
    return {}
  return {str(label): float(value) for label, value in chosen.items()
          if isinstance(value, (int, float)) and 0.0 <= value <= 1.0}


def read_trained_on(run_dir: Path) -> set[str]:
  """Keys of the images the run trained on; empty where run.json has none
  (an older run) or cannot be read."""
  trained_on = _run_info_value(run_dir, TRAINED_ON_KEY)
  return {f for f in trained_on if isinstance(f, str)} if isinstance(trained_on, list) else set()


def mark_pending(run_dir: Path, names: list[str]) -> None:
  """Records that this process will add `names` to the run (`add_file`)."""
  write_json(Path(run_dir) / PENDING_FILE, {
      'files': list(names), 'host': socket.gethostname(), 'pid': os.getpid(),
      'since': time.time()})


def pending_files(run_dir: Path) -> list[str]:
  """The files a published run is still to get; none once their writer is gone (killed
  during the export: those files never come)."""
  try:
    record = json.loads((Path(run_dir) / PENDING_FILE).read_text())
    files, host, pid, since = record['files'], record['host'], record['pid'], record['since']
  except (OSError, ValueError, KeyError, TypeError):
    return []
  if host != socket.gethostname():
    return files if time.time() - since < PENDING_TRUST_S else []
  return files if _process_lives(pid) else []


def _process_lives(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, someone else's
    return True
  return True


def add_file(run_dir: Path, name: str, data: bytes) -> None:
  """Adds a file to a published run atomically (a rename), then drops it from the pending ones."""
  add_written(run_dir, name, lambda path: path.write_bytes(data))


def add_written(run_dir: Path, name: str, write: Callable[[Path], object]) -> None:
  """`add_file` of what `write` writes to the path it is given (which keeps `name`'s suffix)."""
  run_dir = Path(run_dir)
  partial = run_dir / f'.partial.{name}'
  write(partial)
  partial.replace(run_dir / name)
  pending = pending_files(run_dir)
  if name not in pending:  # (views.npz is never listed: it may be written beside one that is)
    return
  left = [n for n in pending if n != name]
  if left:
    mark_pending(run_dir, left)
  else:
    (run_dir / PENDING_FILE).unlink(missing_ok=True)


def read_history(run_dir: Path | None) -> list[dict]:
  """The mAP history (one entry per iteration) a run folder carries; [] for none."""
  if run_dir is None:
    return []
  return json.loads(RunPaths(Path(run_dir)).metrics.read_text()).get('history', [])


def _run_ssd_config(info: dict, labels: list[str]):
  from model.config import AnchorConfig, SSDConfig
  # Runs before anchors were chosen have the default ones; JSON made the tuples lists.
  anchors = AnchorConfig(**{name: tuple(value) if isinstance(value, list) else value
                            for name, value in info.get('anchors', {}).items()})
  # Runs before the colour maps have none; those before their kernel was chosen read 1x1.
  return SSDConfig(num_classes=len(labels), input_size=info['input_size'], anchors=anchors,
                   colour=info.get('colour', False),
                   colour_kernel=info.get('colour_kernel', 1))


@contextlib.contextmanager
def _unreadable_as_run_error(run_dir: Path):
  """Turns a failed read of a run's checkpoint into a RunError."""
  try:
    yield
  except Exception as error:  # TF raises several types for a bad checkpoint
    raise RunError(f'{run_dir}: checkpoint unreadable ({type(error).__name__}: '
                   f'{str(error)[:200]})') from error


def load_run_model(run_dir: Path):
  """The run's tf_keras SSD with all three parts restored, and its labels.

  Raises:
    RunError: not a run folder, or its checkpoint does not load.
  """
  from model import ssd as ssd_lib
  paths, labels, info = read_run(run_dir)
  model = ssd_lib.build_ssd(_run_ssd_config(info, labels))
  with _unreadable_as_run_error(run_dir):
    ssd_lib.checkpoint_for(model).read(str(paths.checkpoint_prefix)).assert_consumed()
  return model, labels


def load_run_class_head(run_dir: Path):
  """(the run's class head, its labels, the SSDConfig it was trained with): what
  the next iteration starts from, without building the whole model.

  Raises:
    RunError: not a run folder, or its checkpoint holds no matching class head.
  """
  from model import ssd as ssd_lib
  paths, labels, info = read_run(run_dir)
  config = _run_ssd_config(info, labels)
  with _unreadable_as_run_error(run_dir):
    return ssd_lib.load_class_head(config, paths.checkpoint_prefix), labels, config


def staging_pattern(name_pattern: str) -> re.Pattern:
  """Matches the staging folders `published_folder` makes for targets named by `name_pattern`."""
  return re.compile(rf'\.(?:{name_pattern})\.[A-Za-z0-9_]+')


@contextlib.contextmanager
def published_folder(target: Path, *, replace: bool = False) -> Iterator[Path]:
  """Yields an empty staging folder; when the block ends well it becomes `target`.

  On any exception (or a kill) the staging folder is removed (or left as
  `.<name>.<random>` for `staging_pattern` to find) and `target` is untouched.

  Raises:
    RunError: `target` exists and `replace` is False.
  """
  target = Path(target)
  if target.exists() and not replace:
    raise RunError(f'{target} already exists: each iteration gets a new folder')
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = Path(tempfile.mkdtemp(prefix=f'.{target.name}.', dir=target.parent))
  try:
    yield staging
    if replace and target.exists():
      shutil.rmtree(target)
    staging.rename(target)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
