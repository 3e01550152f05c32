"""Model versions and their artifacts per project, on disk under MODEL_DIR.

  MODEL_DIR/base/                       the converted base (detector.tflite serves it)
  MODEL_DIR/projects/<id>/versions/v<n>/  one published iteration (a run folder)

A version folder appears by one rename when its iteration is complete (see
`model.run_folder`), so readers never see half a version, and after a restart
the newest folder is the current version. The model version string belongs to
the folder: `fewshot-ssd-v<n>`; before a project's first training it is
`fewshot-ssd-base`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import shutil
from pathlib import Path

from backend.errors import BackendError
from model.config import BasePaths
from model.run_folder import (ARTIFACTS, FLOAT, RunPaths, pending_files, read_labels_file,
                              staging_pattern)

log = logging.getLogger(__name__)

BASE_VERSION = 'fewshot-ssd-base'
VERSION_PREFIX = 'fewshot-ssd-v'
_VERSION_DIR = re.compile(r'v([1-9][0-9]{0,8})')
_STAGING_DIR = staging_pattern(r'v[1-9][0-9]{0,8}')


@dataclasses.dataclass(frozen=True)
class Version:
  """One servable model of a project.

  Attributes:
    name: the model version string Label Studio sees.
    number: n of `fewshot-ssd-v<n>`; 0 for the base.
    path: its folder.
    tflite: the float .tflite the backend serves.
    labels: the model's class names in class-id order.
  """

  name: str
  number: int
  path: Path
  tflite: Path
  labels: tuple[str, ...]

  @property
  def is_base(self) -> bool:
    return self.number == 0


def project_key(project: object) -> int:
  """Label Studio's integer project id from `12`, `"12"` or `"12.1700000000"`.

  Raises:
    BackendError(400): anything else.
  """
  text = str(project).strip()
  match = re.fullmatch(r'([0-9]{1,12})(\.[0-9]+)?', text)
  if not match:
    raise BackendError(400, f'project must be a Label Studio project id, got {text[:40]!r}')
  return int(match.group(1))


def sha256_file(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as file:
    for block in iter(lambda: file.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


class ModelStore:
  """Reads versions from disk; `next_version_dir` is where training publishes.

  Args:
    model_dir: MODEL_DIR.
    variant: which .tflite of a version serves predictions: 'int8' (faster,
      within a mAP point) or 'float'. The base has only a float one.
  """

  def __init__(self, model_dir: Path, variant: str = 'int8'):
    self.model_dir = Path(model_dir)
    self.base_paths = BasePaths(self.model_dir)
    self.variant = variant

  def versions_dir(self, project: int) -> Path:
    return self.model_dir / 'projects' / str(int(project)) / 'versions'

  def base_version(self) -> Version | None:
    """The pretrained base as a version, once fetch-base has run."""
    paths = self.base_paths
    if not (paths.detector_tflite.is_file() and paths.detector_labels.is_file()):
      return None
    return Version(BASE_VERSION, 0, paths.base_dir, paths.detector_tflite,
                   tuple(read_labels_file(paths.detector_labels)))

  def versions(self, project: int) -> list[Version]:
    """Published versions of a project, oldest first (the base not included)."""
    folder = self.versions_dir(project)
    if not folder.is_dir():
      return []
    found = []
    for child in folder.iterdir():
      match = _VERSION_DIR.fullmatch(child.name)
      if child.is_symlink():  # versions are folders the backend published, never links
        continue
      run = RunPaths(child)
      # The served variant comes first; the other may follow after publishing.
      tflite = next((f for f in (run.tflite(self.variant), run.tflite(FLOAT)) if f.is_file()), None)
      if match and tflite is not None and run.labels.is_file():
        found.append(Version(f'{VERSION_PREFIX}{match.group(1)}', int(match.group(1)), child,
                             tflite, tuple(read_labels_file(run.labels))))
    return sorted(found, key=lambda v: v.number)

  def current(self, project: int) -> Version | None:
    """The newest published version, else the base, else None."""
    published = self.versions(project)
    return published[-1] if published else self.base_version()

  def next_version_dir(self, project: int) -> Path:
    """The folder the next iteration is published to (it must not exist yet)."""
    folder = self.versions_dir(project)
    # Every v<n> folder counts, published or not, so a number is never reused.
    taken = [int(m.group(1)) for c in (folder.iterdir() if folder.is_dir() else [])
             if (m := _VERSION_DIR.fullmatch(c.name))]
    number = max(taken + [0]) + 1
    return folder / f'v{number}'

  def remove_staging(self, project: int) -> None:
    """Deletes half-written iterations (`.v<n>.*`) that a killed training left behind.

    Only the process holding the project's training lock calls this, so no
    live training is writing to them.
    """
    folder = self.versions_dir(project)
    for child in folder.glob('.v*') if folder.is_dir() else []:
      if child.is_dir() and _STAGING_DIR.fullmatch(child.name):
        log.info('Project %s: removing %s, left by an interrupted training', project, child.name)
        shutil.rmtree(child, ignore_errors=True)

  def find(self, project: int, version: str) -> Version:
    """A published version by name, or 'latest'.

    Raises:
      BackendError(404): unknown version.
    """
    published = self.versions(project)
    if version == 'latest' and published:
      return published[-1]
    for candidate in published:
      if candidate.name == version:
        return candidate
    raise BackendError(404, f'project {project} has no published version {version[:60]!r}')

  def artifact(self, project: int, version: str, filename: str) -> Path:
    """The path of one artifact file; only the names in ARTIFACTS are ever resolved.

    Raises:
      BackendError(404): unknown version or file.
    """
    if filename not in ARTIFACTS:
      raise BackendError(404, f'no artifact {filename[:60]!r}; artifacts are {", ".join(ARTIFACTS)}')
    path = self.find(project, version).path / filename
    # A regular file of the version folder itself: never a link planted there.
    if path.is_symlink() or not path.is_file():
      raise BackendError(404, f'{filename} is not part of {version}')
    return path

  def listing(self, project: int) -> list[dict]:
    """Every published version with its files, sizes and sha256, and the files still to come."""
    return [{
        'model_version': version.name,
        'labels': list(version.labels),
        'pending': pending_files(version.path),
        'files': [{'name': name, 'bytes': (version.path / name).stat().st_size,
                   'sha256': sha256_file(version.path / name),
                   'url': f'/artifacts/{project}/{version.name}/{name}'}
                  for name in ARTIFACTS if (version.path / name).is_file()],
    } for version in self.versions(project)]
