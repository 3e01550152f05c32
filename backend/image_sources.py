"""Which images a task may make the backend read, and where the Label Studio key may go.

Everything in a task is untrusted: anyone who can import tasks writes
`data.image`. The policy, checked before every read and on every redirect:

- Label Studio's own files (`/data/upload/...`, `/data/local-files/?d=...`,
  and cloud URLs presigned through `/tasks/<id>/presign/`) are fetched from
  LABEL_STUDIO_URL with its API key. The key goes to that origin alone, on
  paths of those kinds, normalized; never to a path built otherwise from task text.
- Other URLs only over http(s), without the key, and only to public addresses:
  a host resolving to a loopback, private, link-local (cloud metadata),
  reserved or multicast address is refused, unless it is LABEL_STUDIO_URL's
  host or listed in IMAGE_HOSTS_ALLOWED (names, addresses or networks).
- Local paths (`/x.jpg`, `file:///x.jpg`) only inside LOCAL_FILES_DOCUMENT_ROOT,
  after resolving links; none at all when it is unset.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import posixpath
import socket
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote, urlparse

import requests

from model.images import ImageError

CLOUD_SCHEMES = ('s3', 'gs', 'azure-blob', 'azure-spi')
# Label Studio paths that serve task files; the key is sent on these (and presign) alone.
UPLOADS, LOCAL_FILES = '/data/upload/', '/data/local-files/'


@dataclasses.dataclass(frozen=True)
class Source:
  """Where one image is read from.

  Attributes:
    url: an http(s) URL, or None for a local file.
    path: the local file (resolved), or None.
    with_key: whether the Label Studio API key goes with the request.
  """

  url: str | None = None
  path: Path | None = None
  with_key: bool = False


def _refused(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
  if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
    address = address.ipv4_mapped
  return (address.is_private or address.is_loopback or address.is_link_local
          or address.is_reserved or address.is_multicast or address.is_unspecified)


class SourcePolicy:
  """Decides what a task's image URL may be read as (module docstring).

  Args:
    label_studio_url: LABEL_STUDIO_URL (scheme://host[:port][/prefix]) or None.
    allowed_hosts: IMAGE_HOSTS_ALLOWED entries: host names, addresses, networks.
    document_root: LOCAL_FILES_DOCUMENT_ROOT, or None to refuse local paths.
  """

  def __init__(self, label_studio_url: str | None, allowed_hosts: tuple[str, ...] = (),
               document_root: Path | None = None):
    self.label_studio = urlparse(label_studio_url) if label_studio_url else None
    self.allowed_names = {h.lower() for h in allowed_hosts if not _network(h)}
    self.allowed_networks = [n for n in map(_network, allowed_hosts) if n]
    self.document_root = Path(document_root).resolve() if document_root else None

  def source_of(self, url: object, task_id: object) -> Source:
    """The source of a task's `data.image`.

    Raises:
      ImageError: a URL the policy refuses; the message says why.
    """
    if not isinstance(url, str) or not url.strip():
      raise ImageError('the task has no image URL')
    parsed = urlparse(url)
    if parsed.scheme in CLOUD_SCHEMES:
      return self._on_label_studio(*_presign_path(url, task_id))
    if url.startswith('/data/'):
      return self._on_label_studio(parsed.path, parsed.query)
    if parsed.scheme in ('http', 'https'):
      relative = self._label_studio_path(parsed)
      if relative is not None and (_file_path(relative, parsed.query)
                                   or _presign(relative, parsed.query)):
        return self._on_label_studio(relative, parsed.query)
      self.check_host(url)  # anything else goes without the key, Label Studio's host too
      return Source(url=url)
    if parsed.scheme in ('', 'file') and parsed.path.startswith('/') and not parsed.netloc:
      return Source(path=self.local_file(unquote(parsed.path)))
    raise ImageError(f'unsupported image URL {url[:100]!r}: use http(s), a Label Studio '
                     'file URL or a path under LOCAL_FILES_DOCUMENT_ROOT')

  def check_host(self, url: str) -> None:
    """Refuses non-http(s) URLs and hosts that resolve to non-public addresses.

    Raises:
      ImageError: the URL may not be fetched.
    """
    parsed = urlparse(url)
    if parsed.scheme not in ('http', 'https') or not parsed.hostname:
      raise ImageError(f'{url[:200]}: only http(s) URLs are fetched')
    host = parsed.hostname.lower()
    if host in self.allowed_names or (self.label_studio and host == self.label_studio.hostname):
      return
    try:
      port = parsed.port or (443 if parsed.scheme == 'https' else 80)
      infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, ValueError) as error:
      raise ImageError(f'{url[:200]}: unreachable (cannot resolve {host}: {error})') from error
    for info in infos:
      try:
        self.check_peer(host, info[4][0])
      except ImageError as error:
        raise ImageError(f'{url[:200]}: {error}') from None

  def check_peer(self, host: str, address: str) -> None:
    """Refuses a connection to `host` that reached a non-public `address`.

    Run on every new connection (`checked_session`), after DNS: a name that
    resolved to a public address for `check_host` and to a private one a
    moment later (DNS rebinding) is caught here.

    Raises:
      ImageError: the address is private or local and neither it nor the host is allowed.
    """
    host = host.lower().strip('[]')
    if host in self.allowed_names or (self.label_studio and host == self.label_studio.hostname):
      return
    ip = ipaddress.ip_address(address.split('%')[0])
    if _refused(ip) and not any(ip in n for n in self.allowed_networks):
      raise ImageError(f'{host} is {ip}, a private or local address; '
                       'list it in IMAGE_HOSTS_ALLOWED to fetch images from it')


  def local_file(self, path: str) -> Path:
    """`path` resolved, if it lies inside the document root.

    Raises:
      ImageError: no document root, or the path leaves it or is no regular file.
    """
    if self.document_root is None:
      raise ImageError(f'{path[:200]}: local image paths are refused; set '
                       'LOCAL_FILES_DOCUMENT_ROOT to read images from a folder')
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(self.document_root):
      raise ImageError(f'{path[:200]}: outside LOCAL_FILES_DOCUMENT_ROOT')
    if not resolved.is_file():
      raise ImageError(f'{path[:200]}: no such file under LOCAL_FILES_DOCUMENT_ROOT')
    return resolved

  def _label_studio_path(self, parsed) -> str | None:
    """The path below LABEL_STUDIO_URL of a URL on its origin (scheme, host, port), else None."""
    ls = self.label_studio
    if (ls is None or parsed.scheme != ls.scheme or parsed.hostname is None
        or parsed.hostname.lower() != ls.hostname or parsed.port != ls.port):
      return None
    prefix = ls.path.rstrip('/')
    return parsed.path[len(prefix):] if parsed.path.startswith(prefix + '/') else None

  def _on_label_studio(self, path: str, query: str) -> Source:
    if self.label_studio is None:
      raise ImageError(f'{path[:200]} lives on Label Studio, but LABEL_STUDIO_URL is not set')
    if not _file_path(path, query) and not _presign(path, query):
      raise ImageError(f'{path[:200]}: not a Label Studio file URL (uploads, local files or '
                       'storage presign); refused')
    base = self.label_studio.geturl().rstrip('/')
    return Source(url=f'{base}{path}' + (f'?{query}' if query else ''), with_key=True)


def _network(text: str):
  try:
    return ipaddress.ip_network(text.strip(), strict=False)
  except ValueError:
    return None


def _normalized(path: str) -> bool:
  """True when the path has no dot segments or encoded separators to play with."""
  decoded = unquote(path)
  return ('\\' not in decoded and '%' not in decoded
          and posixpath.normpath(decoded) == decoded.rstrip('/'))


def _file_path(path: str, query: str) -> bool:
  """Is this a Label Studio path that serves a task file?"""
  if not _normalized(path):
    return False
  if path == LOCAL_FILES:
    return set(parse_qs(query)) == {'d'}
  return path.startswith(UPLOADS) and not query


def _presign(path: str, query: str) -> bool:
  parts = path.split('/')
  return (len(parts) == 5 and parts[1] == 'tasks' and parts[2].isdigit()
          and parts[3] == 'presign' and parts[4] == '' and set(parse_qs(query)) == {'fileuri'})


def _presign_path(url: str, task_id: object) -> tuple[str, str]:
  """(path, query) of Label Studio's presign endpoint for a cloud URL of task `task_id`."""
  if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0:
    raise ImageError(f'{url[:200]}: cloud storage URLs are presigned per task, and the task '
                     'has no integer id')
  encoded = base64.urlsafe_b64encode(url.encode()).decode().rstrip('=')
  return f'/tasks/{task_id}/presign/', f'fileuri={encoded}'


def shown_url(url: str) -> str:
  """A URL as logs show it: no user:password, no query (presigned URLs carry secrets there)."""
  parsed = urlparse(url)
  host = parsed.hostname or ''
  port = f':{parsed.port}' if parsed.port else ''
  return f'{parsed.scheme}://{host}{port}{parsed.path}'[:200]


def checked_session(check_peer: Callable[[str, str], None]) -> requests.Session:
  """A requests session whose every new connection is checked (host, peer address) before use."""
  from requests.adapters import HTTPAdapter
  from urllib3.connection import HTTPConnection, HTTPSConnection
  from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

  def checked(connection_class):
    class Checked(connection_class):
      def _new_conn(self):
        sock = super()._new_conn()
        try:
          check_peer(self.host, sock.getpeername()[0])
        except BaseException:
          sock.close()
          raise
        return sock
    return Checked

  class Pool(HTTPConnectionPool):
    ConnectionCls = checked(HTTPConnection)

  class TLSPool(HTTPSConnectionPool):
    ConnectionCls = checked(HTTPSConnection)

  class Adapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
      super().init_poolmanager(*args, **kwargs)
      self.poolmanager.pool_classes_by_scheme = {'http': Pool, 'https': TLSPool}

  session = requests.Session()
  session.mount('http://', Adapter())
  session.mount('https://', Adapter())
  return session
