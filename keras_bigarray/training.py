"""Training: `StreamingModel`, a `keras.Model` for the TensorFlow backend whose
compiled steps take padded batches at one static shape, cast the storage dtype on
the device, and average loss and metrics over the real rows of the global batch."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import keras
import numpy as np

from keras_bigarray import _keras_adapter
from keras_bigarray.dataset import BigArrayDataset

try:
    import tensorflow as tf
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        "keras_bigarray.StreamingModel needs TensorFlow: pip install "
        "'keras-bigarray[tf]' (or [tf-cpu])"
    ) from e

# Keras's functional machinery: a model called as `Cls(inputs, outputs)` becomes
# a `Functional`. Stable since Keras 3.0.
from keras.src.models import model as _keras_model
from keras.src.models.functional import Functional

__all__ = ["FunctionalStreamingModel", "StreamingBatches", "StreamingModel"]

# The key of the row mask in padded batches, and of the outputs beside it in
# what `predict_step` returns for them (`predict` drops the rows whose mask is 0).
_MASK = "bigarray_mask"
_OUTPUTS = "bigarray_outputs"


def _require_tensorflow() -> None:
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"StreamingModel runs on the TensorFlow backend only; Keras is using "
            f"the {backend!r} backend. Set KERAS_BACKEND=tensorflow before "
            "importing keras, or train a plain keras.Model on the "
            "BigArrayDataset (padded rows then get sample weight 0)."
        )


def _is_multi_worker(strategy: Any) -> bool:
    # The test Keras's own TF trainer uses (`_collective_all_reduce_multi_worker`).
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def _num_rows(t: Any) -> Any:
    """Rows of a batch tensor: a Python int when static, else a scalar tensor."""
    n = t.shape[0]
    return n if n is not None else tf.shape(t)[0]


def _expand(t: Any, rank: int) -> Any:
    """`t` with trailing axes of size 1 added up to `rank`."""
    while t.shape.rank < rank:
        t = tf.expand_dims(t, -1)
    return t


def _loss_rank(y_pred: Any) -> int:
    # Keras losses reduce the last axis of an output: (b, k) -> (b,), (b, t, k)
    # -> (b, t). Row weights broadcast against that.
    return max(1, y_pred.shape.rank - 1)


def _times_rows(weights: Any, rows: Any) -> Any:
    """User weights (any rank) times per-row factors (b,), broadcast on rows."""
    weights = tf.cast(weights, tf.float32)
    rank = max(weights.shape.rank, 1)
    return _expand(weights, rank) * _expand(rows, rank)


def _rows_for_outputs(rows: Any, sample_weight: Any, y_pred: Any) -> Any:
    """Per-row factors as Keras's `sample_weight` for `y_pred`'s structure."""
    if sample_weight is not None:
        return keras.tree.map_structure(lambda w: _times_rows(w, rows), sample_weight)
    return keras.tree.map_structure(lambda p: _expand(rows, _loss_rank(p)), y_pred)


@keras.saving.register_keras_serializable(package="keras_bigarray")
class StreamingModel(keras.Model):
    """A `keras.Model` whose steps are exact over padded, distributed batches.

    Keras compiles `train_step`, `test_step` and `predict_step` through
    `tf.function` (honouring `jit_compile` and `steps_per_execution`). On a
    `BigArrayDataset(..., pad_remainder=True)` every batch has one static shape,
    so a `fit` traces (and XLA compiles) the step once; the padding rows are
    masked out:

    - the loss is the mean over the real rows of the global batch, as Keras
      computes it on unpadded data on one device: a real row whose own weight is
      0 still counts in the denominator, padding rows do not. Row counts are
      all-reduced across replicas and workers, so uneven or partial batches under
      `tf.distribute` give the same weights as single-device training;
    - metrics ignore padding rows (`metrics` are weighted by the row mask,
      `weighted_metrics` by the sample weights times the mask);
    - `predict` returns exactly one prediction per real row;
    - inputs arrive in the storage dtype (uint8 stays uint8 in host memory and on
      the way to the device) and are cast inside the step (`decode_inputs`).

    Build it functionally, `StreamingModel(inputs, outputs)`, or subclass it and
    override `call`. A custom `train_step` can reuse the pieces: `unpack_batch`,
    `decode_inputs`, `batch_loss` and `compute_metrics(..., mask=mask)`.
    Mixed precision (`LossScaleOptimizer`) and the optimizer's
    `gradient_accumulation_steps` work as in Keras. Under
    `MultiWorkerMirroredStrategy`, pass the `BigArrayDataset` to `fit` (either
    one shard per worker, `num_shards=num_workers, shard_index=task_index`, or
    unsharded with `batch_size` the global batch): every worker runs exactly
    `len(dataset)` steps and every row of an epoch is trained on once.

    Limits: the loss scaling is exact for loss reductions that divide by the
    batch size (`"sum_over_batch_size"`, every Keras loss's default, and
    `"mean"`). Layers that mix rows in training, such as `BatchNormalization`,
    see padding rows. Only a `BigArrayDataset` passed to `fit`, `evaluate` or
    `predict` itself carries its row mask: its `to_tf_dataset()` does not, so
    padding rows would count as real rows of weight 0. Import
    `keras_bigarray.training` (or touch `kb.StreamingModel`) before
    `keras.models.load_model` of a saved StreamingModel, as for any custom
    class.

    Example:

    ```python
    import keras
    import numpy as np
    import keras_bigarray as kb

    x = np.random.rand(1000, 8).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    ds = kb.BigArrayDataset(x, y, batch_size=64, pad_remainder=True)
    inputs = keras.Input((8,))
    model = kb.StreamingModel(inputs, keras.layers.Dense(1)(inputs))
    model.compile("adam", "mse", jit_compile=True)
    model.fit(ds, epochs=2, verbose=0)   # one trace, every batch 64 rows
    pred = model.predict(kb.BigArrayDataset(x, batch_size=64, shuffle=False,
                                            pad_remainder=True), verbose=0)
    assert pred.shape == (1000, 1)
    ```
    """

    #: Input dtypes that `decode_inputs` casts to the model's compute dtype in a
    #: subclassed model: pixels, audio samples and floats. Wider integers
    #: (token ids, indices) pass as stored. Functional models cast each input
    #: to the dtype of its `keras.Input` instead.
    decode_dtypes: tuple[str, ...] = (
        "bool",
        "uint8",
        "int8",
        "int16",
        "float16",
        "bfloat16",
        "float32",
        "float64",
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        _require_tensorflow()
        target = cls
        if cls is StreamingModel and _keras_model.functional_init_arguments(
            args, kwargs
        ):
            target = FunctionalStreamingModel
        return keras.Model.__new__(target, *args, **kwargs)

    def __init__(self, *args: Any, **kwargs: Any):
        if _keras_model.functional_init_arguments(args, kwargs):
            # What keras.Model.__init__ does for a functional call, except that
            # Keras would rewrite the bases of StreamingModel itself (making
            # every later subclass a Functional); only the called class changes.
            if not isinstance(self, Functional):
                _inject_functional(type(self))
            _keras_model.Trainer.__init__(self)
            Functional.__init__(self, *args, **kwargs)
        else:
            super().__init__(*args, **kwargs)

    # ---- hooks for custom steps ------------------------------------------------
    @staticmethod
    def unpack_batch(data: Any) -> tuple[Any, Any, Any, Any]:
        """`(x, y, sample_weight, mask)` of a batch.

        Batches of a padded `BigArrayDataset` arrive as a dict with the keys
        `"x"`, `"y"`, `"sample_weight"` (the user's weights, 0 on padding; absent
        without) and `"bigarray_mask"` (1.0 for real rows, 0.0 for padding).
        Any other batch is unpacked by `keras.utils.unpack_x_y_sample_weight`
        and has `mask=None` (all rows real).
        """
        if isinstance(data, dict) and _MASK in data:
            return data["x"], data.get("y"), data.get("sample_weight"), data[_MASK]
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        return x, y, sample_weight, None

    def decode_inputs(self, x: Any) -> Any:
        """Casts inputs from their storage dtype to what `call` takes.

        Runs inside the compiled step, so the cast happens on the device and
        the batch travels at its storage size. A functional model leaves this
        to Keras, which casts each input to its `keras.Input` dtype; a
        subclassed model casts inputs whose dtype is in `decode_dtypes` to the
        model's compute dtype. Override to scale, e.g. `x / 255`.
        """
        if isinstance(self, Functional):
            return x
        dtype = self.compute_dtype

        def cast(t: Any) -> Any:
            if (
                t is None
                or keras.backend.standardize_dtype(t.dtype) not in self.decode_dtypes
            ):
                return t
            return keras.ops.cast(t, dtype)

        return keras.tree.map_structure(cast, x)

    def batch_loss(
        self,
        x: Any,
        y: Any,
        y_pred: Any,
        sample_weight: Any = None,
        mask: Any = None,
        training: bool = True,
    ) -> Any:
        """This replica's share of the loss, recorded in the `loss` metric.

        The shares of all replicas sum to what Keras computes on the real rows
        of the global batch on one device: the mean of the weighted per-row
        losses over the real rows (padding rows, `mask == 0`, are left out of
        the denominator), plus the regularization losses. Keras's own loss
        machinery computes it (`compute_loss`, with `loss_weights`, multiple
        outputs, sample weights); only the weights it is given are scaled.

        Args:
            x, y, y_pred: the batch on this replica and the model's outputs.
            sample_weight: the user's weights (0 on padding rows), or None.
            mask: 1.0 for real rows, 0.0 for padding, or None (all real).
            training: passed to `compute_loss`.

        Returns:
            A scalar to differentiate (through `optimizer.scale_loss`).
        """
        strategy = self.distribute_strategy
        replicas = strategy.num_replicas_in_sync
        first = (
            mask
            if mask is not None
            else next(t for t in keras.tree.flatten(x) if t is not None)
        )
        rows = _num_rows(first)
        real = tf.reduce_sum(mask) if mask is not None else tf.cast(rows, tf.float32)
        if replicas > 1:
            real_global = tf.distribute.get_replica_context().all_reduce(
                tf.distribute.ReduceOp.SUM, real
            )
        else:
            real_global = real
        if mask is None and replicas == 1:
            weights = sample_weight  # nothing to correct: exactly Keras
        else:
            # Keras divides each replica's weighted sum by its own row count
            # and by the replica count; these weights turn that into the sum
            # over the replica's real rows divided by the global real rows.
            scale = tf.cast(rows, tf.float32) * replicas / tf.maximum(real_global, 1.0)
            per_row = mask * scale if mask is not None else tf.fill([rows], scale)
            weights = _rows_for_outputs(per_row, sample_weight, y_pred)
        loss = self._compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=weights, training=training
        )
        if self._loss_tracker is not None:
            # Each replica adds its share times the global row count, so the
            # summed (on-read) metric is the row-weighted mean of global losses.
            self._loss_tracker.update_state(
                loss * replicas, sample_weight=real_global / replicas
            )
        return loss

    def compute_metrics(
        self, x: Any, y: Any, y_pred: Any, sample_weight: Any = None, mask: Any = None
    ) -> dict[str, Any]:
        """Updates the compiled metrics, leaving padding rows out.

        `metrics` get the row mask as their weight, `weighted_metrics` the
        sample weights (already 0 on padding). An override should accept
        `mask` and pass it on to `super().compute_metrics`.
        """
        del x
        cm = self._compile_metrics
        if cm is not None:
            if mask is None:
                cm.update_state(y, y_pred, sample_weight)
            else:
                _update_masked(cm, y, y_pred, sample_weight, mask)
        return self.get_metrics_result()

    # ---- the compiled steps ------------------------------------------------------
    def _forward(self, x: Any, training: bool) -> Any:
        if self._call_has_training_arg:
            return self(x, training=training)
        return self(x)

    def _metrics_with_mask(
        self, x: Any, y: Any, y_pred: Any, sample_weight: Any, mask: Any
    ) -> dict[str, Any]:
        if mask is None:
            return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        if "mask" in inspect.signature(self.compute_metrics).parameters:
            return self.compute_metrics(
                x, y, y_pred, sample_weight=sample_weight, mask=mask
            )
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def train_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight, mask = self.unpack_batch(data)
        x = self.decode_inputs(x)
        with tf.GradientTape() as tape:
            y_pred = self._forward(x, training=True)
            loss = self.batch_loss(x, y, y_pred, sample_weight, mask, training=True)
            if self.optimizer is not None:
                loss = self.optimizer.scale_loss(loss)
        if self.trainable_weights:
            grads = tape.gradient(loss, self.trainable_weights)
            self.optimizer.apply_gradients(
                zip(grads, self.trainable_weights, strict=True)
            )
        else:
            warnings.warn(
                "The model does not have any trainable weights.", stacklevel=2
            )
        return self._metrics_with_mask(x, y, y_pred, sample_weight, mask)

    def test_step(self, data: Any) -> dict[str, Any]:
        x, y, sample_weight, mask = self.unpack_batch(data)
        x = self.decode_inputs(x)
        y_pred = self._forward(x, training=False)
        self.batch_loss(x, y, y_pred, sample_weight, mask, training=False)
        return self._metrics_with_mask(x, y, y_pred, sample_weight, mask)

    def predict_step(self, data: Any) -> Any:
        x, _, _, mask = self.unpack_batch(data)
        y_pred = self._forward(self.decode_inputs(x), training=False)
        if mask is None:
            return y_pred
        return {_OUTPUTS: y_pred, _MASK: mask}

    def make_train_function(self, force: bool = False) -> Any:
        if self.train_function is not None and not force:
            return self.train_function
        self.train_function = self._make_function(self._synchronized(self.train_step))
        return self.train_function

    def make_test_function(self, force: bool = False) -> Any:
        if self.test_function is not None and not force:
            return self.test_function
        self.test_function = self._make_function(self._synchronized(self.test_step))
        return self.test_function

    def _synchronized(self, step: Any) -> Any:
        """`step` whose logs are global values, identical on every replica."""
        strategy = self.distribute_strategy
        if strategy.num_replicas_in_sync == 1:
            return step
        multi_worker = _is_multi_worker(strategy)

        def global_logs(strategy: Any, logs: Any) -> Any:
            # Cross-replica context: metric variables (synchronized on read,
            # summed) read as their totals over all replicas and workers.
            metric_logs = self.get_metrics_result()

            def one(key: Any, value: Any) -> Any:
                if isinstance(logs, dict) and key in metric_logs:
                    value = metric_logs[key]
                else:
                    value = strategy.reduce("MEAN", value, axis=None)
                if multi_worker and value.shape.rank == 0:
                    # Keras then means every log over workers along axis 0
                    # (a no-op on equal values), which a scalar lacks.
                    value = tf.reshape(value, [1])
                return value

            if isinstance(logs, dict):
                return {k: one(k, v) for k, v in logs.items()}
            return keras.tree.map_structure(lambda v: one(None, v), logs)

        def synchronized_step(data: Any) -> Any:
            logs = step(data)
            return tf.distribute.get_replica_context().merge_call(
                global_logs, args=(logs,)
            )

        return synchronized_step

    def _maybe_symbolic_build(
        self, iterator: Any = None, data_batch: Any = None
    ) -> None:
        # Keras builds from a first batch reduced over replicas with
        # `strategy.reduce`, which fails under MultiWorkerMirroredStrategy and
        # reads (and loses) a batch of ours; without a strategy it builds while
        # tracing the step, and creating the optimizer's variables there makes
        # tf.function trace the step a second time. A StreamingBatches knows
        # its batch spec, so the model, metrics and optimizer are built from
        # it, before the first trace, on any strategy.
        adapter = getattr(iterator, "data_adapter", None)
        if isinstance(adapter, StreamingBatches):
            data_batch = adapter.symbolic_batch()
            iterator = None
        elif self._distribute_strategy is None:
            return
        strategy = self.distribute_strategy
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = keras.tree.map_structure(
                    lambda v: (
                        strategy.experimental_local_results(v)[0]
                        if isinstance(v, tf.distribute.DistributedValues)
                        else v
                    ),
                    next(it),
                )
                break
        x, y, sample_weight, _ = self.unpack_batch(data_batch)
        x = keras.tree.map_structure(_symbolic, x)
        data_batch = (
            self.decode_inputs(x),
            keras.tree.map_structure(_symbolic, y),
            keras.tree.map_structure(_symbolic, sample_weight),
        )
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    # ---- fit / evaluate / predict take a BigArrayDataset with its mask -------------
    def _adapt(self, data: Any, class_weight: Any = None) -> Any:
        if isinstance(data, BigArrayDataset):
            if class_weight is not None:
                raise ValueError(
                    "class_weight does not apply to a BigArrayDataset; give the "
                    "dataset per-row sample_weight instead (e.g. an array of "
                    "class_weight[label] per row)."
                )
            return StreamingBatches(data, self.distribute_strategy)
        return data

    def fit(self, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(keras.Model.fit).bind(self, x, *args, **kwargs)
        a = bound.arguments
        a["x"] = self._adapt(a.get("x"), a.get("class_weight"))
        if a.get("validation_data") is not None:
            a["validation_data"] = self._adapt(a["validation_data"])
        return super().fit(*bound.args[1:], **bound.kwargs)

    def evaluate(self, x: Any = None, *args: Any, **kwargs: Any) -> Any:
        return super().evaluate(self._adapt(x), *args, **kwargs)

    def predict(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        data = self._adapt(x)
        out = super().predict(data, *args, **kwargs)
        if isinstance(out, dict) and set(out) == {_OUTPUTS, _MASK}:
            keep = np.asarray(out[_MASK]).reshape(-1) > 0
            return keras.tree.map_structure(lambda a: a[keep], out[_OUTPUTS])
        if isinstance(data, StreamingBatches) and data.padded:
            # A predict_step override that returns no mask: the real rows of
            # a single pipeline come first, padding last.
            if data.multi_worker:
                warnings.warn(
                    "predict_step returned no mask; predictions of padding rows "
                    "are included. Return StreamingModel.predict_step's output.",
                    stacklevel=2,
                )
                return out
            n = data.real_rows
            return keras.tree.map_structure(lambda a: a[:n], out)
        return out


@keras.saving.register_keras_serializable(package="keras_bigarray")
class FunctionalStreamingModel(StreamingModel, Functional):
    """What `StreamingModel(inputs, outputs)` returns: a functional StreamingModel."""


def _inject_functional(cls: type) -> type:
    """Makes `cls`, a StreamingModel subclass called as `cls(inputs, outputs)`,
    a functional model, leaving StreamingModel and its other subclasses alone."""
    if cls is StreamingModel:
        return FunctionalStreamingModel
    if not (isinstance(cls, type) and issubclass(cls, StreamingModel)):
        return cls
    cls.__bases__ = tuple(_inject_functional(b) for b in cls.__bases__)
    return cls


def _symbolic(v: Any) -> Any:
    if v is None or isinstance(v, keras.KerasTensor):
        return v
    return keras.KerasTensor(tuple(v.shape), keras.backend.standardize_dtype(v.dtype))


def _update_masked(cm: Any, y: Any, y_pred: Any, sample_weight: Any, mask: Any) -> None:
    """`CompileMetrics.update_state` with the row mask as the weight of the
    unweighted metrics (which Keras calls without weights)."""
    if not all(
        hasattr(cm, a)
        for a in ("_flatten_y", "_flat_metrics", "_flat_weighted_metrics")
    ):
        # A Keras whose CompileMetrics changed: weighted metrics stay exact.
        cm.update_state(y, y_pred, sample_weight if sample_weight is not None else mask)
        return
    if not cm.built:
        cm.build(y, y_pred)
    ys, ps = cm._flatten_y(y), cm._flatten_y(y_pred)
    for m, y_t, y_p in zip(cm._flat_metrics, ys, ps, strict=False):
        if m:
            m.update_state(y_t, y_p, sample_weight=_expand(mask, _loss_rank(y_p)))
    weights = cm._flatten_y(sample_weight) if sample_weight is not None else [mask]
    if len(weights) < len(ys):
        weights = [weights[0]] * len(ys)
    for m, y_t, y_p, w in zip(cm._flat_weighted_metrics, ys, ps, weights, strict=False):
        if m:
            m.update_state(y_t, y_p, sample_weight=_times_rows(w, mask))


class StreamingBatches(_keras_adapter.DataAdapter):
    """A `BigArrayDataset` as `StreamingModel` takes it: batches of a padded
    dataset carry their row mask (see `StreamingModel.unpack_batch`), and under
    `MultiWorkerMirroredStrategy` each worker reads its own shard.

    `StreamingModel.fit`, `evaluate` and `predict` wrap a `BigArrayDataset` in
    one; Keras takes a `DataAdapter` as it is, so the batch order is ours.
    """

    def __init__(self, ds: BigArrayDataset, strategy: Any):
        self.ds = ds
        self.strategy = strategy
        self.multi_worker = _is_multi_worker(strategy)
        self._source = ds
        self._distributed = None
        if self.multi_worker:
            parts: list[BigArrayDataset] = []
            self._distributed = strategy.distribute_datasets_from_function(
                lambda ctx: self._per_worker(ctx, parts)
            )
            self._source = parts[0]

    @property
    def padded(self) -> bool:
        return self._source.pad_remainder

    @property
    def real_rows(self) -> int:
        """Real rows of the shard this process reads."""
        src = self._source
        return src.sampler.layout.lengths[src.shard_index]

    def _masks(self, src: BigArrayDataset) -> tf.data.Dataset:
        # The reader fills each padded batch with its real rows first, so the
        # mask of batch i is the first (rows left) of batch_size slots.
        b, left = src.batch_size, src.sampler.layout.lengths[src.shard_index]
        slots = tf.range(b, dtype=tf.int64)
        return tf.data.Dataset.range(len(src)).map(
            lambda i: tf.cast(slots < left - i * b, tf.float32)
        )

    def _batches(self, src: BigArrayDataset) -> tf.data.Dataset:
        batches = src.to_tf_dataset()
        if not src.pad_remainder:
            return batches
        user_weights = src.sample_weight is not None

        def attach(batch: Any, mask: Any) -> Any:
            # A dict, not a tuple with None or empty Optionals for the missing
            # parts: MultiWorkerMirroredStrategy's iterators carry tensors only.
            packed = {"x": batch[0], _MASK: mask}
            if len(batch) > 1:
                packed["y"] = batch[1]
                # Without user weights the dataset's weights are the mask
                # itself: leave them out, so the mask is shaped per output.
                if user_weights:
                    packed["sample_weight"] = batch[2]
            return packed

        return tf.data.Dataset.zip((batches, self._masks(src))).map(attach)

    def _per_worker(self, ctx: Any, parts: list[BigArrayDataset]) -> tf.data.Dataset:
        ds = self.ds
        if ds.num_shards == 1:
            part = ds.for_input_context(ctx)  # batch_size is the global batch
        elif (ds.num_shards, ds.shard_index) == (
            ctx.num_input_pipelines,
            ctx.input_pipeline_id,
        ):
            part = ds  # already this worker's shard
        else:
            raise ValueError(
                f"under MultiWorkerMirroredStrategy with {ctx.num_input_pipelines} "
                f"workers, this worker (input pipeline {ctx.input_pipeline_id}) "
                f"received a dataset with num_shards={ds.num_shards}, "
                f"shard_index={ds.shard_index}. Pass num_shards="
                f"{ctx.num_input_pipelines}, shard_index={ctx.input_pipeline_id} "
                "(this worker's index), or an unsharded dataset whose batch_size "
                "is the global batch."
            )
        parts.append(part)
        batches = self._batches(part)
        local = ctx.num_replicas_in_sync // ctx.num_input_pipelines
        if local > 1:
            full = part.pad_remainder or not part.has_partial_batch
            if part.batch_size % local or not full:
                raise ValueError(
                    f"{local} replicas on this worker split each batch of "
                    f"{part.batch_size} rows: use a batch_size divisible by {local} "
                    "and pad_remainder=True."
                )
            batches = batches.rebatch(part.batch_size // local)
        return batches

    def symbolic_batch(self) -> Any:
        """The batch structure as `tf.TensorSpec`s, for building the model."""
        return self._batches(self._source).element_spec

    # ---- DataAdapter ---------------------------------------------------------------
    def get_tf_dataset(self) -> Any:
        if self._distributed is not None:
            return self._distributed
        return self._batches(self._source)

    def get_numpy_iterator(self) -> Any:
        raise NotImplementedError("StreamingModel runs on the TensorFlow backend")

    get_jax_iterator = get_torch_dataloader = get_numpy_iterator

    @property
    def num_batches(self) -> int:
        return len(self._source)

    @property
    def batch_size(self) -> int:
        return self._source.batch_size

    @property
    def has_partial_batch(self) -> bool:
        return self._source.has_partial_batch

    @property
    def partial_batch_size(self) -> int | None:
        return self._source.partial_batch_size

    # Each iteration of the tf.data pipeline claims the dataset's next epoch, so
    # fit's epochs are the dataset's epochs 0, 1, ... (Keras also calls
    # on_epoch_end once before the first epoch, which would skip epoch 0).
    def on_epoch_begin(self) -> None:
        pass

    def on_epoch_end(self) -> None:
        pass
