"""The reference ResNet: shapes, layer paths, parameter counts, and parity with torch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch  # test extras: torch==2.13.0 CPU

import gradcam_jax as gcj
from gradcam_jax.models import (
    BasicBlock,
    Bottleneck,
    Stem,
    init_resnet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
)
from gradcam_jax.models.resnet import resnet_for_torch, torch_state_dict_to_flax

tnn = torch.nn


def _param_count(model):
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 224, 224, 3))), jax.random.key(0))
    return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes["params"]))


# torchvision's published totals (parameters only; BatchNorm running stats are buffers).
@pytest.mark.parametrize(
    "factory, expected",
    [
        (resnet18, 11_689_512),
        (resnet34, 21_797_672),
        (resnet50, 25_557_032),
        (resnet101, 44_549_160),
        (resnet152, 60_192_808),
    ],
)
def test_parameter_count_matches_torchvision(factory, expected):
    assert _param_count(factory(num_classes=1000)) == expected


class _R18:
    """A small ResNet-18 shared by the tests below, with its jitted forward (compiled once)."""

    def __init__(self):
        self.model = resnet18(num_classes=7)
        self.variables = init_resnet(self.model, jax.random.key(0), image_size=32)
        self.x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
        self.forward = jax.jit(lambda v, x: self.model.apply(v, x))


@pytest.fixture(scope="module")
def r18():
    return _R18()


# jitted once so that taps of equal structure share a compilation
_run_tap = jax.jit(lambda tap, x: tap(x))


@pytest.fixture(scope="module")
def r50():
    # Abstract variables (shapes only): the ResNet-50 checks below trace, they never compute.
    model = resnet50(num_classes=5)
    return model, jax.eval_shape(lambda k: init_resnet(model, k, 64), jax.random.key(1))


def test_output_shape_and_variables(r18):
    variables = r18.variables
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["params"]) == {"stem", "stage1", "stage2", "stage3", "stage4", "head"}
    assert set(variables["params"]["stage3"]) == {"block0", "block1"}
    assert set(variables["params"]["stage1"]["block0"]) == {"conv1", "bn1", "conv2", "bn2"}
    assert "downsample_conv" in variables["params"]["stage2"]["block0"]
    out = r18.forward(variables, r18.x)
    assert out.shape == (2, 7) and out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 1e-3
    # The tap at stage4 does not change the model's output. 32 px / 32 = 1x1 spatial.
    scores, act = _run_tap(gcj.linen_tap(r18.model, variables, "stage4"), r18.x)
    assert act.shape == (2, 1, 1, 512)
    np.testing.assert_allclose(scores, out, rtol=1e-5, atol=1e-5)


def test_stage4_is_the_gradcam_layer_of_resnet50(r50):
    model, variables = r50
    x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
    layers = gcj.linen_layers(model, variables, x)
    assert layers[:3] == ["stem", "stem/conv", "stem/bn"]
    for path in (
        "stage1/block2",
        "stage2/block3",
        "stage3/block5",
        "stage4/block2",
        "head",
        "stage4/block0/downsample_conv",
    ):
        assert path in layers
    assert "stage4/block3" not in layers and "stage1/block0/downsample_bn" in layers

    # 64 px / 32 = 2x2 spatial, 512 * 4 = 2048 channels; 224 px gives the classic 7x7x2048.
    def tapped(v, x):
        return gcj.linen_tap(model, v, "stage4")(x)

    scores, act = jax.eval_shape(tapped, variables, x)
    assert act.shape == (2, 2, 2, 2048) and scores.shape == (2, 5)
    big = jax.eval_shape(tapped, variables, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    assert big[1].shape == (1, 7, 7, 2048) and big[1].dtype == jnp.float32


def test_grad_cam_runs_end_to_end(r18):
    tap = gcj.linen_tap(r18.model, r18.variables, "stage3")  # 2x2 maps at 32 px
    maps = gcj.grad_cam(tap, r18.x, target=[0, 6])
    assert maps.shape == (2, 2, 32, 32)
    assert bool(jnp.all((maps >= 0) & (maps <= 1)))


def test_bfloat16_compute_with_float32_params(r18):
    model, variables, x = r18.model, r18.variables, r18.x
    bf16 = model.clone(dtype=jnp.bfloat16)
    # Same parameters (all float32) whatever the compute dtype: one checkpoint serves both.
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(variables))
    assert jax.eval_shape(lambda k: init_resnet(bf16, k, 32), jax.random.key(0)) == jax.eval_shape(
        lambda k: init_resnet(model, k, 32), jax.random.key(0)
    )
    scores, act = _run_tap(gcj.linen_tap(bf16, variables, "stage4"), x)
    assert act.dtype == jnp.bfloat16 and scores.dtype == jnp.float32
    ref = np.asarray(r18.forward(variables, x))
    err = np.max(np.abs(np.asarray(scores) - ref))
    assert 0 < err < 0.1 * np.max(np.abs(ref))  # bf16 rounding: close, but not bit-identical


def test_train_mode_uses_batch_statistics(r18):
    model, variables = r18.model, r18.variables
    x = 3.0 + r18.x
    out, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    assert out.shape == (2, 7)
    before = variables["batch_stats"]["stem"]["bn"]["mean"]
    after = updates["batch_stats"]["stem"]["bn"]["mean"]
    assert not np.allclose(before, after)
    # Inference mode (the default) uses the running averages, so the scores differ.
    assert not np.allclose(out, r18.forward(variables, x), atol=1e-3)


# --------------------------------------------------------------------------------------------
# Parity with hand-written torch modules (torchvision's layout), weights copied across.
# --------------------------------------------------------------------------------------------


def _bn_torch(c, gen):
    bn = tnn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=gen) * 0.1)
        bn.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
        bn.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return bn


def _conv_torch(cin, cout, k, stride, gen):
    conv = tnn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (cin * k * k)) ** 0.5)
    return conv


class TorchBottleneck(tnn.Module):
    """torchvision's Bottleneck (v1.5: stride on the 3x3 conv), written out."""

    def __init__(self, cin, width, stride, gen):
        super().__init__()
        cout = 4 * width
        self.conv1, self.bn1 = _conv_torch(cin, width, 1, 1, gen), _bn_torch(width, gen)
        self.conv2, self.bn2 = _conv_torch(width, width, 3, stride, gen), _bn_torch(width, gen)
        self.conv3, self.bn3 = _conv_torch(width, cout, 1, 1, gen), _bn_torch(cout, gen)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = tnn.Sequential(_conv_torch(cin, cout, 1, stride, gen), _bn_torch(cout, gen))

    def forward(self, x):
        relu = torch.relu
        y = relu(self.bn1(self.conv1(x)))
        y = relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchBasicBlock(tnn.Module):
    def __init__(self, cin, width, stride, gen):
        super().__init__()
        self.conv1, self.bn1 = _conv_torch(cin, width, 3, stride, gen), _bn_torch(width, gen)
        self.conv2, self.bn2 = _conv_torch(width, width, 3, 1, gen), _bn_torch(width, gen)
        self.downsample = None
        if stride != 1 or cin != width:
            self.downsample = tnn.Sequential(_conv_torch(cin, width, 1, stride, gen), _bn_torch(width, gen))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchStem(tnn.Module):
    def __init__(self, gen):
        super().__init__()
        self.conv1, self.bn1 = _conv_torch(3, 64, 7, 2, gen), _bn_torch(64, gen)
        self.maxpool = tnn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):
        return self.maxpool(torch.relu(self.bn1(self.conv1(x))))


