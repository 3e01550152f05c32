"""A kill during export publishes nothing and loses nothing already published."""

import os
import shutil
import signal
import subprocess
import sys
import time

from backend.store import ModelStore
from tests.conftest import REPO


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
         '--max-images', '2'],  # a short training: the export is what gets killed
        cwd=REPO, env=dict(os.environ, MODEL_DIR=str(model_dir)), stderr=stderr,
        stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while 'Exported float' not in log.read_text():  # the int8 conversion is under way
      assert process.poll() is None, log.read_text()[-2000:]
      assert time.monotonic() < deadline, 'training never reached the export'
      time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait(30)

  assert not out.exists()
  assert [v.name for v in store.versions(7)] == ['fewshot-ssd-v1']
  assert store.current(7).name == 'fewshot-ssd-v1'
  assert store.next_version_dir(7).name == 'v2'
