"""GET /diagnose without a Label Studio (the end-to-end tests run it against a real one)."""

from __future__ import annotations

from backend.app import create_app
from backend.settings import Settings


def _diagnose(tmp_path, query='', **settings):
  client = create_app(Settings(model_dir=tmp_path, **settings)).test_client()
  response = client.get(f'/diagnose{query}')
  assert response.status_code == 200
  return response.get_json()


def test_missing_settings_are_named_with_the_fix(tmp_path):
  report = _diagnose(tmp_path, '?project=3')
  assert report['ok'] is False
  (check,) = report['checks']
  assert check['name'] == 'settings' and not check['ok']
  assert 'LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY not set' in check['detail']
  assert 'personal access token' in check['fix']


def test_an_unreachable_label_studio_stops_the_checks_there_and_shows_no_password(tmp_path):
  report = _diagnose(tmp_path, '?project=3', label_studio_url='http://ls:s3cret@127.0.0.1:9',
                     label_studio_api_key='a.b.c')
  assert [c['name'] for c in report['checks']] == ['settings', 'label_studio']
  settings, reach = report['checks']
  assert settings['ok'] and 'personal access token' in settings['detail']
  assert not reach['ok'] and 'cannot reach http://127.0.0.1:9' in reach['detail']
  assert 'inside a container localhost is the container itself' in reach['fix']
  assert 's3cret' not in str(report)
