"""int8 against float over every model the generalization benchmark has trained.

One model's int8 mAP moves by up to 0.03 with rounding alone
(`int8_rounding_noise.py`), so "int8 within 0.01 of float" can only be judged
over many models. This reads benchmarks/results/generalization.json (every
data set, variant, subset and seed kept there, from whichever code ran them)
and summarizes int8 mAP@0.5 minus float mAP@0.5 per data set; `--variants`
restricts it to variants whose name contains one of the given words.

  .venv/bin/python benchmarks/int8_gap.py
  .venv/bin/python benchmarks/int8_gap.py --variants default

Results: benchmarks/results/int8_gap.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics

import result_files


def gaps_by_dataset(results: dict, words: list[str]) -> dict[str, list[float]]:
  """data set -> int8 minus float mAP@0.5 of each run of the matching variants."""
  gaps = {}
  for dataset, by_variant in results['datasets'].items():
    for variant, by_shots in by_variant.items():
      if words and not any(word in variant for word in words):
        continue
      for summary in by_shots.values():
        gaps.setdefault(dataset, []).extend(
            run['int8']['map50'] - run['float']['map50'] for run in summary['runs'])
  return gaps


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--variants', nargs='*', default=[],
                      help='only variants whose name contains one of these words')
  args = parser.parse_args()
  results = result_files.read_json('generalization')
  rows = {}
  for dataset, gaps in sorted(gaps_by_dataset(results, args.variants).items()):
    rows[dataset] = {'models': len(gaps), 'mean': round(statistics.mean(gaps), 4),
                     'median': round(statistics.median(gaps), 4),
                     'within_0.01': round(sum(abs(g) <= 0.01 for g in gaps) / len(gaps), 3),
                     'min': round(min(gaps), 4), 'max': round(max(gaps), 4)}
  result_files.write_json('int8_gap', rows)
  lines = ['# int8 minus float mAP@0.5, over every model in generalization.json', '',
           'Variants: ' + (', '.join(f'"{w}"' for w in args.variants) or 'all') +
           '. `benchmarks/int8_gap.py` writes this.', '',
           '| data set | models | mean | median | within ±0.01 | lowest | highest |',
           '|---|---|---|---|---|---|---|']
  for dataset, row in rows.items():
    lines.append(f'| {dataset} | {row["models"]} | {row["mean"]:+.3f} | {row["median"]:+.3f} | '
                 f'{row["within_0.01"]:.0%} | {row["min"]:+.3f} | {row["max"]:+.3f} |')
  result_files.write_markdown('int8_gap', lines)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
