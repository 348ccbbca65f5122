"""`import dd_jax` reaches the public modules, and stays cheap until one is used."""

import subprocess
import sys

import dd_jax


def test_public_modules_are_attributes():
  for name in dd_jax.__all__:
    module = getattr(dd_jax, name)
    assert module.__name__ == f'dd_jax.{name}'
  assert callable(dd_jax.losses.mean_matching)
  assert set(dd_jax.__all__) <= set(dir(dd_jax))


def test_unknown_attribute_raises_attribute_error():
  try:
    dd_jax.no_such_module  # noqa: B018
  except AttributeError as error:
    assert 'no_such_module' in str(error)
  else:
    raise AssertionError('dd_jax.no_such_module did not raise')


def test_import_alone_does_not_load_jax():
  code = (
    'import sys, dd_jax; print("jax" in sys.modules); dd_jax.losses; print("jax" in sys.modules)'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.split() == ['False', 'True']
