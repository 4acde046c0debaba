"""One small ReLU conv net, built with identical weights in every framework the tests use.

conv3x3(3->8) ReLU, conv3x3(8->c2) ReLU  [the tapped layer, "block2"], conv3x3(c2->c2) ReLU,
global average pool, dense(c2->5). Weights come from NumPy (HWIO kernels); the torch copy
gets OIHW kernels.
"""

import numpy as np

NCLS = 5


def weights(seed=0, c2=16):
    r = np.random.default_rng(seed)

    def conv(cin, cout):
        return (r.normal(size=(3, 3, cin, cout)) * np.sqrt(2.0 / (9 * cin))).astype(np.float32), (
            r.normal(size=(cout,)) * 0.1
        ).astype(np.float32)

    return {
        "block1": conv(3, 8),
        "block2": conv(8, c2),
        "block3": conv(c2, c2),
        "fc": (
            (r.normal(size=(c2, NCLS)) / np.sqrt(c2)).astype(np.float32),
            (r.normal(size=(NCLS,)) * 0.1).astype(np.float32),
        ),
    }


def linen(w):
    import flax.linen as nn

    class Block(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            return nn.relu(nn.Conv(self.features, (3, 3), padding="SAME", name="conv")(x))

    class Net(nn.Module):
        c2: int

        @nn.compact
        def __call__(self, x):
            x = Block(8, name="block1")(x)
            x = Block(self.c2, name="block2")(x)
            x = Block(self.c2, name="block3")(x)
            return nn.Dense(NCLS, name="fc")(x.mean(axis=(1, 2)))

    params = {
        name: {"conv": {"kernel": w[name][0], "bias": w[name][1]}} for name in ("block1", "block2", "block3")
    }
    params["fc"] = {"kernel": w["fc"][0], "bias": w["fc"][1]}
    return Net(w["block2"][0].shape[-1]), {"params": params}


def nnx_model(w):
    import jax.numpy as jnp
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, cin, cout, kernel, bias, rngs):
            self.conv = nnx.Conv(cin, cout, (3, 3), padding="SAME", rngs=rngs)
            self.conv.kernel[...] = jnp.asarray(kernel)
            self.conv.bias[...] = jnp.asarray(bias)

        def __call__(self, x):
            return nnx.relu(self.conv(x))

    class Net(nnx.Module):
        def __init__(self, rngs):
            c2 = w["block2"][0].shape[-1]
            self.block1 = Block(3, 8, *w["block1"], rngs)
            self.block2 = Block(8, c2, *w["block2"], rngs)
            self.block3 = Block(c2, c2, *w["block3"], rngs)
            self.fc = nnx.Linear(c2, NCLS, rngs=rngs)
            self.fc.kernel[...] = jnp.asarray(w["fc"][0])
            self.fc.bias[...] = jnp.asarray(w["fc"][1])

        def __call__(self, x):
            x = self.block3(self.block2(self.block1(x)))
            return self.fc(x.mean(axis=(1, 2)))

    return Net(nnx.Rngs(0))


def equinox_model(w):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    class Block(eqx.Module):
        conv: eqx.nn.Conv2d

        def __call__(self, x):
            return jax.nn.relu(self.conv(x))

    class Net(eqx.Module):
        blocks: list
        fc: eqx.nn.Linear

        def __call__(self, x):  # one example, channels first
            for b in self.blocks:
                x = b(x)
            return self.fc(x.mean(axis=(1, 2)))

    key = jax.random.key(0)
    blocks = []
    for name, cin in (("block1", 3), ("block2", 8), ("block3", w["block2"][0].shape[-1])):
        k, b = w[name]
        conv = eqx.nn.Conv2d(cin, k.shape[-1], 3, padding=1, key=key)
        conv = eqx.tree_at(
            lambda c: (c.weight, c.bias),
            conv,
            (jnp.asarray(k.transpose(3, 2, 0, 1)), jnp.asarray(b)[:, None, None]),
        )
        blocks.append(Block(conv))
    fc = eqx.nn.Linear(w["fc"][0].shape[0], NCLS, key=key)
    fc = eqx.tree_at(
        lambda lin: (lin.weight, lin.bias), fc, (jnp.asarray(w["fc"][0].T), jnp.asarray(w["fc"][1]))
    )
    return Net(blocks, fc)


