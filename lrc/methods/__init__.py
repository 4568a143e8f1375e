"""Distillation methods other than the low-rank clone: one module per method.

- :mod:`lrc.methods.students`: the plain student every method exports (shape, random init, saving).
- :mod:`lrc.methods.kd`: vanilla knowledge distillation (CE + KL).
- :mod:`lrc.methods.tinybert`: TinyBERT-style distillation (CE + KL + hidden-state and attention MSE).
"""
