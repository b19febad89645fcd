"""Training split by concern: data, trainer, optimiser and schedule, saved state, epoch loop, MLflow run."""
