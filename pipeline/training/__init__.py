"""Training split by concern: data, trainer, optimiser and schedule, weight average, saved state, epoch loop, MLflow run."""
