"""redis-server and RQ training workers for the scale-out tests and benchmarks."""

from __future__ import annotations

import os
import shutil
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


class TrainingWorker:
  """`python -m backend worker`, which runs its jobs in its own process."""

  def __init__(self, log_path: Path, env: dict):
    self.log_path = log_path
    self.log = open(log_path, 'w')  # pylint: disable=consider-using-with
    self.process = subprocess.Popen([sys.executable, '-m', 'backend', 'worker'], cwd=REPO,
                                    env={**os.environ, **env}, stdout=self.log,
                                    stderr=subprocess.STDOUT)

  def runs(self, pid: int) -> bool:
    """Whether `pid` (a job's worker in /train/status) is this worker."""
    return pid == self.process.pid

  def kill(self):
    """SIGKILL, as when its machine goes down."""
    self.process.kill()
    self.process.wait(10)

  def stop(self):
    self.kill()
    self.log.close()
