"""The MLflow pyfunc model that serves a trained ThreeLayerConvNet ("models from code").

MLflow copies this file into the logged model and runs it at load time; the
``set_model`` call at the bottom names the model. Nothing is pickled: the
network comes back from the model's ``checkpoint`` artifact (the .npz written by
ThreeLayerConvNet.save) and the training mean from its ``mean`` artifact (.npy).

    mlflow.pyfunc.load_model(model_uri).predict(images)

images: raw float images (N, C, H, W), before mean subtraction, as the dataset
stores them. Returns the predicted labels (N,) as int64.
"""

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from cnncore.cnn import ThreeLayerConvNet


class ConvNetClassifier(PythonModel):
    def load_context(self, context):
        self.net = ThreeLayerConvNet.load(context.artifacts["checkpoint"])
        mean = np.load(context.artifacts["mean"], allow_pickle=False)
        self.mean = mean.reshape(1, -1, 1, 1)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        images = np.asarray(model_input, dtype=np.float64)
        return self.net.predict(images - self.mean)


set_model(ConvNetClassifier())
