"""Hyperparameter search with Optuna: search space, objective, study and workers, MLflow runs."""
