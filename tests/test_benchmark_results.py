"""The benchmarks' result files: the notes a person wrote kept, the scores read back."""

from pathlib import Path

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


def test_generalization_rows_list_each_subset_and_draw_and_what_is_missing(monkeypatch):
  monkeypatch.syspath_prepend(str(Path(result_files.__file__).parent))  # its sibling imports
  from benchmarks.generalization import subset_rows

  def run(seed, value, draw=0):
    return {'seed': seed, **({'draw': draw} if draw else {}),
            'float': {'map50': value}, 'int8': {'map50': value - 0.01}}
  results = {'datasets': {'fruit': {'mosaics': {'10': {
      'float': 0.65, 'int8': 0.64, 'runs': [run(1, 0.6), run(0, 0.7, draw=1), run(0, 0.65)]}}}}}

  lines = subset_rows(results, ['fruit', 'bccd'], ['mosaics'], ['10'])

  assert lines == [
      'fruit | mosaics | 10 | 0: 0.650 / 0.640  0.1: 0.700 / 0.690  1: 0.600 / 0.590 | '
      'mean 0.650 / 0.640',
      'bccd | mosaics | 10 | not measured']