def split_functions(w):
    import jax
    import jax.numpy as jnp

    def conv(x, name):
        k, b = w[name]
        y = jax.lax.conv_general_dilated(
            x, jnp.asarray(k), (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return jax.nn.relu(y + b)

    def features(x):
        return conv(conv(x, "block1"), "block2")

    def head(a):
        return conv(a, "block3").mean(axis=(1, 2)) @ w["fc"][0] + w["fc"][1]

    return features, head


def torch_model(w, dtype=None):
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            c2 = w["block2"][0].shape[-1]
            self.conv1, self.relu1 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU()
            self.conv2, self.relu2 = torch.nn.Conv2d(8, c2, 3, padding=1), torch.nn.ReLU()
            self.conv3, self.relu3 = torch.nn.Conv2d(c2, c2, 3, padding=1), torch.nn.ReLU()
            self.fc = torch.nn.Linear(c2, NCLS)

        def forward(self, x):
            x = self.relu1(self.conv1(x))
            x = self.relu2(self.conv2(x))
            x = self.relu3(self.conv3(x))
            return self.fc(x.mean(dim=(2, 3)))

    net = Net()
    with torch.no_grad():
        for i, name in enumerate(("block1", "block2", "block3"), start=1):
            conv = getattr(net, f"conv{i}")
            conv.weight.copy_(torch.from_numpy(w[name][0].transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(w[name][1]))
        net.fc.weight.copy_(torch.from_numpy(w["fc"][0].T.copy()))
        net.fc.bias.copy_(torch.from_numpy(w["fc"][1]))
    if dtype is not None:
        net = net.to(dtype)
    return net.eval()


def pooled_split_functions(w, pool=4):
    """The same net with the tapped activation average-pooled by ``pool`` (so maps upsample)."""
    features, head = split_functions(w)

    def pooled_features(x):
        a = features(x)
        b, h, wd, c = a.shape
        return a.reshape(b, h // pool, pool, wd // pool, pool, c).mean(axis=(2, 4))

    return pooled_features, head


def torch_pooled_model(w, pool=4, dtype=None):
    """The torch twin of :func:`pooled_split_functions`; its ``pool`` module is the tapped layer."""
    import torch

    net = torch_model(w, dtype=dtype)

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.pool = torch.nn.AvgPool2d(pool)

        def forward(self, x):
            n = self.net
            a = self.pool(n.relu2(n.conv2(n.relu1(n.conv1(x)))))
            return n.fc(n.relu3(n.conv3(a)).mean(dim=(2, 3)))

    return Pooled().eval()


def haiku_net(w):
    """The same net in Haiku: modules ``block1..3`` (each ``relu(conv)``, its conv
    ``block<i>/conv``) and ``fc``. Returns ``(transformed, params)``."""
    import haiku as hk
    import jax
    import jax.numpy as jnp

    class Block(hk.Module):
        def __init__(self, features, name):
            super().__init__(name=name)
            self.features = features

        def __call__(self, x):
            return jax.nn.relu(hk.Conv2D(self.features, 3, padding="SAME", name="conv")(x))

    def f(x):
        for name in ("block1", "block2", "block3"):
            x = Block(w[name][0].shape[-1], name)(x)
        return hk.Linear(NCLS, name="fc")(x.mean(axis=(1, 2)))

    params = {f"{name}/conv": {"w": jnp.asarray(w[name][0]), "b": jnp.asarray(w[name][1])} for name in
              ("block1", "block2", "block3")}  # fmt: skip
    params["fc"] = {"w": jnp.asarray(w["fc"][0]), "b": jnp.asarray(w["fc"][1])}
    return hk.without_apply_rng(hk.transform(f)), params


def keras_net(w):
    """The same net as a Keras 3 Sequential model (JAX backend): layers ``block1..3``, ``pool``, ``fc``."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    layers = [keras.Input((None, None, 3))]
    for name in ("block1", "block2", "block3"):
        layers.append(
            keras.layers.Conv2D(w[name][0].shape[-1], 3, padding="same", activation="relu", name=name)
        )
    layers += [keras.layers.GlobalAveragePooling2D(name="pool"), keras.layers.Dense(NCLS, name="fc")]
    model = keras.Sequential(layers)
    for name in ("block1", "block2", "block3", "fc"):
        model.get_layer(name).set_weights([w[name][0], w[name][1]])
    return model
