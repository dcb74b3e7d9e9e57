"""Training: datasets, augmentation, sigma densities, the trainer and evaluation metrics."""
