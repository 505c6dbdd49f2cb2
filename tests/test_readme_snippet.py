"""Runs the README's `hybrid_grad_balance` snippet, so the documented usage keeps working."""

from __future__ import annotations

import pathlib

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
HEADING = '## Use `hybrid_grad_balance` in your own project'


def extract_snippet(text: str, heading: str = HEADING) -> str:
  """Returns the first ```python block between `heading` and the next `## ` heading."""
  lines = text.splitlines()
  if heading not in lines:
    raise ValueError(f'README has no heading line {heading!r}.')
  block: list[str] | None = None
  for line in lines[lines.index(heading) + 1:]:
    if block is None:
      if line.startswith('## '):
        break
      if line.strip() == '```python':
        block = []
    elif line.strip() == '```':
      return '\n'.join(block) + '\n'
    else:
      block.append(line)
  raise ValueError(f'No complete ```python block under {heading!r}.')


def test_extract_snippet_takes_the_first_block_of_the_section():
  text = '\n'.join([
      '## Other', '```python', 'wrong = 1', '```', HEADING, 'prose',
      '```python', 'x = 1', 'assert x == 1', '```', '```python', 'y = 2', '```'])
  assert extract_snippet(text) == 'x = 1\nassert x == 1\n'
  with pytest.raises(ValueError, match='no heading'):
    extract_snippet('## Something else\n')


def test_readme_snippet_runs():
  if not README.exists():
    pytest.skip(f'{README} does not exist yet; the snippet is tested once it does.')
  snippet = extract_snippet(README.read_text(encoding='utf-8'))
  assert 'assert ' in snippet, 'the README snippet must check its own result'
  code = compile(snippet, str(README), 'exec')
  exec(code, {'__name__': 'readme_snippet'})  # pylint: disable=exec-used
