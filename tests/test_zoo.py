"""The pretrained zoo: the torch-free checkpoint reader, EfficientNet-Lite0's parity with
PyTorch, preprocessing, taps, the weight cache, and class discrimination on the demo picture."""

import collections
import io
import json
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # test extras: torch==2.13.0 CPU

import gradcam_jax as gcj
from gradcam_jax import zoo
from gradcam_jax.models.efficientnet_lite import EfficientNetLite, same_padding, torch_state_dict_to_flax
from gradcam_jax.zoo import PthError, load_pth
from gradcam_jax.zoo._entries import lite0_checkpoint

ASSETS = os.path.join(os.path.dirname(gcj.__file__), "assets")


def needs_weights(fn):
    """Marks tests on the real checkpoint (a required dependency: never skipped)."""
    return fn


# --------------------------------------------------------------------------------------------
# The .pth reader, on files written by torch.save
# --------------------------------------------------------------------------------------------

FORMATS = pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])

DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


def _save(obj, zip_format):
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=zip_format)
    return buf.getvalue()


def _to_numpy(t):
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.detach().numpy()


def _assert_same(ours, ref):
    if isinstance(ref, torch.Tensor):
        want = _to_numpy(ref)
        assert isinstance(ours, np.ndarray), type(ours)
        assert ours.dtype == want.dtype and ours.shape == want.shape
        np.testing.assert_array_equal(ours, want)
    elif isinstance(ref, dict):
        assert type(ours) is type(ref) and list(ours) == list(ref)
        for k in ref:
            _assert_same(ours[k], ref[k])
    elif isinstance(ref, (list, tuple)):
        assert type(ours) is type(ref) and len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            _assert_same(a, b)
    else:
        assert ours == ref


@FORMATS
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_pth_dtypes_and_shapes(zip_format, dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 3, 4, generator=g) * 50
    obj = collections.OrderedDict(
        scalar=base[0, 0, 0].clone().to(dtype),
        empty=torch.zeros(0, 5).to(dtype),
        vector=base.flatten()[:7].clone().to(dtype),
        cube=base.to(dtype),
    )
    ours = load_pth(io.BytesIO(_save(obj, zip_format)))
    _assert_same(ours, obj)


@FORMATS
def test_pth_non_contiguous_and_shared_storages(zip_format):
    a = torch.arange(60, dtype=torch.float32).reshape(3, 4, 5)
    shared = torch.arange(10, dtype=torch.int64)
    obj = {
        "transposed": a.transpose(0, 2),  # strides (1, 5, 20)
        "sliced": a[:, 1:3, ::2],  # offset and steps
        "expanded": torch.ones(3, 1).expand(3, 4),  # stride 0
        "base": shared,
        "view_a": shared[2:7],  # same storage, offset 2
        "view_b": shared.view(2, 5),  # same storage, reshaped
        "nested": [shared[::3], (a[0], {"deep": a[2, :, -1]})],
        "numbers": (1, 2.5, "text", None, True),
        "parameter": torch.nn.Parameter(torch.full((2, 2), 3.0)),
    }
    ours = load_pth(io.BytesIO(_save(obj, zip_format)))
    _assert_same(
        {k: v for k, v in ours.items() if k != "parameter"},
        {k: v for k, v in obj.items() if k != "parameter"},
    )
    np.testing.assert_array_equal(ours["parameter"], np.full((2, 2), 3.0, np.float32))
    # Every tensor owns its memory: editing one view leaves the others alone.
    ours["view_a"][0] = -1
    assert ours["base"][2] == 2 and ours["view_b"][0, 2] == 2


@FORMATS
def test_pth_module_state_dict_from_a_file(tmp_path, zip_format):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(5, 2))
    path = tmp_path / "net.pth"
    torch.save(net.state_dict(), path, _use_new_zipfile_serialization=zip_format)
    _assert_same(load_pth(path), net.state_dict())
    _assert_same(load_pth(str(path)), net.state_dict())


def test_pth_refuses_arbitrary_objects_and_damaged_files(tmp_path):
    # A global outside the allow-list is refused, not imported.
    with pytest.raises(PthError, match="collections.Counter"):
        load_pth(io.BytesIO(_save({"c": collections.Counter("ab")}, True)))
    with pytest.raises(PthError, match="collections.Counter"):
        load_pth(io.BytesIO(_save({"c": collections.Counter("ab")}, False)))
    with pytest.raises(PthError, match="Not a PyTorch checkpoint"):
        load_pth(io.BytesIO(b"\x89PNG\r\n\x1a\n not a checkpoint"))
    with pytest.raises(PthError, match="magic"):
        load_pth(io.BytesIO(pickle.dumps({"a": 1}, protocol=2)))
    # Truncated legacy data.
    data = _save({"w": torch.ones(100)}, False)
    with pytest.raises(PthError, match="truncated"):
        load_pth(io.BytesIO(data[:-40]))
    # A zip archive that is not a checkpoint.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(PthError, match="data.pkl"):
        load_pth(io.BytesIO(buf.getvalue()))


