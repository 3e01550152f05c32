"""`python -m backend`: validate the settings, make sure the base is there, start gunicorn.

gunicorn serves `backend.app:create_app()` with WORKERS processes of THREADS
threads on PORT (9090).

`python -m backend worker`: an RQ worker that runs training jobs from Redis
(REDIS_URL), for TRAINING_QUEUE=redis; start as many as you like, on machines
that share MODEL_DIR.
"""

from __future__ import annotations

import os
import sys

from backend.settings import Settings, SettingsError, configure_logging

# gunicorn's default without %(l)s and %(u)s: address, time, request line,
# status, bytes, referer, user agent, milliseconds.
ACCESS_LOG_FORMAT = '%(h)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s" %(M)sms'


def main(argv: list[str]) -> int:
  if argv not in ([], ['worker']):
    print('usage: python -m backend [worker]', file=sys.stderr)
    return 2
  try:
    settings = Settings.from_env()
  except SettingsError as error:
    print(f'backend: bad setting: {error}', file=sys.stderr)
    return 2
  from model.config import BasePaths
  if not BasePaths(settings.model_dir).detector_tflite.is_file():
    print(f'backend: no converted base in {settings.model_dir}/base; '
          'run `python -m model fetch-base` (scripts/setup.sh does)', file=sys.stderr)
    return 2
  problem = _unusable(settings)
  if problem:
    print(f'backend: {problem}', file=sys.stderr)
    return 2
  if argv == ['worker']:
    return _worker(settings)
  args = [sys.executable, '-m', 'gunicorn',
          '--bind', f'{settings.host}:{settings.port}',
          '--workers', str(settings.workers), '--threads', str(settings.threads),
          # Predict batches of many tasks can take long; Label Studio waits 100 s.
          '--timeout', '120', '--log-level', settings.log_level.lower(),
          # The access log names no user: gunicorn prints a malformed Basic
          # credential whole in %(u)s, password included.
          '--access-logfile', '-', '--access-logformat', ACCESS_LOG_FORMAT,
          'backend.app:create_app()']
  os.execv(sys.executable, args)
  return 0  # not reached


def _unusable(settings: Settings) -> str | None:
  """What would fail later, found now: MODEL_DIR not writable, Redis unreachable."""
  import tempfile
  try:
    (settings.model_dir / 'locks').mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=settings.model_dir / 'locks'):
      pass
  except OSError as error:
    return (f'MODEL_DIR={settings.model_dir} is not writable ({error}); training, its locks '
            'and the image cache live there')
  if settings.training_queue == 'redis':
    import redis
    try:
      redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5).ping()
    except (redis.exceptions.RedisError, OSError) as error:
      return f'TRAINING_QUEUE=redis, but REDIS_URL does not answer ({error})'
  return None


def _worker(settings: Settings) -> int:
  import redis

  from backend.redis_queue import run_worker
  configure_logging(settings.log_level)
  try:
    run_worker(settings)
  except redis.exceptions.ConnectionError as error:
    print(f'backend worker: cannot reach Redis at REDIS_URL={settings.redis_url}: {error}',
          file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
