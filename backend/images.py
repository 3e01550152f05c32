"""Images of Label Studio tasks: where they live, how to fetch them, with which key.

A task's image URL may be
  /data/upload/<project>/<file>, /data/local-files/?d=<path>  (on Label Studio),
  s3:// gs:// azure-blob:// ...                               (cloud: presigned by Label Studio),
  http(s)://...                                               (public hosts, or allowed ones),
  an absolute local path                                      (under LOCAL_FILES_DOCUMENT_ROOT);
what may be read, and where the key may go, is `image_sources.SourcePolicy`'s call.
Label Studio URLs need its API key: a personal access token (a JWT refresh
token, exchanged for a short-lived access token by label-studio-sdk) or a
legacy token.

Downloads are limited in size and in total time (IMAGE_FETCH_TIMEOUT_S, not
per read), decoded with the same EXIF-aware loader as training, and cached on
disk by URL.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import time
from pathlib import Path
from urllib.parse import urljoin

import requests
from PIL import Image

from backend.errors import BackendError
from backend.image_sources import SourcePolicy, checked_session, shown_url
from backend.label_studio_api import LabelStudioAPI
from backend.settings import Settings
from model.images import ImageError, load_image

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5


class ImageFetcher:
  """Fetches and decodes task images, caching the bytes under MODEL_DIR/cache/images."""

  def __init__(self, settings: Settings, session: requests.Session | None = None):
    self.settings = settings
    self._api: LabelStudioAPI | None = None  # made on the first image that needs the key
    self._api_lock = threading.Lock()
    self.cache_dir = settings.model_dir / 'cache' / 'images'
    self._cache_bytes: int | None = None  # counted on the first write
    self._cache_lock = threading.Lock()
    self.policy = SourcePolicy(settings.label_studio_url, settings.image_hosts_allowed,
                               settings.local_files_document_root)
    # Every connection's peer is checked again: DNS may answer differently the second time.
    self.session = session or checked_session(self.policy.check_peer)

  def load(self, url: str, task_id: int | None = None) -> Image.Image:
    """The task's image, upright RGB.

    Raises:
      ImageError: unreachable, refused, too large, or not an image; the message says which.
    """
    return load_image(self.local_path(url, task_id), self.settings.max_image_pixels)

  def local_path(self, url: str, task_id: int | None = None) -> Path:
    """The task's image file in the cache, downloaded and checked on first use.

    Raises:
      ImageError: as `load`.
    """
    if not isinstance(url, str) or not url:
      raise ImageError('the task has no image URL')
    cached = self.cached_path(url)
    if cached is not None:
      return cached
    cached = self._cache_file(url)
    data = self._fetch(url, task_id)
    try:
      # refuse what isn't a readable image before caching it
      load_image(io.BytesIO(data), self.settings.max_image_pixels)
    except ImageError as error:
      raise ImageError(f'{url[:200]}: {str(error).split(": ", 1)[-1]}') from error
    self.cache_dir.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(f'{cached.name}.{threading.get_ident()}.part')
    partial.write_bytes(data)
    partial.replace(cached)
    self._account(len(data))
    return cached

  def _account(self, added: int) -> None:
    """Keeps the cache under IMAGE_CACHE_BYTES: the least recently used files go first."""
    with self._cache_lock:
      if self._cache_bytes is None:
        self._cache_bytes = sum(f.stat().st_size for f in self._cached_files())
      else:
        self._cache_bytes += added
      if self._cache_bytes <= self.settings.image_cache_bytes:
        return
      files = sorted(self._cached_files(), key=lambda f: f.stat().st_mtime)
      self._cache_bytes = sum(f.stat().st_size for f in files)
      for old in files:
        if self._cache_bytes <= 0.9 * self.settings.image_cache_bytes:
          break
        size = old.stat().st_size
        old.unlink(missing_ok=True)
        self._cache_bytes -= size
      log.info('Image cache trimmed to %.0f MB (IMAGE_CACHE_BYTES)', self._cache_bytes / 1e6)

  def _cached_files(self) -> list[Path]:
    """The finished files of the cache (not the `.part` ones being written)."""
    return [f for f in self.cache_dir.iterdir() if not f.name.endswith('.part')]

  def _cache_file(self, url: str) -> Path:
    return self.cache_dir / hashlib.sha256(url.encode()).hexdigest()

  def cached_path(self, url: str) -> Path | None:
    """The cached file of an image fetched before (marked as used now), or None."""
    cached = self._cache_file(url)
    try:
      os.utime(cached)  # its age is what eviction goes by
    except OSError:
      return None
    return cached

  def _fetch(self, url: str, task_id: int | None) -> bytes:
    source = self.policy.source_of(url, task_id)
    if source.path is not None:
      return _read_capped(source.path, self.settings.max_image_bytes)
    return self._download(source.url, source.with_key)

  def _download(self, url: str, with_key: bool) -> bytes:
    """GETs `url` within IMAGE_FETCH_TIMEOUT_S in all and MAX_IMAGE_BYTES.

    Redirects are followed by hand, each hop checked by the source policy;
    the key goes with the first request only (a presign answers with a
    redirect to the cloud, which must not see it).
    """
    deadline = time.monotonic() + self.settings.image_fetch_timeout_s
    headers = self._key_header() if with_key else {}
    for _ in range(MAX_REDIRECTS + 1):
      try:
        with self.session.get(url, headers=headers, stream=True, allow_redirects=False,
                              timeout=_remaining(deadline, url)) as response:
          if response.is_redirect:
            url = urljoin(url, response.headers['location'])
            self.policy.check_host(url)
            headers = {}
            continue
          _check_status(url, response.status_code)
          return self._read_body(url, response, deadline)
      except requests.RequestException as error:
        raise ImageError(f'{shown_url(url)}: unreachable ({type(error).__name__})') from error
    raise ImageError(f'{shown_url(url)}: more than {MAX_REDIRECTS} redirects')

  def _key_header(self) -> dict[str, str]:
    """Label Studio's Authorization header; label-studio-sdk refreshes a personal access
    token (a JWT) on its real expiry and sends a legacy token as it is."""
    if not self.settings.label_studio_configured:
      return {}
    try:
      with self._api_lock:
        if self._api is None:
          self._api = LabelStudioAPI(self.settings)
      return self._api.auth_header()
    except BackendError as error:
      raise ImageError(f'Label Studio refused LABEL_STUDIO_API_KEY: {error.message}') from error

  def _read_body(self, url: str, response, deadline: float) -> bytes:
    # read1 returns what has arrived; iter_content would wait for whole
    # chunks, so a source sending a byte a second would hold it for hours.
    chunks, size = [], 0
    while chunk := response.raw.read1(1 << 16, decode_content=True):
      size += len(chunk)
      if size > self.settings.max_image_bytes:
        raise ImageError(f'{shown_url(url)}: larger than MAX_IMAGE_BYTES '
                         f'({self.settings.max_image_bytes})')
      _remaining(deadline, url)
      chunks.append(chunk)
    return b''.join(chunks)


def _remaining(deadline: float, url: str) -> float:
  """Seconds left for this image; raises ImageError when none are."""
  left = deadline - time.monotonic()
  if left <= 0:
    raise ImageError(f'{shown_url(url)}: too slow (IMAGE_FETCH_TIMEOUT_S)')
  return left


def _check_status(url: str, status: int) -> None:
  if status in (401, 403):
    raise ImageError(f'{shown_url(url)}: HTTP {status} (Label Studio needs a valid '
                     'LABEL_STUDIO_API_KEY to serve task images)')
  if status != 200:
    raise ImageError(f'{shown_url(url)}: HTTP {status}')


def _read_capped(path: Path, limit: int) -> bytes:
  """A local file's bytes, refused past `limit` while reading (sizes can lie: /proc)."""
  with open(path, 'rb') as handle:
    data = handle.read(limit + 1)
  if len(data) > limit:
    raise ImageError(f'{path}: larger than MAX_IMAGE_BYTES ({limit})')
  return data
