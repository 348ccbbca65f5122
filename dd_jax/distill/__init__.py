"""Distillation: the jitted DM (+ IID) step and the resumable run around it."""

from dd_jax.distill.dm import (CentralizationExtractor, DistillState, DMSettings, init_state,
                               make_dm_step, matching_net_extractor)
from dd_jax.distill.loop import PreparedData, evaluate_images, prepare_data, run

__all__ = ['CentralizationExtractor', 'DistillState', 'DMSettings', 'PreparedData',
           'evaluate_images', 'init_state', 'make_dm_step', 'matching_net_extractor',
           'prepare_data', 'run']
