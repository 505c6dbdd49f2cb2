"""The version lives in ``htl_jax/__init__.py`` only; what repeats it must agree with it.

``setup.py`` reads it from there; ``CITATION.cff`` must write it literally (the format has no
way to read it) and ``CHANGELOG.md``'s newest entry names it.
"""

from __future__ import annotations

import pathlib
import re

import htl_jax

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_version_is_written_once_in_the_package():
  assert re.fullmatch(r'\d+\.\d+\.\d+', htl_jax.__version__)
  setup = (ROOT / 'setup.py').read_text()
  assert htl_jax.__version__ not in setup          # read from htl_jax/__init__.py
  assert "version=VERSION" in setup


def test_citation_names_the_package_version():
  text = (ROOT / 'CITATION.cff').read_text()
  versions = re.findall(r'^version:\s*"?([^"\s]+)"?\s*$', text, re.MULTILINE)
  assert versions == [htl_jax.__version__]
  assert 'arXiv:2403.17442' in text and 'Touch the Core' in text


def test_changelog_starts_with_the_package_version():
  headings = re.findall(r'^## (\S+)', (ROOT / 'CHANGELOG.md').read_text(), re.MULTILINE)
  assert headings[0] == htl_jax.__version__
  assert len(set(headings)) == len(headings)
