"""A real Label Studio 1.23.2 for the tests, driven through its REST API as a person drives the UI."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import requests

from tests.conftest import REPO, free_port, wait_until_serving
from tests.synthetic import make_task_set

LABEL_STUDIO = REPO / '.venv-labelstudio' / 'bin' / 'label-studio'
DISC_CONFIG = ('<View><Image name="image" value="$image"/>'
               '<RectangleLabels name="label" toName="image"><Label value="disc"/>'
               '</RectangleLabels></View>')
USER, PASSWORD = 'tester@example.com', 'a-long-test-password-42'


class LabelStudio:
  """A Label Studio server on 127.0.0.1 with an empty data directory.

  It takes ~40 s to start (database migrations): made, it is launching;
  `ready()` waits for it and logs in.
  """

  def __init__(self, data_dir: Path):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.files_root = data_dir / 'files'
    self.files_root.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ('HOST', 'PORT', 'USERNAME', 'PASSWORD')}
    env.update(
        LABEL_STUDIO_BASE_DATA_DIR=str(data_dir), LABEL_STUDIO_USERNAME=USER,
        LABEL_STUDIO_PASSWORD=PASSWORD, LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK='true',
        LABEL_STUDIO_ML_BLOCK_LOCAL_IP='false', LABEL_STUDIO_SSRF_PROTECTION_ENABLED='false',
        LABEL_STUDIO_LATEST_VERSION_CHECK='false', LABEL_STUDIO_COLLECT_ANALYTICS='false',
        LABEL_STUDIO_SENTRY_DSN='', LABEL_STUDIO_FRONTEND_SENTRY_DSN='',
        # Local files storage, as a user mounts a folder of images into Label Studio.
        LOCAL_FILES_SERVING_ENABLED='true', LOCAL_FILES_DOCUMENT_ROOT=str(self.files_root))
    self.log_path = data_dir / 'label-studio.log'
    self.log = open(self.log_path, 'w')  # pylint: disable=consider-using-with
    self.process = subprocess.Popen(
        [str(LABEL_STUDIO), 'start', '--no-browser', '--internal-host', '127.0.0.1',
         '--port', str(self.port)], env=env, stdout=self.log, stderr=subprocess.STDOUT)
    self.token = None
    self.api = requests.Session()

  def ready(self) -> 'LabelStudio':
    """Waits until it serves, then creates the personal access token the tests use."""
    if self.token is not None:
      return self
    def answers():
      try:
        return requests.get(self.url + '/health', timeout=2).status_code == 200
      except (requests.ConnectionError, requests.Timeout):
        return False
    wait_until_serving(self.process, answers, 240, 'Label Studio',
                       lambda: self.log_path.read_text()[-3000:])
    self.token = self._personal_access_token()
    return self

  def _personal_access_token(self) -> str:
    """Log in as a person does, then create a personal access token."""
    browser = requests.Session()
    browser.get(self.url + '/user/login/')
    csrf = browser.cookies['csrftoken']
    browser.post(self.url + '/user/login/', data={
        'email': USER, 'password': PASSWORD, 'csrfmiddlewaretoken': csrf},
        headers={'Referer': self.url + '/user/login/'})
    response = browser.post(self.url + '/api/token/', headers={
        'X-CSRFToken': browser.cookies['csrftoken'], 'Referer': self.url + '/'})
    assert response.status_code in (200, 201), response.text
    return response.json()['token']

  def call(self, method: str, path: str, **kwargs):
    """An API call with a fresh access token from the personal access token."""
    access = requests.post(self.url + '/api/token/refresh/', json={'refresh': self.token}).json()
    response = self.api.request(method, self.url + path,
                                headers={'Authorization': f'Bearer {access["access"]}'},
                                timeout=120, **kwargs)
    assert response.status_code < 300, f'{method} {path}: {response.status_code} {response.text[:500]}'
    return response.json() if response.content else None

  def stop(self):
    self.process.terminate()
    try:
      self.process.wait(20)
    except subprocess.TimeoutExpired:
      self.process.kill()
    self.log.close()


@dataclasses.dataclass
class DiscProject:
  """A Label Studio project of red discs on textured backgrounds, made in the test.

  Attributes:
    id: the project id.
    tasks: Label Studio's tasks in upload order.
    truth: original file name -> the true region (percent of the image).
    images: the folder holding the images.
  """

  id: int
  tasks: list[dict]
  truth: dict[str, dict]
  images: Path

  @staticmethod
  def original_name(task: dict) -> str:
    """The uploaded file's own name (Label Studio prefixes 8 hex digits)."""
    return re.sub(r'^[0-9a-f]{8}-', '', task['data']['image'].split('/')[-1])

  def region_for(self, task: dict) -> dict:
    return dict(self.truth[self.original_name(task)], id=f'r{task["id"]}')


def make_disc_project(ls: LabelStudio, folder: Path, count: int, seed: int,
                      title: str = 'discs') -> DiscProject:
  """Creates a project and uploads `count` images made here (none labeled yet)."""
  tasks = make_task_set(folder, count, ('disc',), split=None, seed=seed)
  truth = {t['data']['image'].split('/')[-1]: t['annotations'][0]['result'][0] for t in tasks}
  project = ls.call('POST', '/api/projects/', json={'title': title, 'label_config': DISC_CONFIG})
  files = {f'file{i}': (name, (folder / 'images' / name).read_bytes(), 'image/jpeg')
           for i, name in enumerate(truth)}
  ls.call('POST', f'/api/projects/{project["id"]}/import', files=files)
  ls_tasks = ls.call('GET', f'/api/tasks/?project={project["id"]}&page_size=1000')['tasks']
  assert len(ls_tasks) == count
  return DiscProject(project['id'], ls_tasks, truth, folder / 'images')


def annotate(ls: LabelStudio, project: DiscProject, tasks: list[dict]) -> None:
  """Labels these tasks with their true boxes, as an annotator submits them."""
  for task in tasks:
    ls.call('POST', f'/api/tasks/{task["id"]}/annotations/', json={'result': [project.region_for(task)]})
