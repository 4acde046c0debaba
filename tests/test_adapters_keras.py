"""keras_tap on keras.applications.ResNet50 and on Sequential / subclassed CNNs (random init, JAX
backend) against a hand-written ``jax.vjp`` Grad-CAM; layouts, errors, and the model left as it was."""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")  # before keras is imported

import threading  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import gradcam_jax as gcj  # noqa: E402
from gradcam_jax._keras import keras_layers, keras_tap  # noqa: E402

RAW = {"upsample": False, "normalize": False, "relu": False}


def values(variables):
    return [v.value for v in variables]


def hand_grad_cam(features, head, x, classes):
    """Grad-CAM by hand: ``A`` from a Keras sub-model, ``dA`` from ``jax.vjp`` of the head."""

    @jax.jit
    def run(trainable, non_trainable, x, cotangent):
        a, _ = features.stateless_call(trainable, non_trainable, x, training=False)
        scores, pull = jax.vjp(head, a)
        (da,) = pull(cotangent)
        return jnp.sum(jnp.mean(da, axis=(1, 2), keepdims=True) * a, axis=-1), scores

    cotangent = jax.nn.one_hot(jnp.asarray(classes), 10)
    maps, scores = run(
        values(features.trainable_variables), values(features.non_trainable_variables), x, cotangent
    )
    return np.asarray(maps), np.asarray(scores)


def dense_head(dense):
    """Global average pooling + a Dense layer, written out (the top of both test networks)."""
    kernel, bias = dense.kernel.value, dense.bias.value
    return lambda a: jnp.mean(a, axis=(1, 2)) @ kernel + bias


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# --------------------------------------------------------------------------------------------
# keras.applications.ResNet50


@pytest.fixture(scope="module")
def resnet50():
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(
        weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=None
    )
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    return model, x


def test_resnet50_grad_cam_equals_hand_written_vjp(resnet50):
    model, x = resnet50
    layer = model.get_layer("conv5_block3_out")
    features = keras.Model(model.inputs, layer.output)
    classes = np.array([3, 7])
    ref, _ = hand_grad_cam(features, dense_head(model.get_layer("predictions")), x, classes)
    tap = keras_tap(model, "conv5_block3_out")
    assert [s.shape for s in jax.eval_shape(tap, x)] == [(2, 10), (2, 2, 2, 2048)]
    maps = gcj.grad_cam(tap, x, classes, **RAW)
    assert maps.shape == (2, 2, 2)
    assert max_diff(maps, ref) <= 1e-5
    # The layer object works as well as its name, and gives the same compiled tap.
    assert keras_tap(model, layer).apply == tap.apply


# --------------------------------------------------------------------------------------------
# A Sequential CNN


def sequential_cnn(data_format="channels_last", name="seq"):
    shape = (3, 16, 16) if data_format == "channels_first" else (16, 16, 3)
    return keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Conv2D(6, 3, activation="relu", data_format=data_format, name="conv1"),
            keras.layers.Conv2D(8, 3, activation="relu", data_format=data_format, name="conv2"),
            keras.layers.GlobalAveragePooling2D(data_format=data_format, name="pool"),
            keras.layers.Dense(10, name="dense"),
        ],
        name=name,
    )


@pytest.fixture(scope="module")
def seq():
    keras.utils.set_random_seed(1)
    model = sequential_cnn()
    x = np.random.default_rng(1).normal(size=(2, 16, 16, 3)).astype(np.float32)
    return model, x


def test_sequential_grad_cam_for_every_target_kind(seq):
    model, x = seq
    assert keras_layers(model) == ["conv1", "conv2", "pool", "dense"]
    features = keras.Model(model.inputs, model.get_layer("conv2").output)
    head = dense_head(model.get_layer("dense"))
    tap = keras_tap(model, "conv2")
    _, scores = hand_grad_cam(features, head, x, [0, 0])
    for target, classes in [(None, scores.argmax(-1)), (4, [4, 4]), (np.array([1, 8]), [1, 8])]:
        ref, _ = hand_grad_cam(features, head, x, classes)
        assert max_diff(gcj.grad_cam(tap, x, target, **RAW), ref) <= 1e-5, target
    multi = np.array([[2, 5], [9, 0]])
    both = gcj.grad_cam(tap, x, multi, **RAW)
    assert both.shape == (2, 2, 12, 12)
    for k in range(2):
        assert max_diff(both[:, k], hand_grad_cam(features, head, x, multi[:, k])[0]) <= 1e-5


def test_maps_are_differentiable_with_respect_to_the_params(seq):
    model, x = seq
    tap = keras_tap(model, "conv2")
    trainable, non_trainable = tap.params
    assert len(trainable) == len(model.trainable_variables)
    assert len(non_trainable) == len(model.non_trainable_variables)
    loss = lambda p: gcj.grad_cam(tap.with_params(p), x, 3, **RAW).sum()
    grads = jax.grad(loss)(tap.params)
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(g).all() for g in leaves)
    assert sum(float(np.abs(g).sum()) for g in leaves) > 0


def test_guided_backprop_through_the_taps_scores(seq):
    model, x = seq
    tap = keras_tap(model, "conv2")
    guided = np.asarray(gcj.guided_backprop(lambda x: tap(x)[0], x, 2))
    plain = np.asarray(gcj.gradients(lambda x: tap(x)[0], x, 2))
    assert guided.shape == x.shape and np.isfinite(guided).all() and np.abs(guided).sum() > 0
    assert not np.allclose(guided, plain)  # the ReLUs' backward rule was swapped


