"""Connect-time diagnostics: can this backend reach Label Studio, use its key, read an image?

`diagnose` runs the checks in order, each one only if the one before passed,
and says for each failure what to change. `GET /diagnose?project=<id>` answers
with them; when Label Studio connects (/setup), they run in the background
(once per project every DIAGNOSE_EVERY_S) and go to the log, so /setup stays fast.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import requests

from backend.errors import BackendError
from backend.image_sources import shown_url
from backend.images import ImageFetcher
from backend.label_config import parse_label_config
from backend.label_studio_api import LabelStudioAPI
from backend.settings import Settings
from model.images import ImageError

log = logging.getLogger(__name__)

TIMEOUT_S = 5
DIAGNOSE_EVERY_S = 600


@dataclasses.dataclass
class Check:
  name: str
  ok: bool
  detail: str
  fix: str | None = None


def diagnose(settings: Settings, fetcher: ImageFetcher, project: int | None) -> list[Check]:
  """The checks, in order, up to and including the first that fails."""
  probe, checks = _Probe(settings, fetcher, project), []
  for check in (probe.settings_given, probe.reachable, probe.key_works, probe.project_readable,
                probe.image_readable):
    result = check()
    if result is None:  # does not apply (no project named)
      break
    checks.append(result)
    if not result.ok:
      break
  return checks


class _Probe:
  """The checks of one diagnosis; each passed one leaves what the next builds on
  (the API client, the project's config)."""

  def __init__(self, settings: Settings, fetcher: ImageFetcher, project: int | None):
    self.settings, self.fetcher, self.project = settings, fetcher, project
    self.api: LabelStudioAPI | None = None
    self.target = None

  def settings_given(self) -> Check:
    settings = self.settings
    if settings.label_studio_configured:
      return Check('settings', True, f'LABEL_STUDIO_URL={shown_url(settings.label_studio_url)}, '
                                     f'LABEL_STUDIO_API_KEY set ({_key_kind(settings.label_studio_api_key)})')
    missing = [name for name, value in (('LABEL_STUDIO_URL', settings.label_studio_url),
                                        ('LABEL_STUDIO_API_KEY', settings.label_studio_api_key))
               if not value]
    return Check('settings', False, f'{" and ".join(missing)} not set: pre-annotations of '
                                    'uploaded images, training and the refresh need both',
                 'set LABEL_STUDIO_URL to the address this backend reaches Label Studio at, and '
                 'LABEL_STUDIO_API_KEY to a personal access token (Account & Settings)')

  def reachable(self) -> Check:
    base = self.settings.label_studio_url
    started = time.monotonic()
    try:
      response = requests.get(f'{base}/health', timeout=TIMEOUT_S)
    except requests.RequestException as error:
      return Check('label_studio', False, f'cannot reach {shown_url(base)}: '
                                          f'{type(error).__name__}',
                   'LABEL_STUDIO_URL must be reachable from this backend: inside a container '
                   'localhost is the container itself (in compose: http://label-studio:8080)')
    if response.status_code != 200:
      return Check('label_studio', False,
                   f'{shown_url(base + "/health")} answered HTTP {response.status_code}',
                   'LABEL_STUDIO_URL must be the address of Label Studio itself (no path)')
    return Check('label_studio', True, f'{shown_url(base)} answered in '
                                       f'{time.monotonic() - started:.2f} s')

  def key_works(self) -> Check:
    kind = _key_kind(self.settings.label_studio_api_key)
    try:
      self.api = LabelStudioAPI(self.settings)
      user = self.api.client.users.whoami()
    except BackendError as error:
      return Check('api_key', False, f'the {kind} was refused: {error.message}', _key_fix(kind))
    except Exception as error:  # pylint: disable=broad-except
      return Check('api_key', False, f'the {kind} was refused: {type(error).__name__}: '
                                     f'{str(error)[:200]}', _key_fix(kind))
    return Check('api_key', True, f'a {kind} of {user.email or user.username}')

  def project_readable(self) -> Check | None:
    if self.project is None:
      return None
    try:
      self.target = parse_label_config(self.api.label_config(self.project))
    except BackendError as error:
      fix = ('LABEL_STUDIO_URL must be the Label Studio this project lives in'
             if error.status == 404 else 'give the project an <Image> and a <RectangleLabels>')
      return Check('project', False, error.message, fix)
    return Check('project', True, f'project {self.project}: {self.target.from_name} on '
                                  f'{self.target.to_name}, labels {", ".join(self.target.labels)}')

  def image_readable(self) -> Check:
    try:
      task = next(iter(self.api.tasks(self.project, {})), None)
    except BackendError as error:
      return Check('image', False, error.message, 'see the checks above')
    if task is None:
      return Check('image', True, f'project {self.project} has no tasks yet')
    url = (task.get('data') or {}).get(self.target.image_key)
    try:
      image = self.fetcher.load(url, task.get('id'))
    except ImageError as error:
      return Check('image', False, f'task {task.get("id")}: {error}',
                   'see README > Image sources: uploads need the key; other hosts on private '
                   'addresses need IMAGE_HOSTS_ALLOWED; local paths LOCAL_FILES_DOCUMENT_ROOT')
    return Check('image', True, f'task {task.get("id")}: {image.width}x{image.height}')


def _key_kind(key: str) -> str:
  # Personal access tokens are JWTs (three dot-separated parts); legacy tokens are hex.
  return 'personal access token' if key.count('.') == 2 else 'legacy token'


def _key_fix(kind: str) -> str:
  if kind == 'legacy token':
    return ('Label Studio 1.23 disables legacy tokens unless the organization enables them '
            '(Organization > API Tokens Settings); better, create a personal access token '
            '(Account & Settings > Personal Access Token)')
  return ('create a new personal access token (Account & Settings > Personal Access Token) in '
          'the Label Studio at LABEL_STUDIO_URL')


class ConnectDiagnostics:
  """Runs `diagnose` in the background when Label Studio connects, at most every
  DIAGNOSE_EVERY_S per project, and logs what it finds."""

  def __init__(self, settings: Settings, fetcher: ImageFetcher):
    self.settings = settings
    self.fetcher = fetcher
    self._last: dict[int, float] = {}
    self._lock = threading.Lock()

  def on_connect(self, project: int) -> None:
    now = time.monotonic()
    with self._lock:
      if now - self._last.get(project, -DIAGNOSE_EVERY_S) < DIAGNOSE_EVERY_S:
        return
      self._last[project] = now
      if len(self._last) > 1000:  # any caller may name any project id
        self._last = {project: now}
    threading.Thread(target=self._log, args=(project,), name='diagnose', daemon=True).start()

  def _log(self, project: int) -> None:
    for check in diagnose(self.settings, self.fetcher, project):
      if check.ok:
        log.info('Project %s: %s ok: %s', project, check.name, check.detail)
      else:
        log.warning('Project %s: %s FAILED: %s. Fix: %s', project, check.name, check.detail,
                    check.fix)
