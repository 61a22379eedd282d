"""Model-from-code entry point MLflow stores with every registered cpet model (nothing is pickled)."""

from mlflow.models import set_model

from cpet.tracking.pyfunc import CpetClassifier

set_model(CpetClassifier())