def _np(t):
    return t.detach().numpy()


def _port(torch_module, names):
    """Flax variables from torch: ``names`` maps flax submodule name -> torch conv/bn module."""
    params, stats = {}, {}
    for name, m in names.items():
        if m is None:
            continue
        if isinstance(m, tnn.Conv2d):
            params[name] = {"kernel": _np(m.weight).transpose(2, 3, 1, 0)}  # OIHW -> HWIO
        else:
            params[name] = {"scale": _np(m.weight), "bias": _np(m.bias)}
            stats[name] = {"mean": _np(m.running_mean), "var": _np(m.running_var)}
    return {"params": params, "batch_stats": stats}


def _block_names(tb):
    names = {k: getattr(tb, k) for k in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3") if hasattr(tb, k)}
    if tb.downsample is not None:
        names["downsample_conv"], names["downsample_bn"] = tb.downsample[0], tb.downsample[1]
    return names


def _compare(flax_module, variables, torch_module, x_nchw):
    torch_module.eval()
    with torch.no_grad():
        ref = _np(torch_module(x_nchw)).transpose(0, 2, 3, 1)  # NCHW -> NHWC
    x = jnp.asarray(_np(x_nchw).transpose(0, 2, 3, 1))
    # Check the ported tree has exactly the structure flax expects (no missing/extra weights).
    expected = jax.eval_shape(flax_module.init, jax.random.key(0), x)
    assert jax.tree_util.tree_structure(expected) == jax.tree_util.tree_structure(variables)
    for e, v in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(variables), strict=True):
        assert e.shape == v.shape
    out = flax_module.apply(variables, x)
    assert out.shape == ref.shape
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cin, width, stride", [(64, 32, 2), (128, 32, 1), (64, 16, 1)])
def test_bottleneck_matches_torch(cin, width, stride):
    # (64, 32, 2): strided with projection; (128, 32, 1): identity shortcut; (64, 16, 1):
    # projection without stride (the first block of stage1).
    gen = torch.Generator().manual_seed(cin + width + stride)
    tb = TorchBottleneck(cin, width, stride, gen)
    assert (tb.downsample is None) == (stride == 1 and cin == 4 * width)
    x = torch.randn(2, cin, 15, 15, generator=gen)  # odd size: exercises the stride-2 padding
    _compare(Bottleneck(width, stride=stride), _port(tb, _block_names(tb)), tb, x)


