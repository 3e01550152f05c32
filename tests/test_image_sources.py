"""The image source policy: what a task's URL may make the backend read, and where the key goes."""

import http.server
import threading
import time
from pathlib import Path

import pytest
import requests

from backend.image_sources import SourcePolicy
from backend.images import ImageFetcher
from backend.settings import Settings
from model.images import ImageError
from tests.synthetic import jpeg_bytes, textured_background

LS = 'http://ls.example:8080'


@pytest.fixture
def policy(tmp_path):
  (tmp_path / 'root').mkdir()
  (tmp_path / 'root' / 'a.jpg').write_bytes(b'x')
  (tmp_path / 'root' / 'escape.jpg').symlink_to('/etc/passwd')
  return SourcePolicy(LS, ('minio', '10.9.0.0/16'), tmp_path / 'root')


@pytest.mark.parametrize('url, task_id, expected', [
    ('/data/upload/3/a.jpg', 1, (f'{LS}/data/upload/3/a.jpg', True)),
    ('/data/local-files/?d=pics/a.jpg', 1, (f'{LS}/data/local-files/?d=pics/a.jpg', True)),
    (f'{LS}/data/upload/3/a.jpg', 1, (f'{LS}/data/upload/3/a.jpg', True)),
    ('s3://bucket/a.jpg', 12, (f'{LS}/tasks/12/presign/?fileuri=czM6Ly9idWNrZXQvYS5qcGc', True)),
    # Label Studio's host on a path that serves no file: no key (it answers 401).
    (f'{LS}/api/projects/1/export?x=1', 1, (f'{LS}/api/projects/1/export?x=1', False)),
    ('http://minio:9000/b/a.jpg', 1, ('http://minio:9000/b/a.jpg', False)),
    ('http://10.9.3.4/a.jpg', 1, ('http://10.9.3.4/a.jpg', False)),
])
def test_allowed_sources_and_where_the_key_goes(policy, url, task_id, expected):
  source = policy.source_of(url, task_id)
  assert (source.url, source.with_key) == expected


@pytest.mark.parametrize('url, task_id, reason', [
    ('/data/../api/projects/1/export?x=1', 1, 'not a Label Studio file URL'),
    ('/data/upload/%2e%2e/%2e%2e/api/projects', 1, 'not a Label Studio file URL'),
    ('/data/upload/3/a.jpg?next=/api/', 1, 'not a Label Studio file URL'),
    ('s3://bucket/a.jpg', '1/../../api/projects', 'integer id'),
    ('s3://bucket/a.jpg', True, 'integer id'),
    ('http://169.254.169.254/latest/meta-data/', 1, 'private or local'),
    ('http://127.0.0.1:6379/', 1, 'private or local'),
    ('http://localhost:9090/health', 1, 'private or local'),
    ('http://192.168.1.20/a.jpg', 1, 'private or local'),
    ('http://[::1]/a.jpg', 1, 'private or local'),
    ('http://[::ffff:127.0.0.1]/a.jpg', 1, 'private or local'),
    ('ftp://example.com/a.jpg', 1, 'unsupported'),
    ('gopher://127.0.0.1:6379/_x', 1, 'unsupported'),
    ('/etc/passwd', 1, 'outside LOCAL_FILES_DOCUMENT_ROOT'),
    ('file:///etc/passwd', 1, 'outside LOCAL_FILES_DOCUMENT_ROOT'),
    ('/proc/self/environ', 1, 'outside LOCAL_FILES_DOCUMENT_ROOT'),
    ('file://host/etc/passwd', 1, 'unsupported'),
    ('', 1, 'no image URL'),
    (['a'], 1, 'no image URL'),
])
def test_refused_sources(policy, url, task_id, reason):
  with pytest.raises(ImageError, match=reason):
    policy.source_of(url, task_id)


def test_local_files_only_inside_the_document_root(policy, tmp_path):
  assert policy.source_of(str(tmp_path / 'root' / 'a.jpg'), 1).path == tmp_path / 'root' / 'a.jpg'
  with pytest.raises(ImageError, match='outside'):
    policy.source_of(str(tmp_path / 'root' / 'escape.jpg'), 1)  # a link out of the root
  with pytest.raises(ImageError, match='outside'):
    policy.source_of(str(tmp_path / 'root' / '..' / 'root2' / 'a.jpg'), 1)
  with pytest.raises(ImageError, match='LOCAL_FILES_DOCUMENT_ROOT'):
    SourcePolicy(LS).source_of(str(tmp_path / 'root' / 'a.jpg'), 1)


