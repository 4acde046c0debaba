"""explain_dataset / open_results / explain-dir: stores checked against direct gcj calls, the
same store from 1 and 4 devices and from 2 jax.distributed processes, kill -9 and resume,
unreadable files, and the command line. Tiny images and the tiny conv net of tests/nets.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import gradcam_jax as gcj
from gradcam_jax.dataset import RecordError, explain_dataset, list_images, load_image, open_results

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "dataset_worker.py"
sys.path.insert(0, str(HERE))
import dataset_worker  # noqa: E402

N_GOOD = 70
CORRUPT = {"broken/truncated.png", "broken/empty.png", "notes.jpg"}


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """70 readable images (PNG and JPEG, RGB, grey, RGBA, several sizes, nested folders), 3
    unreadable ones, a hidden file and a non-image file."""
    root = tmp_path_factory.mktemp("images")
    r = np.random.default_rng(0)
    for i in range(N_GOOD):
        sub = ["", "a/", "a/b/", "c/"][i % 4]
        (root / sub).mkdir(parents=True, exist_ok=True)
        h, w = [(16, 16), (20, 16), (16, 24), (32, 32)][i % 4 if i % 5 else 0]
        arr = r.integers(0, 256, (h, w, 3), dtype=np.uint8)
        if i % 7 == 3:
            Image.fromarray(arr[..., 0]).save(root / f"{sub}img{i:03d}.png")  # grey
        elif i % 7 == 5:
            Image.fromarray(np.dstack([arr, arr[..., :1]])).save(root / f"{sub}img{i:03d}.png")  # RGBA
        elif i % 3 == 0:
            Image.fromarray(arr).save(root / f"{sub}img{i:03d}.jpg", quality=95)
        else:
            Image.fromarray(arr).save(root / f"{sub}img{i:03d}.png")
    (root / "broken").mkdir()
    good = (root / "a" / "b" / "img002.png").read_bytes()
    (root / "broken" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "broken" / "empty.png").write_bytes(b"")
    (root / "notes.jpg").write_text("this is not a JPEG")
    (root / "README.txt").write_text("not an image: not listed")
    (root / ".hidden.png").write_bytes(good)
    return root


@pytest.fixture(scope="module")
def tiny():
    return dataset_worker.model()


def _tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _assert_same_bytes(a: Path, b: Path):
    ta, tb = _tree(a), _tree(b)
    assert sorted(ta) == sorted(tb), f"file sets differ: {sorted(set(ta) ^ set(tb))[:10]}"
    differ = [k for k in ta if ta[k] != tb[k]]
    assert not differ, f"files differ: {differ[:10]}"


def _assert_same_contents(a: Path, b: Path):
    ra, rb = open_results(a), open_results(b)
    assert list(ra) == list(rb)
    for key in ra:
        x, y = np.asarray(ra[key][:]), np.asarray(rb[key][:])
        if x.dtype.kind in "fc":
            np.testing.assert_array_equal(x, y, err_msg=key)  # NaNs compare equal here
        else:
            assert x.astype(object).tolist() == y.astype(object).tolist(), key


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env


def _worker(*args, timeout=120):
    out = subprocess.run(
        [sys.executable, str(WORKER), *map(str, args)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=timeout,
        cwd=str(REPO),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _expected(tiny, image_dir, files, ok):
    """Direct computation: decode, preprocess, gcj.grad_cam at the layer, softmax top-5."""
    x = np.stack(
        [
            load_image(image_dir / f, 16) if good else np.zeros((16, 16, 3), np.uint8)
            for f, good in zip(files, ok, strict=True)
        ]
    )
    xp = tiny.preprocess(x)
    maps = np.asarray(gcj.grad_cam(tiny.tap, xp, upsample=False))
    probs = np.asarray(tiny.probs(xp))
    order = np.argsort(-probs, axis=-1, kind="stable")[:, :5]
    return maps, order, np.take_along_axis(probs, order, -1), probs.argmax(-1)


# --------------------------------------------------------------------------------------------
# Sources and decoding
# --------------------------------------------------------------------------------------------


def test_list_images_is_sorted_recursive_and_skips_hidden(image_dir):
    files = list_images(image_dir)
    assert files == sorted(files)
    assert len(files) == N_GOOD + len(CORRUPT)
    assert set(files) >= CORRUPT
    assert "README.txt" not in files and ".hidden.png" not in files
    assert any(f.startswith("a/b/") for f in files)


def test_load_image_converts_and_resizes(image_dir, tmp_path):
    big = np.random.default_rng(1).integers(0, 256, (40, 30), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "grey.png")
    out = load_image(tmp_path / "grey.png", 16)
    ref = np.asarray(Image.fromarray(big).convert("RGB").resize((16, 16), Image.BILINEAR))
    assert out.dtype == np.uint8 and out.shape == (16, 16, 3)
    np.testing.assert_array_equal(out, ref)
    for bad in CORRUPT:
        with pytest.raises(RecordError):
            load_image(image_dir / bad, 16)
    with pytest.raises(RecordError, match="no such file"):
        load_image(tmp_path / "missing.png", 16)


def _png16(rgb: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of ``rgb`` (uint16 ``(H, W, 3)``), written by hand (Pillow cannot)."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    raw = b"".join(b"\0" + rgb[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def _grey3(v: np.ndarray) -> np.ndarray:
    return np.repeat(v.astype(np.uint8)[..., None], 3, axis=-1)


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    c, a = rgb.astype(np.float64), alpha.astype(np.float64)[..., None]
    return np.round((c * a + 255.0 * (255.0 - a)) / 255.0).astype(np.uint8)


def test_sixteen_bit_and_wide_images_are_scaled_by_their_range(tmp_path):
    """Issue 19, finding 1: 16-bit grey became a white image (I;16 -> RGB clips at 255)."""
    r = np.random.default_rng(8)
    v = r.integers(0, 65536, (12, 20)).astype(np.uint16)
    v[0, :3] = [0, 255, 65535]
    for mode, order, ext in (("I;16", "<u2", "png"), ("I;16B", ">u2", "tif"), ("I;16", "<u2", "tif")):
        path = tmp_path / f"{mode.replace(';', '')}.{ext}"
        Image.frombytes(mode, (20, 12), v.astype(order).tobytes()).save(path)
        np.testing.assert_array_equal(load_image(path, None), _grey3(v >> 8), err_msg=f"{mode} {ext}")
    rgb = r.integers(0, 65536, (5, 7, 3)).astype(np.uint16)
    (tmp_path / "rgb16.png").write_bytes(_png16(rgb))
    np.testing.assert_array_equal(load_image(tmp_path / "rgb16.png", None), (rgb >> 8).astype(np.uint8))
    Image.fromarray(v.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I, 16-bit values
    np.testing.assert_array_equal(load_image(tmp_path / "i32.tif", None), _grey3(v >> 8))
    wide = v.astype(np.int32) * 3 - 70000  # beyond 16 bits: stretched from its min to its max
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    stretched = np.round((wide - wide.min()) * 255.0 / (wide.max() - wide.min()))
    np.testing.assert_array_equal(load_image(tmp_path / "wide.tif", None), _grey3(stretched))
    # Resized as an 8-bit image of the same picture is.
    ref = np.asarray(Image.fromarray(_grey3(v >> 8)).resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(load_image(tmp_path / "I16.png", 8), ref)


def test_float_images(tmp_path):
    f = np.random.default_rng(9).random((6, 9)).astype(np.float32)
    Image.fromarray(f).save(tmp_path / "unit.tif")
    np.testing.assert_array_equal(load_image(tmp_path / "unit.tif", None), _grey3(np.rint(f * 255.0)))
    g = f * 40.0 - 7.0
    Image.fromarray(g).save(tmp_path / "any.tif")
    expected = np.rint((g.astype(np.float64) - g.min()) * (255.0 / (g.max() - g.min())))
    np.testing.assert_array_equal(load_image(tmp_path / "any.tif", None), _grey3(expected))
    g[2, 3] = np.nan
    Image.fromarray(g).save(tmp_path / "nan.tif")
    with pytest.raises(RecordError, match="NaN or infinite"):
        load_image(tmp_path / "nan.tif", None)


def test_alpha_palette_and_cmyk(tmp_path):
    r = np.random.default_rng(10)
    rgba = r.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    rgba[0, 0, 3], rgba[0, 1, 3] = 0, 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = load_image(tmp_path / "rgba.png", None)
    np.testing.assert_array_equal(got, _on_white(rgba[..., :3], rgba[..., 3]))
    assert (got[0, 0] == 255).all() and (got[0, 1] == rgba[0, 1, :3]).all()
    la = rgba[..., [0, 3]]
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(
        load_image(tmp_path / "la.png", None), _on_white(_grey3(la[..., 0]), la[..., 1])
    )

    palette = r.integers(0, 256, (4, 3), dtype=np.uint8)
    index = r.integers(0, 4, (7, 8), dtype=np.uint8)
    p = Image.fromarray(index, "P")
    p.putpalette(palette.reshape(-1).tolist())
    p.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png", None), palette[index])
    p.save(tmp_path / "p_transparent.png", transparency=2)  # index 2 is see-through: white
    expected = np.where((index == 2)[..., None], np.uint8(255), palette[index])
    np.testing.assert_array_equal(load_image(tmp_path / "p_transparent.png", None), expected)

    cmyk = r.integers(0, 256, (4, 6, 4), dtype=np.uint8)
    Image.frombytes("CMYK", (6, 4), cmyk.tobytes()).save(tmp_path / "cmyk.tif")
    k = cmyk[..., 3:].astype(np.float64)
    expected = np.round((255.0 - cmyk[..., :3]) * (255.0 - k) / 255.0).astype(np.uint8)
    np.testing.assert_array_equal(load_image(tmp_path / "cmyk.tif", None), expected)


def test_exif_orientation_and_minimum_size(tmp_path):
    arr = np.random.default_rng(11).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6  # the camera was turned: show the stored rows rotated 90 degrees clockwise
    im.save(tmp_path / "turned.png", exif=exif)
    np.testing.assert_array_equal(load_image(tmp_path / "turned.png", None), np.rot90(arr, k=-1))
    for h, w in ((1, 1), (1, 40), (40, 1)):
        Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(tmp_path / f"{h}x{w}.png")
        with pytest.raises(RecordError, match=f"image is only {w} x {h} pixels; at least 2 x 2 are needed"):
            load_image(tmp_path / f"{h}x{w}.png", 16)
    Image.fromarray(arr[:2, :2]).save(tmp_path / "2x2.png")
    assert load_image(tmp_path / "2x2.png", None).shape == (2, 2, 3)


# --------------------------------------------------------------------------------------------
# In-process runs: contents against direct computations
# --------------------------------------------------------------------------------------------


def test_folder_store_matches_direct_grad_cam(image_dir, tiny, tmp_path):
    out = tmp_path / "s.zarr"
    run = explain_dataset(image_dir, tiny, out=out, batch_size=16, progress=False)
    total = N_GOOD + len(CORRUPT)
    assert (run.records, run.explained, run.unreadable, run.processed) == (total, N_GOOD, 3, total)

    res = open_results(out)
    assert set(res) == {"maps", "classes", "probs", "targets", "files", "errors"}
    assert res.complete and res.summary == {"images": total, "explained": N_GOOD, "unreadable": 3}
    files = np.asarray(res["files"][:]).astype(object).tolist()
    assert files == list_images(image_dir)
    ok = res.ok()
    assert {f for f, good in zip(files, ok, strict=True) if not good} == CORRUPT
    assert sorted(f for f, _ in res.failures()) == sorted(CORRUPT)
    assert all(reason for _, reason in res.failures())

    maps, classes, probs, top1 = _expected(tiny, image_dir, files, ok)
    got = np.asarray(res["maps"][:])
    assert got.dtype == np.float16 and got.shape == (total, 16, 16)
    np.testing.assert_allclose(got[ok].astype(np.float32), maps[ok], atol=1e-3)
    assert np.isnan(got[~ok]).all()
    np.testing.assert_array_equal(res["classes"][:][ok], classes[ok])
    np.testing.assert_allclose(res["probs"][:][ok], probs[ok], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(res["targets"][:][ok], top1[ok])
    assert (res["classes"][:][~ok] == -1).all() and np.isnan(res["probs"][:][~ok]).all()
    assert not (out / ".progress").exists()


def test_store_is_plain_zarr_and_tensorstore_reads_numbers(image_dir, tiny, tmp_path):
    import tensorstore as ts
    import zarr

    out = tmp_path / "s.zarr"
    explain_dataset(image_dir, tiny, out=out, batch_size=16, progress=False)
    g = zarr.open_group(str(out), mode="r")
    assert g["maps"].shape == (N_GOOD + 3, 16, 16) and g["maps"].dtype == np.float16
    assert g.attrs["gradcam_jax"]["complete"] is True
    for name in ("maps", "classes", "probs", "targets"):
        t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(out / name)}}).result()
        np.testing.assert_array_equal(t.read().result(), g[name][:])


def test_array_source_methods_topk_input_resolution(tiny, tmp_path):
    x = np.random.default_rng(3).integers(0, 256, (13, 16, 16, 3), dtype=np.uint8)
    methods = ["grad_cam", "grad_cam_plus_plus", "layer_cam"]
    run = explain_dataset(
        x,
        tiny,
        out=tmp_path / "a.zarr",
        methods=methods,
        target="top2",
        batch_size=4,
        device_batch=2,
        resolution="input",
        progress=False,
    )
    assert run.processed == 13 and run.unreadable == 0
    res = open_results(run.path)
    assert res.methods == ["grad_cam", "grad_cam_plus_plus", "layer_cam"]
    assert res["maps"].shape == (13, 3, 2, 16, 16) and res["targets"].shape == (13, 2)
    assert np.asarray(res["files"][:]).astype(object).tolist() == [f"#{i}" for i in range(13)]
    xp = tiny.preprocess(x)
    top2 = np.asarray(jax.lax.top_k(tiny.logits(xp), 2)[1])
    np.testing.assert_array_equal(res["targets"][:], top2)
    for i, method in enumerate(res.methods):
        ref = np.asarray(gcj.cam(tiny.tap, xp, target=top2, method=method))
        np.testing.assert_allclose(res["maps"][:, i].astype(np.float32), ref, atol=1e-3, err_msg=method)


def test_per_record_and_fixed_targets(tiny, tmp_path):
    x = np.random.default_rng(4).integers(0, 256, (10, 16, 16, 3), dtype=np.uint8)
    xp = tiny.preprocess(x)
    labels = np.random.default_rng(5).integers(0, 5, 10)
    res = explain_dataset(
        x, tiny, out=tmp_path / "l.zarr", target=labels, batch_size=8, progress=False
    ).results()
    np.testing.assert_array_equal(res["targets"][:], labels)
    ref = np.asarray(gcj.grad_cam(tiny.tap, xp, target=labels, upsample=False))
    np.testing.assert_allclose(res["maps"][:].astype(np.float32), ref, atol=1e-3)
    res = explain_dataset(
        x, tiny, out=tmp_path / "f.zarr", target=[4, 1], batch_size=8, top=2, progress=False
    ).results()
    assert res["maps"].shape == (10, 2, 16, 16) and res["classes"].shape == (10, 2)
    np.testing.assert_array_equal(res["targets"][:], np.broadcast_to([4, 1], (10, 2)))
    ref = np.asarray(gcj.grad_cam(tiny.tap, xp, target=[4, 1], upsample=False))
    np.testing.assert_allclose(res["maps"][:].astype(np.float32), ref, atol=1e-3)


def test_plain_tap_with_preprocess(tmp_path):
    import nets

    module, variables = nets.linen(nets.weights(1))
    tap = gcj.linen_tap(module, variables, "block2")
    x = np.random.default_rng(6).normal(size=(6, 12, 12, 3)).astype(np.float32)
    res = explain_dataset(
        x, tap, out=tmp_path / "t.zarr", batch_size=2, preprocess=lambda b: b * 2.0, progress=False
    ).results()
    ref = np.asarray(gcj.grad_cam(tap, x * 2.0, upsample=False))
    np.testing.assert_allclose(res["maps"][:].astype(np.float32), ref, atol=1e-3)


def test_rerun_of_a_complete_job_does_nothing(image_dir, tiny, tmp_path):
    out = tmp_path / "s.zarr"
    explain_dataset(image_dir, tiny, out=out, batch_size=16, progress=False)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    run = explain_dataset(image_dir, tiny, out=out, batch_size=16, progress=False)
    assert run.already_complete and run.processed == 0 and run.unreadable == 3
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_failed_run_resumes_with_the_stored_file_list(image_dir, tiny, tmp_path, monkeypatch):
    """A run that dies mid-way (here: the disk 'fails' at the 3rd commit) leaves a partial
    store; images added to the folder afterwards are not part of the job; the resumed run
    ends with the bytes of an uninterrupted one."""
    import shutil

    from gradcam_jax.dataset import store

    folder = tmp_path / "imgs"
    shutil.copytree(image_dir, folder)
    ref = tmp_path / "ref.zarr"
    explain_dataset(folder, tiny, out=ref, batch_size=8, progress=False)

    real = store.write_marker
    calls = []

    def failing(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    out = tmp_path / "out.zarr"
    monkeypatch.setattr(store, "write_marker", failing)
    with pytest.raises(RuntimeError, match="writing the store failed"):
        explain_dataset(folder, tiny, out=out, batch_size=8, progress=False)
    monkeypatch.setattr(store, "write_marker", real)
    assert not open_results(out).complete and len(list((out / ".progress").glob("*.json"))) == 2

    shutil.copy(folder / "a" / "b" / "img002.png", folder / "zz_new.png")
    run = explain_dataset(folder, tiny, out=out, batch_size=8, progress=False)
    assert run.resumed_at == 16 and run.processed == N_GOOD + 3 - 16
    _assert_same_bytes(ref, out)


def test_other_job_in_store_is_refused_and_resume_false_restarts(tiny, tmp_path):
    x = np.random.default_rng(7).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    out = tmp_path / "s.zarr"
    explain_dataset(x, tiny, out=out, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="different job.*methods"):
        explain_dataset(x, tiny, out=out, batch_size=4, methods="layer_cam", progress=False)
    run = explain_dataset(x, tiny, out=out, batch_size=4, methods="layer_cam", resume=False, progress=False)
    assert run.processed == 8 and open_results(out).methods == ["layer_cam"]
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        explain_dataset(x, tiny, out=other, batch_size=4, progress=False)
    with pytest.raises(FileExistsError):
        explain_dataset(x, tiny, out=other, batch_size=4, resume=False, progress=False)
    assert (other / "precious.txt").read_text() == "keep me"


def test_bad_arguments(tiny, tmp_path, image_dir):
    x = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="device_batch=3 must divide"):
        explain_dataset(x, tiny, out=tmp_path / "a", batch_size=4, device_batch=3, progress=False)
    with pytest.raises(ValueError, match="out of range.*5 classes"):
        explain_dataset(x, tiny, out=tmp_path / "b", target=7, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="resolution"):
        explain_dataset(x, tiny, out=tmp_path / "c", resolution="full", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no records"):
        explain_dataset(tmp_path / "empty", tiny, out=tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match="unknown method|not a registered|Unknown"):
        explain_dataset(x, tiny, out=tmp_path / "e", methods="sorcery", progress=False)
    assert not any((tmp_path / n).exists() for n in "abcde")


# --------------------------------------------------------------------------------------------
# Devices, processes, kill and resume (subprocesses)
# --------------------------------------------------------------------------------------------


def test_four_devices_write_the_same_store_as_one(image_dir, tmp_path):
    one = _worker("--src", image_dir, "--out", tmp_path / "one.zarr", "--devices", 1, "--batch-size", 32)
    four = _worker("--src", image_dir, "--out", tmp_path / "four.zarr", "--devices", 4, "--batch-size", 32)
    assert (one["devices"], four["devices"]) == (1, 4)
    assert one["processed"] == four["processed"] == N_GOOD + 3
    _assert_same_bytes(tmp_path / "one.zarr", tmp_path / "four.zarr")


def test_loader_worker_processes_write_the_same_store(image_dir, tmp_path):
    """Grain's multiprocessing workers (spawned) instead of threads: the same bytes."""
    _worker("--src", image_dir, "--out", tmp_path / "threads.zarr", "--batch-size", 16)
    _worker("--src", image_dir, "--out", tmp_path / "procs.zarr", "--batch-size", 16, "--worker-processes", 2)
    _assert_same_bytes(tmp_path / "threads.zarr", tmp_path / "procs.zarr")


