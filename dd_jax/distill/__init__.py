"""Distillation methods (DM, IDM) behind one interface (`base.Method`), registered by name.

from dd_jax.distill import methods
method = methods.get('dm')
The resumable run around them: `dd_jax.run`.
"""
