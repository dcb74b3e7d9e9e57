"""The samplers, one module per algorithm family; each stepper registers itself with ``@sampler``.

The registry imports every module of this package, so adding a sampler is adding a module here
(docs/ADDING-A-SAMPLER.md). :mod:`.common` holds the helpers the steppers share.
"""
