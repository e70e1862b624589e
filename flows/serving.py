"""The MLflow pyfunc model that serves a trained cnncore net ("models from code").

MLflow copies this file into the logged model and runs it at load time; the
``set_model`` call at the bottom names the model. Nothing is pickled: the
network comes back from the model's ``checkpoint`` artifact (the .npz written by
the net's save(), any cnncore model) and the training mean from its ``mean``
artifact (.npy).

    mlflow.pyfunc.load_model(model_uri).predict(images)

images: raw images (N, C, H, W), before mean subtraction, as the dataset stores
them, float32 or float64 (the dtypes the net computes in; float16 and integers are
refused rather than widened, as everywhere in the project), all finite. Returns the
predicted labels (N,) as int64. The model's signature declares only its output:
MLflow's input schema would admit a single dtype, and this model checks its input
itself, with errors that say what is wrong.

Loading a model runs this file as stored with the model: whoever can write the
artifact store can run code wherever models are loaded.
"""

import numpy as np
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from cnncore.checks import require_finite, require_float_array
from cnncore.classifier import load_model


class ConvNetClassifier(PythonModel):
    def load_context(self, context):
        self.net = load_model(context.artifacts["checkpoint"])
        mean = np.load(context.artifacts["mean"], allow_pickle=False)
        self.mean = mean.reshape(1, -1, 1, 1)

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        images = np.asarray(model_input)
        require_float_array("images", images)
        # A NaN image would otherwise be scored, and come out as class 0.
        require_finite("images", images)
        return self.net.predict(images - self.mean.astype(images.dtype))


set_model(ConvNetClassifier())
