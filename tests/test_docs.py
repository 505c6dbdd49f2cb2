"""The user's documentation (README.md, docs/) against the code it describes.

- docs/configs.md documents every field of ``get_base_config()`` (nested ``data.*`` ones
  too), with its default, and no field that does not exist;
- every ``docs/...`` file (and heading) the README or a docs page links to exists;
- no file a user gets refers to the developers' ``../shared`` folder or its design notes.
"""

from __future__ import annotations

import pathlib
import re
import subprocess

import ml_collections

from htl_jax.train import checks
import pytest

from htl_jax.configs.base import get_base_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / 'docs'
CONFIGS_DOC = DOCS / 'configs.md'
# The header of the tables in docs/configs.md that list fields.
FIELD_HEADER = '| field | default | range | what it does |'


def base_fields(config: ml_collections.ConfigDict, prefix: str = '') -> dict[str, object]:
  """``{dotted name: default}`` of every leaf field of ``config``."""
  fields = {}
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      fields.update(base_fields(value, f'{prefix}{name}.'))
    else:
      fields[prefix + name] = value
  return fields


def documented_fields(text: str) -> list[tuple[str, str, str]]:
  """``(name, default cell, range cell)`` of every row of the field tables (FIELD_HEADER)
  in ``text`` (cells split on unescaped ``|``)."""
  rows, in_table = [], False
  for line in text.splitlines():
    if line.strip() == FIELD_HEADER:
      in_table = True
      continue
    if not in_table:
      continue
    if not line.startswith('|'):
      in_table = False
      continue
    cells = [cell.strip() for cell in re.split(r'(?<!\\)\|', line.strip().strip('|'))]
    if set(cells[0]) <= set('-: '):            # the separator row
      continue
    match = re.fullmatch(r'`([\w.]+)`', cells[0])
    assert match, f'docs/configs.md: a field row must start with `name`: {line!r}'
    rows.append((match.group(1), cells[1], cells[2]))
  return rows


def test_documented_fields_parses_only_field_tables():
  text = '\n'.join([
      '| config | changes |', '|---|---|', '| `kuairand` | batch |', '',
      FIELD_HEADER, '|---|---|---|---|', "| `model` | `'htlnet'` | `a` \\| `b` | which model |",
      '| `data.path` | `\'\'` | text | the file |', '', 'prose'])
  assert documented_fields(text) == [('model', "`'htlnet'`", '`a` \\| `b`'),
                                     ('data.path', "`''`", 'text')]


def test_configs_doc_lists_every_field_with_its_default():
  fields = base_fields(get_base_config())
  rows = documented_fields(CONFIGS_DOC.read_text(encoding='utf-8'))
  names = [name for name, _, _ in rows]
  duplicated = sorted({name for name in names if names.count(name) > 1})
  assert not duplicated, f'docs/configs.md lists these fields twice: {duplicated}'
  missing = sorted(set(fields) - set(names))
  assert not missing, f'fields of get_base_config() missing from docs/configs.md: {missing}'
  unknown = sorted(set(names) - set(fields))
  assert not unknown, f'docs/configs.md documents fields that do not exist: {unknown}'
  for name, default, allowed in rows:
    assert default == f'`{fields[name]!r}`', (
        f'docs/configs.md: {name} defaults to {fields[name]!r}, the doc says {default}')
    assert allowed == checks.FIELDS[name].describe(), (
        f'docs/configs.md: {name} may be {checks.FIELDS[name].describe()}, the doc says '
        f'{allowed}')


def test_every_field_has_a_range_and_its_default_is_in_it():
  fields = base_fields(get_base_config())
  assert set(checks.FIELDS) == set(fields)
  for name, allowed in checks.FIELDS.items():
    assert not allowed.problem(fields[name]), (name, fields[name])


def _user_files() -> list[pathlib.Path]:
  """The repository's files (tracked, or new and not ignored), tests excluded."""
  try:
    listed = subprocess.run(
        ['git', 'ls-files', '--cached', '--others', '--exclude-standard'], cwd=ROOT,
        capture_output=True, text=True, check=True).stdout.splitlines()
  except (OSError, subprocess.CalledProcessError):
    pytest.skip('not a git checkout: the repository\'s files are not known')
  return [ROOT / name for name in listed
          if not name.startswith('tests/') and (ROOT / name).is_file()]


def test_no_user_file_refers_to_the_developers_shared_folder():
  offenders = []
  for path in _user_files():
    try:
      text = path.read_text(encoding='utf-8')
    except UnicodeDecodeError:
      continue
    if '../shared' in text:
      offenders.append(str(path.relative_to(ROOT)))
  assert not offenders, f'files that refer to ../shared (users do not have it): {offenders}'


def _doc_pages() -> list[pathlib.Path]:
  return [ROOT / 'README.md'] + sorted(DOCS.glob('*.md'))


def heading_anchors(text: str) -> set[str]:
  """GitHub's anchors of the markdown headings in ``text`` (outside code blocks)."""
  anchors, in_code = set(), False
  for line in text.splitlines():
    if line.startswith('```'):
      in_code = not in_code
    elif not in_code and re.match(r'#{1,6} ', line):
      title = line.lstrip('#').strip().lower()
      anchors.add(re.sub(r'[^\w\- ]', '', title).replace(' ', '-'))
  return anchors


def test_heading_anchors_follow_github():
  assert heading_anchors('# A b\n```\n# not\n```\n## Check: `htl-check-data`\n') == {
      'a-b', 'check-htl-check-data'}


@pytest.mark.parametrize('page', _doc_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_links_resolve_and_name_no_design_notes(page):
  text = page.read_text(encoding='utf-8')
  assert 'DESIGN.md' not in text, f'{page.name} refers to DESIGN.md, which users do not have'
  for target, anchor in re.findall(r'\]\(([^)#\s]+\.md)(?:#([^)]*))?\)', text):
    if '://' in target:
      continue
    path = page.parent / target
    assert path.is_file(), f'{page.name} links to a missing {target}'
    if anchor:
      assert anchor in heading_anchors(path.read_text(encoding='utf-8')), (
          f'{page.name} links to {target}#{anchor}, which has no such heading')


def test_the_optax_guide_runs_as_written(capsys):
  """docs/optax.md's code blocks, in order, in one namespace (its asserts are the checks)."""
  text = (pathlib.Path(__file__).resolve().parents[1] / 'docs' / 'optax.md').read_text()
  blocks = re.findall(r'```python\n(.*?)```', text, re.S)
  assert len(blocks) >= 6
  namespace: dict = {}
  for i, block in enumerate(blocks):
    exec(compile(block, f'docs/optax.md, block {i + 1}', 'exec'), namespace)  # noqa: S102
  assert 'cos_core' in capsys.readouterr().out