class _Handler(http.server.BaseHTTPRequestHandler):
  """/image: a JPEG; /slow: a byte a second; /to?url=: a redirect; /huge: endless bytes.

  Every request's Authorization header is recorded in `seen`.
  """

  image = jpeg_bytes(textured_background(64, 48))
  seen: list = []

  def log_message(self, *args):
    pass

  def do_GET(self):  # noqa: N802 (http.server's name)
    self.seen.append((self.path, self.headers.get('Authorization')))
    if self.path.startswith('/to?url='):
      self.send_response(302)
      self.send_header('Location', self.path.split('=', 1)[1])
      self.end_headers()
      return
    self.send_response(200)
    self.send_header('Content-Type', 'image/jpeg')
    self.end_headers()
    try:
      if self.path.startswith('/slow'):
        for byte in self.image:
          self.wfile.write(bytes([byte]))
          self.wfile.flush()
          time.sleep(1)
      elif self.path == '/huge':
        while True:
          self.wfile.write(b'\0' * 65536)
      else:
        self.wfile.write(self.image)
    except (BrokenPipeError, ConnectionResetError):
      pass


@pytest.fixture(scope='module')
def server():
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  yield f'http://127.0.0.1:{httpd.server_address[1]}'
  httpd.shutdown()


def _fetcher(tmp_path, **settings) -> ImageFetcher:
  defaults = dict(model_dir=tmp_path, image_fetch_timeout_s=2.0, max_image_bytes=1_000_000)
  return ImageFetcher(Settings(**{**defaults, **settings}))


def test_loopback_images_need_allowing(server, tmp_path):
  with pytest.raises(ImageError, match='IMAGE_HOSTS_ALLOWED'):
    _fetcher(tmp_path).load(f'{server}/image')
  assert _fetcher(tmp_path, image_hosts_allowed=('127.0.0.1',)).load(f'{server}/image').size == (64, 48)


def test_a_slow_source_is_cut_off_at_the_deadline_not_per_read(server, tmp_path):
  fetcher = _fetcher(tmp_path, image_hosts_allowed=('127.0.0.1',))
  started = time.monotonic()
  with pytest.raises(ImageError, match='too slow'):
    fetcher.load(f'{server}/slow')
  assert time.monotonic() - started < 4  # the deadline is 2 s; a read every second never times out


def test_a_huge_source_is_cut_off_at_the_size_limit(server, tmp_path):
  with pytest.raises(ImageError, match='MAX_IMAGE_BYTES'):
    _fetcher(tmp_path, image_hosts_allowed=('127.0.0.1',)).load(f'{server}/huge')


def test_redirects_are_checked_at_every_hop_and_never_carry_the_key(server, tmp_path, monkeypatch):
  # Label Studio at the test server: its file paths get the key, the redirect's target does not.
  fetcher = _fetcher(tmp_path, label_studio_url=server, label_studio_api_key='legacy-key')
  with pytest.raises(ImageError, match='not a Label Studio file URL'):
    fetcher.load('/data/upload/../to?url=/image')
  # A public-looking host that redirects to a private one is refused at the hop.
  public = _fetcher(tmp_path)
  monkeypatch.setattr(public.policy, 'check_host', _check_all_but(public.policy, server))
  with pytest.raises(ImageError, match='private or local'):
    public.load(f'{server}/to?url=http://169.254.169.254/latest/meta-data/')
  # A Label Studio upload that redirects (as a presign does): the key stays behind.
  ls = _fetcher(tmp_path, label_studio_url=server, label_studio_api_key='legacy-key')
  monkeypatch.setattr(ls.policy, 'source_of', lambda url, task_id: _source(
      f'{server}/to?url={server}/image', True))
  _Handler.seen.clear()
  assert ls.load('/data/upload/1/a.jpg', 1).size == (64, 48)
  assert _Handler.seen == [(f'/to?url={server}/image', 'Token legacy-key'), ('/image', None)]


def _source(url, with_key):
  from backend.image_sources import Source
  return Source(url=url, with_key=with_key)


def _check_all_but(policy, server):
  """check_host, except that the test server itself counts as public."""
  original = policy.check_host

  def check(url):
    if not url.startswith(server):
      original(url)
  return check


