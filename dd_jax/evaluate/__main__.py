"""`python -m dd_jax.evaluate`: see `dd_jax.evaluate.main`."""

from absl import app

from dd_jax import cli
from dd_jax.evaluate import main

if __name__ == '__main__':
  app.run(main.main, flags_parser=cli.parse_flags)