def test_basic_block_matches_torch():
    gen = torch.Generator().manual_seed(0)
    tb = TorchBasicBlock(32, 64, 2, gen)
    x = torch.randn(2, 32, 16, 16, generator=gen)
    _compare(BasicBlock(64, stride=2), _port(tb, _block_names(tb)), tb, x)


def test_stem_matches_torch():
    gen = torch.Generator().manual_seed(1)
    ts = TorchStem(gen)
    x = torch.randn(2, 3, 37, 37, generator=gen)  # odd size: padding of the conv and max-pool
    _compare(Stem(), _port(ts, {"conv": ts.conv1, "bn": ts.bn1}), ts, x)


def test_parity_catches_a_wrong_stride_placement():
    # The same weights with the stride on the first 1x1 conv (ResNet v1, not torchvision's
    # v1.5) must not match: the parity test above is able to fail.
    gen = torch.Generator().manual_seed(2)
    tb = TorchBottleneck(64, 32, 2, gen)
    tb.conv1.stride, tb.conv2.stride = (2, 2), (1, 1)
    with pytest.raises(AssertionError):
        x = torch.randn(2, 64, 16, 16, generator=gen)
        _compare(Bottleneck(32, stride=2), _port(tb, _block_names(tb)), tb, x)


# --------------------------------------------------------------------------------------------
# The converter: a whole torchvision-layout network, by parameter name
# --------------------------------------------------------------------------------------------


class TorchResNet(tnn.Module):
    """torchvision's names (conv1, bn1, layer{i}.{j}, fc) around the blocks above, any width."""

    def __init__(self, block, stage_sizes, gen, width=16, num_classes=5):
        super().__init__()
        self.conv1, self.bn1 = _conv_torch(3, width, 7, 2, gen), _bn_torch(width, gen)
        self.maxpool = tnn.MaxPool2d(3, stride=2, padding=1)
        expansion = 4 if block is TorchBottleneck else 1
        cin = width
        for i, n in enumerate(stage_sizes):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, width * 2**i, 2 if i > 0 and j == 0 else 1, gen))
                cin = width * 2**i * expansion
            setattr(self, f"layer{i + 1}", tnn.Sequential(*blocks))
        self.fc = tnn.Linear(cin, num_classes)
        self.stages = len(stage_sizes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(x.mean(dim=(2, 3)))


@pytest.mark.parametrize("block, sizes", [(TorchBasicBlock, (2, 1, 1, 1)), (TorchBottleneck, (1, 2, 1, 1))])
def test_torch_state_dict_to_flax_ports_a_whole_resnet(block, sizes):
    gen = torch.Generator().manual_seed(3)
    net = TorchResNet(block, sizes, gen).eval()
    model = resnet_for_torch(net)
    assert model.stage_sizes == sizes and model.width == 16 and model.num_classes == 5
    assert model.block_cls is (Bottleneck if block is TorchBottleneck else BasicBlock)
    variables = torch_state_dict_to_flax(net)
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 48, 48, 3)))
    assert jax.tree_util.tree_map(np.shape, variables) == jax.tree_util.tree_map(lambda a: a.shape, expected)
    x = torch.randn(2, 3, 48, 48, generator=gen)
    with torch.no_grad():
        ref = net(x).numpy()
    out = model.apply(variables, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


def test_torch_state_dict_to_flax_names_what_does_not_fit():
    net = TorchResNet(TorchBasicBlock, (1, 1, 1, 1), torch.Generator().manual_seed(4))
    state = {k: v.numpy() for k, v in net.state_dict().items()}  # NumPy arrays, as load_pth returns
    assert torch_state_dict_to_flax(state)["params"]["head"]["kernel"].shape == (128, 5)
    with pytest.raises(ValueError, match="no tensor 'fc.bias'"):
        torch_state_dict_to_flax({k: v for k, v in state.items() if k != "fc.bias"})
    with pytest.raises(ValueError, match="does not use"):
        torch_state_dict_to_flax({**state, "layer1.0.se.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="layer4"):
        torch_state_dict_to_flax({k: v for k, v in state.items() if not k.startswith("layer4.")})
