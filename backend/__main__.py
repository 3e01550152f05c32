"""`python -m backend`: validate the settings, make sure the base is there, start gunicorn.

gunicorn serves `backend.app:create_app()` with WORKERS processes of THREADS
threads on PORT (9090).
"""

from __future__ import annotations

import os
import sys

from backend.settings import Settings, SettingsError


def main() -> int:
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
  args = [sys.executable, '-m', 'gunicorn',
          '--bind', f'{settings.host}:{settings.port}',
          '--workers', str(settings.workers), '--threads', str(settings.threads),
          # Predict batches of many tasks can take long; Label Studio waits 100 s.
          '--timeout', '120', '--log-level', settings.log_level.lower(),
          '--access-logfile', '-', 'backend.app:create_app()']
  os.execv(sys.executable, args)
  return 0  # not reached


if __name__ == '__main__':
  sys.exit(main())
