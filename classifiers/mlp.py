"""The `mlp` head: a small Keras dense net behind the scikit-learn estimator API.

Why a hand-written loop (`train_on_batch`) and not `model.fit`: the same code then trains from an in-memory
array or from a RowStream over HDF5, batch by batch, with early stopping on a held-out validation split of the
training rows. Keras is imported only when this head is fitted or loaded, so other heads never pay for it.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from classifiers.data import iter_batches
from classifiers.holdout import start_streaming_fit


class KerasMLPClassifier(ClassifierMixin, BaseEstimator):
    """Dense(hidden, relu) -> Dropout -> ... -> Dense(classes, softmax), Adam, standardised inputs.

    >>> KerasMLPClassifier(hidden=(64,)).get_params()["hidden"]
    (64,)
    """

    def __init__(self, hidden=(256,), dropout: float = 0.5, learning_rate: float = 1e-3, batch_size: int = 64,
                 epochs: int = 200, patience: int = 10, validation_fraction: float = 0.15,
                 random_state: int | None = None):
        self.hidden = hidden
        self.dropout = dropout
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.epochs = epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def _build(self, n_features: int, n_classes: int):
        import keras

        keras.utils.set_random_seed(0 if self.random_state is None else int(self.random_state))
        x = inputs = keras.Input((n_features,))
        for units in self.hidden:
            x = keras.layers.Dense(units, activation="relu")(x)
            x = keras.layers.Dropout(self.dropout)(x)
        outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.Adam(self.learning_rate), loss="sparse_categorical_crossentropy")
        return model

    def fit(self, X, y, groups=None):
        """`groups`: image id per row; early stopping then watches held-out images, all their views together."""
        start = start_streaming_fit(X, y, self.validation_fraction, self.random_state, groups, 1024)
        self.classes_, self.scaler_ = start.classes, start.scaler
        codes, held_out, rng = start.codes, start.held_out, start.rng
        self.model_ = self._build(X.shape[1], len(self.classes_))
        best_loss, best_weights, waited = np.inf, self.model_.get_weights(), 0
        for epoch in range(self.epochs):
            for positions, batch in iter_batches(X, self.batch_size, rng):
                train = ~held_out[positions]
                if train.any():
                    self.model_.train_on_batch(self.scaler_.transform(batch[train]), codes[positions][train])
            # nothing held out (every class has one row): no early stopping, the latest weights are kept
            loss = self._validation_loss(X, codes, held_out) if held_out.any() else -epoch
            if loss < best_loss - 1e-4:
                best_loss, best_weights, waited = loss, self.model_.get_weights(), 0
            else:
                waited += 1
                if waited >= self.patience:
                    break
        self.model_.set_weights(best_weights)
        self.n_epochs_, self.validation_loss_ = epoch + 1, best_loss
        self.n_features_in_ = X.shape[1]
        return self

    def _validation_loss(self, X, codes: np.ndarray, held_out: np.ndarray) -> float:
        total = 0.0
        for positions, batch in iter_batches(X, 1024):
            val = held_out[positions]
            if val.any():
                proba = self.model_.predict_on_batch(self.scaler_.transform(batch[val]))
                total -= np.log(np.clip(proba[np.arange(val.sum()), codes[positions][val]], 1e-12, None)).sum()
        return total / held_out.sum()

    def predict_proba(self, X) -> np.ndarray:
        check_is_fitted(self, "model_")
        out = np.empty((X.shape[0], len(self.classes_)), dtype=np.float32)
        for positions, batch in iter_batches(X, 1024):
            out[positions] = self.model_.predict_on_batch(self.scaler_.transform(batch))
        return out

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)  # first: it raises NotFittedError on an unfitted head
        return self.classes_[np.argmax(proba, axis=1)]

    def save_keras(self, path: str | os.PathLike) -> None:
        """Write the fitted net alone as a `.keras` file (its input: standardised, reduced features)."""
        check_is_fitted(self, "model_")
        self.model_.save(path)

    # Serialising (skops in classifiers/saved.py, clone of a fitted copy) stores the net as the bytes of a `.keras`
    # archive, read back with safe_mode: no Lambda layer or other stored code is ever loaded.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if "model_" in state:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "net.keras")
                self.model_.save(path)
                with open(path, "rb") as file:
                    state["model_"] = file.read()
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("model_"), bytes):
            import keras

            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "net.keras")
                with open(path, "wb") as file:
                    file.write(state["model_"])
                state["model_"] = keras.saving.load_model(path, safe_mode=True)
        self.__dict__.update(state)
