"""Distillation methods (DM, IDM) behind one interface, and the resumable run around them.

from dd_jax.distill import methods, loop
method = methods.get('dm')
results = loop.run(config, workdir)
"""
