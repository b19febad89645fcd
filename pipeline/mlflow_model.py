"""Entry file for MLflow's models-from-code logging: it names the pyfunc the registry stores.

MLflow runs this file when it loads the model, so no pickled object is needed.
"""

from mlflow.models import set_model

from pipeline.serving import CxrClassifier

set_model(CxrClassifier())