@needs_weights
def test_pth_reads_the_shipped_checkpoint_like_torch():
    path = lite0_checkpoint()
    ours = load_pth(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert list(ours) == list(ref) and len(ours) == 296
    _assert_same(ours, ref)


# --------------------------------------------------------------------------------------------
# Architecture and conversion (no weights needed)
# --------------------------------------------------------------------------------------------


def test_same_padding_is_tensorflows():
    # out = ceil(n / s); total = max((out - 1) * s + k - n, 0); smaller half first.
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(112, 3, 1) == (1, 1)
    assert same_padding(56, 5, 2) == (1, 2)
    assert same_padding(14, 5, 1) == (2, 2)
    assert same_padding(7, 1, 1) == (0, 0)
    assert same_padding(225, 3, 2) == (1, 1)


def _random_torch_state(seed=0):
    """A state dict with the PyTorch port's names and shapes, from a Flax init's shapes."""
    shapes = jax.eval_shape(EfficientNetLite().init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, kernel):  # flax (kh, kw, in, out) -> torch (out, in, kh, kw)
        kh, kw, i, o = kernel.shape
        state[name + ".weight"] = rng.normal(size=(o, i, kh, kw)).astype(np.float32)

    def bn(name, n):
        for key in ("weight", "bias", "running_mean"):
            state[f"{name}.{key}"] = rng.normal(size=n).astype(np.float32)
        state[f"{name}.running_var"] = rng.uniform(0.5, 2, size=n).astype(np.float32)
        state[f"{name}.num_batches_tracked"] = np.asarray(7)

    p = shapes["params"]
    conv("_conv_stem", p["stem"]["conv"]["kernel"])
    bn("_bn0", 32)
    for i in range(16):
        blk = p[f"blocks_{i}"]
        for ours, tconv, tbn in (
            ("expand", "_expand_conv", "_bn0"),
            ("depthwise", "_depthwise_conv", "_bn1"),
            ("project", "_project_conv", "_bn2"),
        ):
            if ours in blk:
                conv(f"_blocks.{i}.{tconv}", blk[ours]["conv"]["kernel"])
                bn(f"_blocks.{i}.{tbn}", blk[ours]["conv"]["kernel"].shape[-1])
    conv("_conv_head", p["head"]["conv"]["kernel"])
    bn("_bn1", 1280)
    state["_fc.weight"] = rng.normal(size=(1000, 1280)).astype(np.float32)
    state["_fc.bias"] = rng.normal(size=1000).astype(np.float32)
    return state, shapes


def test_conversion_fills_exactly_the_flax_tree():
    state, shapes = _random_torch_state()
    variables = torch_state_dict_to_flax(state)
    got = jax.tree_util.tree_map(lambda a: a.shape, variables)
    want = jax.tree_util.tree_map(lambda a: tuple(a.shape), shapes)
    assert got == want
    # 4.65M parameters: EfficientNet-Lite0's published size.
    shapes = jax.tree_util.tree_leaves(got["params"], is_leaf=lambda x: isinstance(x, tuple))
    n = sum(int(np.prod(s)) for s in shapes)
    assert n == 4_652_008
    # Depthwise kernels are (k, k, 1, C) and the dense kernel (in, out).
    assert variables["params"]["blocks_1"]["depthwise"]["conv"]["kernel"].shape == (3, 3, 1, 96)
    np.testing.assert_array_equal(variables["params"]["fc"]["kernel"], state["_fc.weight"].T)

    with pytest.raises(ValueError, match="no tensor '_fc.bias'"):
        torch_state_dict_to_flax({k: v for k, v in state.items() if k != "_fc.bias"})
    with pytest.raises(ValueError, match="does not use"):
        torch_state_dict_to_flax({**state, "_blocks.0._se_reduce.weight": np.zeros(3, np.float32)})


def test_random_weights_need_no_package():
    m = zoo.efficientnet_lite0(weights=None)
    state, _ = _random_torch_state()
    converted = torch_state_dict_to_flax(state)
    assert jax.tree_util.tree_map(np.shape, m.variables) == jax.tree_util.tree_map(np.shape, converted)
    assert m.source == "random" and len(m.class_names) == 1000
    kernel = np.asarray(m.variables["params"]["head"]["conv"]["kernel"])  # He-normal, fan-in 320
    assert abs(kernel.std() - np.sqrt(2 / 320)) < 0.01


# --------------------------------------------------------------------------------------------
# The pretrained model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gradcam_jax_cache")


@pytest.fixture(scope="module")
def model(cache):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADCAM_JAX_CACHE", str(cache))
    try:
        yield zoo.efficientnet_lite0()
    finally:
        mp.undo()


def _photos():
    import skimage.data as data

    return {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
    }


def _torch_reference_handwritten(state):
    """EfficientNet-Lite0 in plain torch.nn.functional (NCHW), written for this test."""
    import torch.nn.functional as F

    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}
    # (repeats, kernel, stride, expand, in, out), from the Lite0 block strings r1_k3_s11_e1_i32_o16 ...
    stages = [
        (1, 3, 1, 1, 32, 16),
        (2, 3, 2, 6, 16, 24),
        (2, 5, 2, 6, 24, 40),
        (3, 3, 2, 6, 40, 80),
        (3, 5, 1, 6, 80, 112),
        (4, 5, 2, 6, 112, 192),
        (1, 3, 1, 6, 192, 320),
    ]

    def conv(x, w, stride=1, groups=1):
        k = w.shape[-1]
        pads = []
        for n in (x.shape[3], x.shape[2]):  # F.pad wants (left, right, top, bottom)
            out = -(-n // stride)
            total = max((out - 1) * stride + k - n, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), w, stride=stride, groups=groups)

    def bn(x, p):
        return F.batch_norm(
            x,
            sd[p + ".running_mean"],
            sd[p + ".running_var"],
            sd[p + ".weight"],
            sd[p + ".bias"],
            training=False,
            eps=1e-3,
        )

    def relu6(x):
        return torch.clamp(x, 0.0, 6.0)

    def forward(x):
        x = relu6(bn(conv(x, sd["_conv_stem.weight"], 2), "_bn0"))
        i = 0
        for repeats, _k, stride, expand, c_in, c_out in stages:
            for r in range(repeats):
                s, cin = (stride, c_in) if r == 0 else (1, c_out)
                p = f"_blocks.{i}."
                h = x
                if expand != 1:
                    h = relu6(bn(conv(h, sd[p + "_expand_conv.weight"]), p + "_bn0"))
                h = relu6(bn(conv(h, sd[p + "_depthwise_conv.weight"], s, groups=h.shape[1]), p + "_bn1"))
                h = bn(conv(h, sd[p + "_project_conv.weight"]), p + "_bn2")
                x = h + x if (s == 1 and cin == c_out) else h
                i += 1
        x = relu6(bn(conv(x, sd["_conv_head.weight"]), "_bn1"))
        return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])

    return forward