def test_channels_first_model_gives_the_maps_of_the_same_weights_channels_last(seq):
    model, x = seq
    first = sequential_cnn("channels_first", name="seq_first")
    for mine, theirs in zip(first.weights, model.weights, strict=True):
        mine.assign(theirs.value)  # conv kernels are (kh, kw, in, out) in both layouts
    x_first = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    np.testing.assert_allclose(np.asarray(first(x_first)), np.asarray(model(x)), rtol=1e-5, atol=1e-5)
    tap_first = keras_tap(first, "conv2", activation_layout="NCHW")
    assert tap_first(x_first)[1].shape == (2, 12, 12, 8)  # brought to channels-last
    expected = gcj.grad_cam(keras_tap(model, "conv2"), x, [1, 6], **RAW)
    got = gcj.grad_cam(tap_first, x_first, [1, 6], layout="NCHW", **RAW)
    assert max_diff(got, expected) <= 1e-5


def test_the_model_is_unchanged_after_tapping(seq):
    model, x = seq
    layer = model.get_layer("conv2")
    before = [np.array(v.value) for v in model.weights]
    out_before = np.asarray(model(x))
    tap = keras_tap(model, "conv2")
    gcj.grad_cam(tap, x, 1, **RAW)
    tap.head(x, np.zeros((2, 12, 12, 8), np.float32))
    assert "call" not in vars(layer)
    assert layer.call.__func__ is type(layer).call
    for w0, v in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(w0, np.asarray(v.value))
    np.testing.assert_array_equal(np.asarray(model(x)), out_before)


def test_errors_unknown_layer_backend_unbuilt(seq, monkeypatch):
    model, _ = seq
    with pytest.raises(ValueError, match="no layer 'conv9'. Its layers, in order: conv1, conv2, pool, dense"):
        keras_tap(model, "conv9")
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="must be a built Keras model"):
        keras_tap(unbuilt, "dense")
    with pytest.raises(ValueError, match="the model itself"):
        keras_tap(model, model)
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    with pytest.raises(RuntimeError, match="KERAS_BACKEND=jax"):
        keras_tap(model, "conv2")


# --------------------------------------------------------------------------------------------
# Subclassed models: a shared layer, a nested sub-model, a non-array output


class SharedConv(keras.Model):
    def __init__(self):
        super().__init__()
        self.shared = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="shared")
        self.inner = keras.Sequential(
            [keras.layers.Conv2D(4, 3, activation="relu", name="conv")], name="inner"
        )
        self.head = keras.layers.Dense(5, name="head")

    def call(self, x):  # no training argument: the tap must not pass one
        h = self.inner(self.shared(self.shared(x)))
        return {"logits": self.head(jnp.mean(h, axis=(1, 2))), "features": h}


@pytest.fixture(scope="module")
def shared():
    keras.utils.set_random_seed(2)
    model = SharedConv()
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype(np.float32)
    model(x)
    return model, x


def test_subclassed_model_shared_layer_and_nested_sub_model(shared):
    model, x = shared
    assert keras_layers(model) == ["shared", "inner", "inner/conv", "head"]
    with pytest.raises(ValueError, match=r"called 2 times.*call=i"):
        keras_tap(model, "shared")(x)
    first, second = (keras_tap(model, "shared", call=i)(x)[1] for i in (0, 1))
    assert first.shape == second.shape == (2, 8, 8, 3) and not np.allclose(first, second)
    with pytest.raises(ValueError, match="call=2 asked for"):
        keras_tap(model, "shared", call=2)(x)
    # A nested layer by path, by bare name and as an object; the output dict's "logits" are the scores.
    tap = keras_tap(model, "inner/conv")
    scores, a = tap(x)
    assert scores.shape == (2, 5) and a.shape == (2, 6, 6, 4)
    assert keras_tap(model, "conv").apply == keras_tap(model, model.inner.layers[0]).apply == tap.apply
    np.testing.assert_allclose(np.asarray(a), np.asarray(model(x)["features"]), rtol=1e-6)
    picked = keras_tap(model, "inner/conv", output=lambda out: out["logits"][:, :3])
    assert picked(x)[0].shape == (2, 3)
    assert gcj.grad_cam(tap, x, 2, **RAW).shape == (2, 6, 6)


class CallsFromAnotherThread(keras.layers.Layer):
    """An identity layer that, while the model runs, runs ``side_call`` in another thread."""

    def __init__(self, side_call, **kwargs):
        super().__init__(**kwargs)
        self.side_call = side_call  # a function: Keras does not track it

    def call(self, x):
        thread = threading.Thread(target=self.side_call)
        thread.start()
        thread.join()
        return x


def test_a_layer_object_outside_the_model_is_not_called(shared):
    model, x = shared
    with pytest.raises(ValueError, match="was not called"):
        keras_tap(model, keras.layers.Dense(3))(x)


def test_another_thread_calling_the_layer_during_a_tap_sees_the_plain_layer():
    keras.utils.set_random_seed(3)
    conv = keras.layers.Conv2D(4, 3, activation="relu", name="conv")
    probe = np.random.default_rng(3).normal(size=(1, 6, 6, 2)).astype(np.float32)
    seen = []
    model = keras.Sequential(
        [
            keras.Input((6, 6, 2)),
            conv,
            CallsFromAnotherThread(lambda: seen.append(np.asarray(conv(probe)))),
            keras.layers.Flatten(),
        ]
    )
    plain = np.asarray(conv(probe))
    seen.clear()
    tap = keras_tap(model, "conv")
    # While the tap runs (eagerly), conv's call is shadowed; the other thread's call is neither
    # edited (replaced by zeros) nor counted as a second call of the tapped layer.
    head = tap.head(probe, np.zeros((1, 4, 4, 4), np.float32))
    assert not np.asarray(head).any()
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], plain)
    assert "call" not in vars(conv)
