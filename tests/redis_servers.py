"""redis-server and RQ training workers for the scale-out tests and benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, free_port, wait_until_serving


class RedisServer:
  """Debian's redis-server on a free port of 127.0.0.1, nothing saved to disk."""

  def __init__(self, folder: Path):
    import redis
    binary = shutil.which('redis-server')
    if binary is None:
      raise FileNotFoundError('redis-server is not installed (bash scripts/setup.sh --test does)')
    port = free_port()
    self.log_path = folder / 'redis.log'
    self.log = open(self.log_path, 'w')  # pylint: disable=consider-using-with
    self.process = subprocess.Popen(
        [binary, '--port', str(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no',
         '--dir', str(folder)], stdout=self.log, stderr=subprocess.STDOUT)
    self.url = f'redis://127.0.0.1:{port}/0'
    def answers():
      try:
        return redis.Redis.from_url(self.url).ping()
      except redis.exceptions.ConnectionError:
        return False
    wait_until_serving(self.process, answers, 20, 'redis-server',
                       lambda: self.log_path.read_text()[-2000:])

  def stop(self):
    self.process.terminate()
    self.process.wait(10)
    self.log.close()


def _parent_of(pid: int) -> int | None:
  try:
    return int(Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[1])
  except (FileNotFoundError, ProcessLookupError):
    return None


class TrainingWorker:
  """`python -m backend worker`; RQ runs each job in a forked child (its work horse)."""

  def __init__(self, log_path: Path, env: dict):
    self.log_path = log_path
    self.log = open(log_path, 'w')  # pylint: disable=consider-using-with
    self.process = subprocess.Popen([sys.executable, '-m', 'backend', 'worker'], cwd=REPO,
                                    env={**os.environ, **env}, stdout=self.log,
                                    stderr=subprocess.STDOUT)
    self.horses: set[int] = set()

  def runs(self, pid: int) -> bool:
    """Whether `pid` is this worker's work horse."""
    if _parent_of(pid) == self.process.pid:
      self.horses.add(pid)
      return True
    return False

  def kill(self):
    """SIGKILL to the worker and its work horse, as when their machine goes down."""
    for pid in [self.process.pid, *self.horses]:
      try:
        os.kill(pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
    self.process.wait(10)

  def stop(self):
    self.horses.update(pid for pid in map(int, filter(str.isdigit, os.listdir('/proc')))
                       if _parent_of(pid) == self.process.pid)
    self.kill()
    self.log.close()
