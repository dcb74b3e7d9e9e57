"""kdiffusion-service: a k-diffusion style sampling core behind an HTTP service."""

__version__ = "0.1.0"
