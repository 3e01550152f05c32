"""Images of Label Studio tasks: where they live, how to fetch them, with which key.

A task's image URL may be
  /data/upload/<project>/<file>, /data/local-files/?d=<path>  (on Label Studio),
  s3:// gs:// azure-blob:// ...                               (cloud: presigned by Label Studio),
  http(s)://...                                               (anywhere),
  an absolute local path                                      (a mounted folder).
Label Studio URLs need its API key: a personal access token (a JWT refresh
token, exchanged for a 5-minute access token) or a legacy token.

Downloads are size-limited, decoded with the same EXIF-aware loader as
training, and cached on disk by URL.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import requests
from PIL import Image

from backend.settings import Settings
from model.images import ImageError, load_image

log = logging.getLogger(__name__)

CLOUD_SCHEMES = ('s3', 'gs', 'azure-blob', 'azure-spi')
TIMEOUT_S = 30


def _is_jwt(token: str) -> bool:
  """Personal access tokens are JWTs: three base64url parts, the middle one JSON."""
  parts = token.split('.')
  if len(parts) != 3:
    return False
  try:
    payload = json.loads(base64.urlsafe_b64decode(parts[1] + '=' * (-len(parts[1]) % 4)))
  except (ValueError, UnicodeDecodeError):
    return False
  return isinstance(payload, dict)


class LabelStudioAuth:
  """The Authorization header for Label Studio, from either kind of API key."""

  def __init__(self, url: str | None, api_key: str | None, session: requests.Session):
    self.url = url
    self.api_key = api_key
    self.session = session
    self._access: tuple[str, float] | None = None
    self._lock = threading.Lock()

  def header(self) -> dict[str, str]:
    if not self.api_key:
      return {}
    if not _is_jwt(self.api_key):
      return {'Authorization': f'Token {self.api_key}'}
    with self._lock:
      if self._access is None or self._access[1] < time.monotonic():
        self._access = (self._refresh(), time.monotonic() + 240)  # access tokens live 300 s
      return {'Authorization': f'Bearer {self._access[0]}'}

  def _refresh(self) -> str:
    try:
      response = self.session.post(f'{self.url}/api/token/refresh/', json={'refresh': self.api_key},
                                   timeout=TIMEOUT_S)
    except requests.RequestException as error:
      raise ImageError(f'cannot reach Label Studio at {self.url} to refresh the API key: {error}') from error
    if response.status_code != 200 or 'access' not in response.text:
      raise ImageError(f'Label Studio refused the personal access token (HTTP '
                       f'{response.status_code}): check LABEL_STUDIO_API_KEY')
    return response.json()['access']


class ImageFetcher:
  """Fetches and decodes task images, caching the bytes under MODEL_DIR/cache/images."""

  def __init__(self, settings: Settings, session: requests.Session | None = None):
    self.settings = settings
    self.session = session or requests.Session()
    self.auth = LabelStudioAuth(settings.label_studio_url, settings.label_studio_api_key,
                                self.session)
    self.cache_dir = settings.model_dir / 'cache' / 'images'

  def load(self, url: str, task_id: int | None = None) -> Image.Image:
    """The task's image, upright RGB.

    Raises:
      ImageError: unreachable, refused, too large, or not an image; the message says which.
    """
    return load_image(self.local_path(url, task_id))

  def local_path(self, url: str, task_id: int | None = None) -> Path:
    """The task's image file in the cache, downloaded and checked on first use.

    Raises:
      ImageError: as `load`.
    """
    if not isinstance(url, str) or not url:
      raise ImageError('the task has no image URL')
    cached = self.cache_dir / hashlib.sha256(url.encode()).hexdigest()
    if cached.is_file():
      return cached
    data = self._fetch(url, task_id)
    try:
      load_image(io.BytesIO(data))  # refuse what isn't a readable image before caching it
    except ImageError as error:
      raise ImageError(f'{url[:200]}: {str(error).split(": ", 1)[-1]}') from error
    self.cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f'{cached.name}.{threading.get_ident()}.part')
    partial.write_bytes(data)
    partial.replace(cached)
    return cached

  def _fetch(self, url: str, task_id: int | None) -> bytes:
    scheme = urlparse(url).scheme
    if scheme in CLOUD_SCHEMES:
      return self._download(self._label_studio_url(self._presign_path(url, task_id)), True)
    if url.startswith('/data/') or url.startswith('/tasks/'):
      return self._download(self._label_studio_url(url), True)
    if scheme in ('http', 'https'):
      ls = self.settings.label_studio_url
      return self._download(url, bool(ls) and url.startswith(ls + '/'))
    if scheme in ('', 'file') and Path(urlparse(url).path).is_absolute():
      path = Path(urlparse(url).path)
      if not path.is_file():
        raise ImageError(f'{path}: no such file on the backend')
      if path.stat().st_size > self.settings.max_image_bytes:
        raise ImageError(f'{path}: larger than MAX_IMAGE_BYTES')
      return path.read_bytes()
    raise ImageError(f'unsupported image URL {url[:100]!r}')

  @staticmethod
  def _presign_path(url: str, task_id: int | None) -> str:
    if task_id is None:
      raise ImageError(f'{url}: cloud storage URLs are presigned per task, and the task has no id')
    encoded = base64.urlsafe_b64encode(url.encode()).decode().rstrip('=')
    return f'/tasks/{task_id}/presign/?fileuri={encoded}'

  def _label_studio_url(self, path: str) -> str:
    if not self.settings.label_studio_url:
      raise ImageError(f'{path} lives on Label Studio, but LABEL_STUDIO_URL is not set')
    return self.settings.label_studio_url + path

  def _download(self, url: str, with_auth: bool) -> bytes:
    headers = self.auth.header() if with_auth else {}
    try:
      with self.session.get(url, headers=headers, timeout=TIMEOUT_S, stream=True) as response:
        if response.status_code in (401, 403):
          raise ImageError(f'{url}: HTTP {response.status_code} (Label Studio needs a valid '
                           'LABEL_STUDIO_API_KEY to serve task images)')
        if response.status_code != 200:
          raise ImageError(f'{url}: HTTP {response.status_code}')
        chunks, size = [], 0
        for chunk in response.iter_content(1 << 16):
          size += len(chunk)
          if size > self.settings.max_image_bytes:
            raise ImageError(f'{url}: larger than MAX_IMAGE_BYTES ({self.settings.max_image_bytes})')
          chunks.append(chunk)
        return b''.join(chunks)
    except requests.RequestException as error:
      raise ImageError(f'{url}: unreachable ({type(error).__name__})') from error
