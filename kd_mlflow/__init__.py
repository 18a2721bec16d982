"""kd-mlflow: ensembles, knowledge distillation and self-distillation as tracked,
reproducible MLflow runs."""

__version__ = "0.1.0"
