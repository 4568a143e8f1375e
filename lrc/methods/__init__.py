"""Distillation methods, one module per method: its model, its loss and its LightningModule (a
subclass of :class:`lrc.training.module.DistillModule`, chosen by lrc-distill's ``method`` group).

- :mod:`lrc.methods.lrc`: the low-rank clone (``method=lrc``, the default).
- :mod:`lrc.methods.students`: the plain student every method exports (shape, random init, saving).
- :mod:`lrc.methods.kd`: vanilla knowledge distillation (CE + KL; ``method=kd``).
- :mod:`lrc.methods.tinybert`: TinyBERT-style distillation (CE + KL + hidden-state and attention MSE;
  ``method=tinybert``).
"""
