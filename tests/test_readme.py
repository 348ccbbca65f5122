"""The README's library snippet runs as written."""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def test_library_snippet_runs():
  snippet = re.search(r'## Library use\n\n```python\n(.*?)```', README.read_text(), re.S)
  assert snippet, 'README.md has no "## Library use" python block'
  namespace = {}
  exec(snippet.group(1), namespace)  # noqa: S102  (the README's own code)
  assert set(namespace['metrics']) == {'loss', 'match', 'cc', 'cm', 'grad_norm'}
  assert namespace['cov'].shape == (128, 128)
  terms = namespace['terms']
  assert float(terms.total) == pytest.approx(float(terms.match + 0.05 * terms.cc + 0.01 * terms.cm))