def test_slow_sources_do_not_stall_other_requests(base_paths, server, tmp_path):
  """8 images at a byte a second: that /predict answers by its deadline with an entry
  per task that Label Studio stores nothing for (no "result"), and meanwhile cached
  images and /health keep their latency."""
  import concurrent.futures
  import shutil
  from tests.conftest import Backend
  model_dir = tmp_path / 'models'
  shutil.copytree(base_paths.base_dir, model_dir / 'base')
  backend = Backend(model_dir, PREDICT_DEADLINE_S='3', IMAGE_FETCH_TIMEOUT_S='20',
                    THREADS='8')
  config = ('<View><Image name="image" value="$image"/><RectangleLabels name="label" '
            'toName="image"><Label value="Person"/></RectangleLabels></View>')

  def predict(urls):
    started = time.monotonic()
    reply = requests.post(f'{backend.url}/predict', timeout=60, json={
        'project': 1, 'label_config': config,
        'tasks': [{'id': i, 'data': {'image': url}} for i, url in enumerate(urls)]})
    assert reply.status_code == 200
    return time.monotonic() - started, reply.json()['results']

  try:
    predict([f'{server}/image'])  # cached from now on
    idle = sorted(predict([f'{server}/image'])[0] for _ in range(5))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
      slow = pool.submit(predict, [f'{server}/slow?{i}' for i in range(8)])
      time.sleep(0.5)
      busy = [predict([f'{server}/image'])[0] for _ in range(5)]
      health = []
      for _ in range(3):
        started = time.monotonic()
        assert requests.get(f'{backend.url}/health', timeout=5).status_code == 200
        health.append(time.monotonic() - started)
      seconds, results = slow.result()
    assert seconds < 6 and results == [{'model_version': 'fewshot-ssd-base', 'pending': True}] * 8
    assert max(busy) < max(2 * idle[-1], 0.5), (busy, idle)
    assert max(health) < 0.5
    assert '8 of 8 tasks not predicted within the deadline (3 s)' in backend.output()
    assert '8 tasks left for the next Retrieve Predictions' in backend.output()
  finally:
    backend.stop()


def test_training_fetches_images_concurrently_keeps_task_order_and_skips_what_fails(server,
                                                                                   tmp_path):
  """Two sources at a byte a second each take the whole deadline (2 s): fetched side
  by side, the job waits for one deadline, not two; the refused and the slow tasks
  are left out, the others keep their order."""
  from backend.label_config import parse_label_config
  from backend.training import to_training_tasks
  fetcher = _fetcher(tmp_path, image_hosts_allowed=('127.0.0.1',))
  target = parse_label_config(
      '<View><Image name="image" value="$image"/><RectangleLabels name="label" '
      'toName="image"><Label value="a"/></RectangleLabels></View>')
  box = {'type': 'rectanglelabels', 'from_name': 'label', 'to_name': 'image',
         'value': {'x': 10, 'y': 10, 'width': 20, 'height': 20, 'rectanglelabels': ['a']}}
  urls = [f'{server}/image?1', f'{server}/slow?1', 'file:///etc/passwd', f'{server}/image?2',
          f'{server}/slow?2', f'{server}/image?3']
  tasks = [{'id': i, 'data': {'image': url}, 'annotations': [{'result': [box]}]}
           for i, url in enumerate(urls)]
  started = time.monotonic()
  ready = to_training_tasks(tasks, target, fetcher, concurrency=4)
  assert time.monotonic() - started < 3.5
  assert [task['id'] for task in ready] == [0, 3, 5]
  assert [task['annotations'][0]['result'] for task in ready] == [[box]] * 3
  assert all(Path(task['data']['image']).is_file() for task in ready)


def test_the_image_cache_stays_under_its_size_by_dropping_the_least_recently_used(server,
                                                                                  tmp_path):
  size = len(_Handler.image)
  fetcher = _fetcher(tmp_path, image_hosts_allowed=('127.0.0.1',), image_cache_bytes=int(2.5 * size))
  first, second, third = (f'{server}/image?{i}' for i in range(3))
  fetcher.load(first)
  time.sleep(0.05)
  fetcher.load(second)
  time.sleep(0.05)
  assert fetcher.cached_path(first) is not None  # used again: now the most recent
  time.sleep(0.05)
  fetcher.load(third)
  assert fetcher.cached_path(second) is None
  assert fetcher.cached_path(first) is not None and fetcher.cached_path(third) is not None


def test_a_name_that_resolves_anew_to_a_private_address_is_refused_before_any_request(
    server, tmp_path, monkeypatch):
  """DNS rebinding: public for the policy's lookup, 127.0.0.1 for the connection's."""
  import socket
  real = socket.getaddrinfo
  answers = iter(['93.184.216.34'])
  port = int(server.rsplit(':', 1)[1])

  def rebinding(host, *args, **kwargs):
    if host == 'rebind.test':
      address = next(answers, '127.0.0.1')
      return [(socket.AF_INET, socket.SOCK_STREAM, 6, '', (address, port))]
    return real(host, *args, **kwargs)
  monkeypatch.setattr(socket, 'getaddrinfo', rebinding)
  _Handler.seen.clear()
  with pytest.raises(ImageError, match='rebind.test is 127.0.0.1, a private or local address'):
    _fetcher(tmp_path).load(f'http://rebind.test:{port}/image')
  assert _Handler.seen == []  # connected, checked, closed: no request was sent
