"""The benchmarks' result files keep what a person wrote below the notes line."""

from benchmarks import result_files


def test_a_rewrite_keeps_the_notes_and_replaces_the_table(tmp_path, monkeypatch):
  monkeypatch.setattr(result_files, 'RESULTS', tmp_path)
  result_files.write_markdown('bench', ['# Bench', '', '| a |', '|---|', '| 1 |'])
  path = tmp_path / 'bench.md'
  path.write_text(path.read_text() + '\nSide by side, by hand: 0.93 against 0.91.\n')

  text = result_files.write_markdown('bench', ['# Bench', '', '| a |', '|---|', '| 2 |'])

  assert text == path.read_text()
  table, notes = text.split(result_files.NOTES)
  assert '| 2 |' in table and '| 1 |' not in text
  assert notes.strip() == 'Side by side, by hand: 0.93 against 0.91.'


def test_a_file_written_before_the_notes_line_keeps_all_of_its_text(tmp_path, monkeypatch):
  monkeypatch.setattr(result_files, 'RESULTS', tmp_path)
  (tmp_path / 'old.md').write_text('# Old\n\n| a |\n|---|\n| 1 |\n\nA note.\n')

  text = result_files.write_markdown('old', ['# Old', '', '| a |', '|---|', '| 2 |'])

  assert text.split(result_files.NOTES)[1].strip() == '# Old\n\n| a |\n|---|\n| 1 |\n\nA note.'


def test_json_round_trips_with_a_default_before_the_first_run(tmp_path, monkeypatch):
  monkeypatch.setattr(result_files, 'RESULTS', tmp_path / 'results')
  assert result_files.read_json('bench', {'datasets': {}}) == {'datasets': {}}
  result_files.write_json('bench', {'datasets': {'raccoon': 0.93}})
  assert result_files.read_json('bench') == {'datasets': {'raccoon': 0.93}}