def _kill_when(proc, out: Path, markers: int, extra: float, timeout=90.0):
    """SIGKILL ``proc`` once ``markers`` batches are committed (0: once the store exists)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        progress = out / ".progress"
        done = len(list(progress.glob("*.json"))) if progress.is_dir() else -1
        if (markers == 0 and (out / "zarr.json").exists()) or (markers and done >= markers):
            time.sleep(extra)
            break
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    finished = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return finished


def test_kill_and_resume_gives_the_uninterrupted_store(image_dir, tmp_path):
    ref = tmp_path / "ref.zarr"
    _worker("--src", image_dir, "--out", ref, "--batch-size", 4, "--devices", 2)
    out = tmp_path / "killed.zarr"
    args = [
        sys.executable,
        str(WORKER),
        "--src",
        str(image_dir),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--devices",
        "2",
        "--slow",
        "0.03",
        "--workers",
        "2",
    ]
    kills = 0
    for markers, extra in ((0, 0.0), (2, 0.013), (7, 0.051)):
        with subprocess.Popen(
            args, env=_env(), cwd=str(REPO), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        ) as proc:
            if not _kill_when(proc, out, markers, extra):
                kills += 1
        assert (out / "zarr.json").exists()
        assert open_results(out).complete is False
    assert kills == 3
    done = _worker("--src", image_dir, "--out", out, "--batch-size", 4, "--devices", 2)
    assert 0 < done["resumed_at"] < N_GOOD + 3 and done["processed"] == N_GOOD + 3 - done["resumed_at"]
    _assert_same_bytes(ref, out)  # nothing lost, nothing duplicated, no leftovers
    again = _worker("--src", image_dir, "--out", out, "--batch-size", 4, "--devices", 2)
    assert again["already_complete"] and again["processed"] == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_jax_distributed_run(image_dir, tmp_path):
    """Two jax.distributed processes on localhost (2 CPU devices each: a 4-device mesh over
    both), one store. The same contents as a single-process run; each process wrote its own
    rows of every batch (its chunks), so the chunking differs and the bytes may."""
    single = tmp_path / "single.zarr"
    _worker("--src", image_dir, "--out", single, "--batch-size", 16, "--device-batch", 4)
    out = tmp_path / "multi.zarr"
    coord = f"127.0.0.1:{_free_port()}"
    args = [
        sys.executable,
        str(WORKER),
        "--src",
        str(image_dir),
        "--out",
        str(out),
        "--batch-size",
        "16",
        "--device-batch",
        "4",
        "--devices",
        "2",
        "--coordinator",
        coord,
        "--num-processes",
        "2",
    ]
    procs = [
        subprocess.Popen(
            args + ["--process-id", str(i)],
            env=_env(),
            cwd=str(REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=120))
    finally:  # a hung or failed peer: do not leave the other waiting on the coordinator
        for q in procs:
            if q.poll() is None:
                q.kill()
                q.communicate()
    results = []
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [(r["devices"], r["processes"]) for r in results] == [(4, 2), (4, 2)]
    res = open_results(out)
    assert res.complete and res.config["processes"] == 2 and res.config["rows"] == 8
    _assert_same_contents(single, out)


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_command_line(image_dir, tmp_path):
    out = tmp_path / "cli.zarr"
    cmd = [
        sys.executable,
        "-m",
        "gradcam_jax.dataset",
        str(image_dir),
        "--out",
        str(out),
        "--model",
        f"{WORKER}:model",
        "--batch-size",
        "16",
        "--classes",
        "top2",
        "--methods",
        "grad_cam,xgrad_cam",
        "--resolution",
        "input",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(REPO), timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]  # 1: some files were unreadable
    assert "3 unreadable" in proc.stderr and "img/s" in proc.stderr
    res = open_results(out)
    assert res["maps"].shape == (N_GOOD + 3, 2, 2, 16, 16) and res.methods == ["grad_cam", "xgrad_cam"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=str(REPO), timeout=120)
    assert proc.returncode == 1 and "already complete" in proc.stderr
    bad_cmd = cmd[:4] + ["--out", str(tmp_path / "x"), "--model", f"{WORKER}:model", "--methods", "nope"]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, env=_env(), cwd=str(REPO), timeout=120)
    assert bad.returncode == 2 and "unknown method" in bad.stderr


def test_add_explain_dir_command_registers_a_subcommand():
    import argparse

    from gradcam_jax.cli import explain_dir

    parser = argparse.ArgumentParser(prog="gradcam-jax")
    sub = parser.add_subparsers(dest="command")
    explain_dir.add_parser(sub)
    args = parser.parse_args(["explain-dir", "photos", "--out", "s.zarr", "--batch-size", "8", "--no-resume"])
    assert args.func is explain_dir.run and args.command == "explain-dir"
    assert (args.dir, args.out, args.batch_size, args.no_resume) == ("photos", "s.zarr", 8, True)
