"""Training: optimizer, data, trainer."""