def _torch_reference_package(dynamic_padding: bool):
    import contextlib

    import efficientnet_lite_pytorch as lite

    kwargs = {"image_size": None} if dynamic_padding else {}
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
        net = lite.EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(lite0_checkpoint()), **kwargs
        )
    net.eval()
    return net


@pytest.mark.parametrize("reference", ["package", "handwritten"])
def test_logits_match_pytorch_on_real_photos(model, reference):
    photos = _photos()
    x = model.preprocess(list(photos.values()))
    assert x.shape == (4, 224, 224, 3) and x.dtype == jnp.float32
    ours = np.asarray(model.logits(x))
    if reference == "package":
        fwd = _torch_reference_package(dynamic_padding=False)
    else:
        fwd = _torch_reference_handwritten(load_pth(lite0_checkpoint()))
    with torch.no_grad():
        ref = fwd(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
    err = float(np.abs(ours - ref).max())
    print(f"\nmax |logit difference| vs {reference} torch model on {list(photos)}: {err:.2e}")
    assert err < 1e-3
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    # And the predictions make sense for the two unambiguous photos.
    names = [model.class_names[i] for i in ours.argmax(-1)]
    assert names[0] in ("Egyptian cat", "tabby", "tiger cat"), names
    assert names[1] in ("espresso", "cup", "coffee mug"), names


def test_logits_match_pytorch_at_another_size(model):
    # Not 224: padding computed from the input (TensorFlow "SAME"), like the port's dynamic mode.
    x = model.preprocess(_photos()["coffee"], size=192)
    assert x.shape == (1, 192, 192, 3)
    ours = np.asarray(model.logits(x))
    fwd = _torch_reference_handwritten(load_pth(lite0_checkpoint()))
    with torch.no_grad():
        ref = fwd(torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(ours - ref).max() < 1e-3


def test_preprocess(model):
    gray = np.full((50, 80), 127, np.uint8)
    white = np.full((1, 30, 30, 3), 255, np.uint8)
    x = model.preprocess(gray)
    assert x.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(np.asarray(x), 0.0, atol=1e-6)  # (127 - 127) / 128
    # (255 - 127) / 128
    np.testing.assert_allclose(np.asarray(model.preprocess(white, size=64)), 1.0, atol=1e-6)
    rgba = np.zeros((20, 10, 4), np.uint8)
    assert model.preprocess([rgba, white[0], gray]).shape == (3, 224, 224, 3)
    with pytest.raises(ValueError, match="RGB"):
        model.preprocess(np.zeros((5, 5, 7), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        model.preprocess([])


def test_model_surface(model):
    assert len(model.class_names) == 1000
    assert model.class_names[285] == "Egyptian cat" and model.class_names[967] == "espresso"
    assert model.class_index("ESPRESSO") == 967
    with pytest.raises(ValueError, match="no class named"):
        model.class_index("unicorn")
    layers = model.layers
    for name in [
        "stem",
        "blocks_0",
        "blocks_15",
        "blocks_15/depthwise/conv",
        "head",
        "head/conv",
        "head/bn",
        "fc",
    ]:
        assert name in layers
    assert "blocks_16" not in layers
    assert "Pretrained('efficientnet_lite0'" in repr(model)


def test_tap_is_the_final_feature_map_after_relu6(model):
    x = model.preprocess(_photos()["chelsea"])
    scores, act = jax.jit(lambda t, x: t(x))(model.tap, x)
    assert act.shape == (1, 7, 7, 1280)
    # A ReLU6 output (the BatchNorm before it is negative in places), and some units saturate.
    assert float(act.min()) == 0.0 and float(act.max()) == 6.0
    np.testing.assert_allclose(np.asarray(scores), np.asarray(model.logits(x)), atol=1e-4)

    def shape_at(layer):
        return jax.eval_shape(lambda t, x: t(x), model.tap_at(layer), x)[1].shape

    assert shape_at("head/bn") == (1, 7, 7, 1280)
    assert shape_at("blocks_15") == (1, 7, 7, 320)
    assert shape_at("blocks_10") == (1, 14, 14, 112)
    assert shape_at("stem") == (1, 112, 112, 32)


def test_probs(model):
    p = np.asarray(model.probs(model.preprocess(_photos()["coffee"])))
    assert p.shape == (1, 1000) and abs(p.sum() - 1) < 1e-5
    top = model.top_k(model.preprocess(_photos()["coffee"]), 3)[0]
    assert top[0][0] == int(p.argmax()) and top[0][1] == model.class_names[top[0][0]]


def test_cache_written_reused_and_recovered(model, cache, monkeypatch):
    files = sorted(cache.glob("efficientnet_lite0-*.npz"))
    assert len(files) == 1
    manifest = json.loads(files[0].with_name(files[0].stem + ".manifest.json").read_text())
    assert manifest["arrays"]["params/fc/bias"]["shape"] == [1000]  # names, shapes, dtypes, SHA-256
    monkeypatch.setenv("GRADCAM_JAX_CACHE", str(cache))
    again = zoo.efficientnet_lite0()  # from the cache
    for a, b in zip(
        jax.tree_util.tree_leaves(model.variables), jax.tree_util.tree_leaves(again.variables), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    files[0].write_bytes(b"damaged")  # a damaged cache is rebuilt, not trusted
    rebuilt = zoo.efficientnet_lite0()
    np.testing.assert_array_equal(
        np.asarray(rebuilt.variables["params"]["fc"]["bias"]),
        np.asarray(model.variables["params"]["fc"]["bias"]),
    )
    assert files[0].stat().st_size > 1_000_000
    # A cache location that cannot be written is not an error: the model still loads.
    blocker = cache / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("GRADCAM_JAX_CACHE", str(blocker))
    assert zoo.efficientnet_lite0().variables["params"]["fc"]["kernel"].shape == (1280, 1000)


# --------------------------------------------------------------------------------------------
# Class discrimination on the two-object demo picture
# --------------------------------------------------------------------------------------------


def test_grad_cam_puts_each_class_on_its_own_object(model):
    from PIL import Image

    img = np.asarray(Image.open(os.path.join(ASSETS, "demo.jpg")).convert("RGB"))
    assert img.shape == (300, 632, 3)
    x = model.preprocess(img)
    top2 = [i for i, _, _ in model.top_k(x, 2)[0]]
    assert sorted(top2) == [285, 967], [model.class_names[i] for i in top2]  # both objects recognised

    maps = np.asarray(gcj.grad_cam(model.tap, x, target=[285, 967]))[0]  # (2, 224, 224), one forward
    half = maps.shape[-1] // 2
    cat_on_left = maps[0][:, :half].sum() / maps[0].sum()
    cup_on_right = maps[1][:, half:].sum() / maps[1].sum()
    print(
        f"\nGrad-CAM mass on its object's half: Egyptian cat (left) {cat_on_left:.3f}, "
        f"espresso (right) {cup_on_right:.3f}"
    )
    assert cat_on_left >= 0.85
    assert cup_on_right >= 0.85
