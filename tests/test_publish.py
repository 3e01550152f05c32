"""A kill during export publishes nothing and loses nothing already published."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from backend.store import ModelStore
from model.run_folder import RunPaths
from tests.conftest import REPO, SMALL_INPUT, poll


def test_kill_during_export_leaves_the_published_version_serving(base_paths, trained_run,
                                                                 shapes_dataset, tmp_path):
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')
  store = ModelStore(model_dir)
  shutil.copytree(trained_run, store.versions_dir(7) / 'v1')
  out = store.next_version_dir(7)
  assert out.name == 'v2'

  log = tmp_path / 'train.log'
  with open(log, 'w') as stderr:
    process = subprocess.Popen(
        [sys.executable, '-m', 'model', 'train', '--tasks', str(shapes_dataset / 'tasks.json'),
         '--out', str(out), '--from', str(store.versions_dir(7) / 'v1'),
         '--max-images', '2', '--max-steps', '10',  # short: the export is what gets killed
         '--input-size', str(SMALL_INPUT)],
        cwd=REPO, env=dict(os.environ, MODEL_DIR=str(model_dir)), stderr=stderr,
        stdout=subprocess.DEVNULL)
    # Until the float file is exported (the int8 conversion is under way) or the process ends.
    text = poll(log.read_text, lambda t: 'Exported float' in t or process.poll() is not None,
                300, every=0.2)
    assert 'Exported float' in text and process.poll() is None, text[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait(30)

  assert not out.exists()
  assert [v.name for v in store.versions(7)] == ['fewshot-ssd-v1']
  assert store.current(7).name == 'fewshot-ssd-v1'
  assert store.next_version_dir(7).name == 'v2'


@pytest.mark.parametrize('served, files_at_publish, pending', [
    # the float file is converted first anyway: int8 is quantized from it
    ('int8', ['model.tflite', 'model_int8.tflite'], ['report.png']),
    ('float', ['model.tflite'], ['model_int8.tflite', 'report.png']),
])
def test_the_served_file_publishes_first_and_the_other_follows(base_paths, shapes_dataset,
                                                               tmp_path, served,
                                                               files_at_publish, pending):
  """What the backend does: the version serves as soon as its own file is there; a file
  not made on the way, and the report, are added afterwards and the listing says they
  are pending until then."""
  from model import pipeline, tasks as tasks_lib
  from model.config import TrainConfig
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')
  store = ModelStore(model_dir, served)
  out = store.next_version_dir(7)
  other = 'float' if served == 'int8' else 'int8'
  seen = {}

  def published(run):
    seen['files'] = sorted(p.name for p in run.root.iterdir() if p.suffix in ('.tflite', '.png'))
    seen['pending'] = store.listing(7)[0]['pending']
    seen['serving'] = store.current(7).tflite.name
  tasks = tasks_lib.load_tasks_file(shapes_dataset / 'tasks.json')
  short = TrainConfig().with_overrides({'budget.base': 20, 'budget.per_first_image': 0,
                                       'budget.max': 20, 'views.max_per_image': 2,
                                       'input.size': SMALL_INPUT})
  pipeline.train_iteration(tasks, shapes_dataset, out, model_dir, config=short, max_images=2,
                           export_kinds=(served,), export_later=(other,), on_published=published)
  assert seen == {'files': files_at_publish, 'pending': pending,
                  'serving': RunPaths(out).tflite(served).name}
  (listed,) = store.listing(7)
  assert listed['pending'] == [] and {'model.tflite', 'model_int8.tflite', 'report.png'} <= {
      f['name'] for f in listed['files']}
  assert RunPaths(out).views.is_file()  # for the next iteration
  assert sorted(p.name for p in out.iterdir() if p.name.startswith('.')) == []


def test_files_pending_from_a_killed_writer_are_not_pending(tmp_path, monkeypatch):
  from model import run_folder
  run_folder.mark_pending(tmp_path, ['model.tflite'])
  assert run_folder.pending_files(tmp_path) == ['model.tflite']  # this process writes them
  finished = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                            capture_output=True, text=True, check=True)
  record = json.loads((tmp_path / run_folder.PENDING_FILE).read_text())
  record['pid'] = int(finished.stdout)  # a writer that is gone: its export never comes
  (tmp_path / run_folder.PENDING_FILE).write_text(json.dumps(record))
  assert run_folder.pending_files(tmp_path) == []
  # A writer on another host (a worker sharing the folder) is trusted for a while.
  record['host'] = 'another-host'
  (tmp_path / run_folder.PENDING_FILE).write_text(json.dumps(record))
  assert run_folder.pending_files(tmp_path) == ['model.tflite']
  monkeypatch.setattr(run_folder.time, 'time', lambda: record['since'] + run_folder.PENDING_TRUST_S)
  assert run_folder.pending_files(tmp_path) == []


def test_a_file_added_beside_the_pending_ones_leaves_them_pending(tmp_path):
  """views.npz is written in a thread while the report is drawn: adding it must not
  touch pending.json, or it could write it back after the report's add removed it."""
  from model import run_folder
  run_folder.mark_pending(tmp_path, ['report.png'])
  record = (tmp_path / run_folder.PENDING_FILE).read_bytes()
  run_folder.add_written(tmp_path, 'views.npz', lambda path: path.write_bytes(b'views'))
  assert (tmp_path / run_folder.PENDING_FILE).read_bytes() == record
  run_folder.add_file(tmp_path, 'report.png', b'png')
  assert run_folder.pending_files(tmp_path) == []
  assert sorted(p.name for p in tmp_path.iterdir()) == ['report.png', 'views.npz']
