"""Fault tests of the commands (issue 19): two runs on one store at once, a lock left by a dead
process or by another host, SIGKILL while a run finalises, unwritable and foreign outputs, a
16-bit PNG, an altered weight cache. Tiny images and the tiny conv net of tests/nets.py; the
runs that must be other processes use tests/dataset_worker.py."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gradcam_jax import cli, zoo
from gradcam_jax.cli import explain_dir, explain_job
from gradcam_jax.dataset import StoreLocked, explain_dataset, open_results
from gradcam_jax.dataset.store import INCOMPLETE
from gradcam_jax.zoo._entries import lite0_checkpoint as zoo_checkpoint

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "dataset_worker.py"
sys.path.insert(0, str(HERE))
import cli_model  # noqa: E402
import dataset_worker  # noqa: E402

N_IMAGES = 24
RUN = ["--batch-size", "4", "--workers", "2"]  # every worker run of one store uses these


def _env():
    env = dict(os.environ)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("XLA_FLAGS", None)
    return env


def _start(src, out, *extra):
    return subprocess.Popen(
        [sys.executable, str(WORKER), "--src", str(src), "--out", str(out), *RUN, *map(str, extra)],
        env=_env(),
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc, timeout=120):
    """Wait for a worker; -> (its JSON line, its stderr); it must have succeeded."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def _wait_for_line(proc, text, timeout=90.0):
    """Read the worker's stdout until a line starts with ``text``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            if line.startswith(text):
                return
            if not line:
                break
    proc.kill()
    raise AssertionError(f"the worker never printed {text!r}: {proc.communicate()[1][-3000:]}")


def _tree(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _assert_same_bytes(a: Path, b: Path):
    ta, tb = _tree(a), _tree(b)
    assert sorted(ta) == sorted(tb), f"file sets differ: {sorted(set(ta) ^ set(tb))[:10]}"
    assert not [k for k in ta if ta[k] != tb[k]], "files differ"


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded although the output had been refused")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_images")
    r = np.random.default_rng(0)
    for i in range(N_IMAGES):
        Image.fromarray(r.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    (root / "broken.png").write_bytes(b"not a PNG")
    return root


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory):
    """The store an uninterrupted worker run writes."""
    out = tmp_path_factory.mktemp("reference") / "ref.zarr"
    _finish(_start(images, out))
    return out


@pytest.fixture
def quiet_cli(monkeypatch):
    monkeypatch.setenv("GRADCAM_JAX_NO_XLA_CACHE", "1")  # keep JAX's persistent cache off in-process


# --------------------------------------------------------------------------------------------
# Two runs on one store
# --------------------------------------------------------------------------------------------


def test_a_second_run_on_a_store_in_use_is_refused(
    images, reference, tmp_path, monkeypatch, capsys, quiet_cli
):
    """While a run writes a store, a second one (other settings with --no-resume, or the same
    settings) exits with status 3 before loading its model, naming the process and the lock
    file; the first run completes with the bytes of an uninterrupted run."""
    out = tmp_path / "s.zarr"
    lock = tmp_path / "s.zarr.lock"
    first = _start(images, out, "--slow", "0.25")
    try:
        deadline = time.time() + 90
        while not ((out / "zarr.json").exists() and lock.exists()) and time.time() < deadline:
            assert first.poll() is None, first.communicate()[1][-3000:]
            time.sleep(0.05)
        monkeypatch.setattr(explain_dir, "load_model", _no_model)
        model = ["--model", f"{WORKER}:model", "-q"]
        other = ["--methods", "layer_cam", "--classes", "top2", "--no-resume"]
        for settings in (other, []):
            t0 = time.perf_counter()
            assert cli.main(["explain-dir", str(images), "--out", str(out), *model, *settings]) == 3
            err = capsys.readouterr().err
            assert f"is in use by process {first.pid} on {socket.gethostname()}" in err, err
            assert f"lock file {str(lock)!r}" in err and "Traceback" not in err
            assert time.perf_counter() - t0 < 10
            assert first.poll() is None  # still running: the refusal did not disturb it
        with pytest.raises(StoreLocked, match="is in use by process"):
            explain_dataset(images, dataset_worker.model(), out=out, resume=False, progress=False)
    finally:
        done, _ = _finish(first)
    assert done["processed"] == N_IMAGES + 1 and not lock.exists()
    res = open_results(out)
    assert res.complete and res.methods == ["grad_cam"]
    _assert_same_bytes(reference, out)


def test_two_runs_started_together(images, reference, tmp_path):
    """Two runs of one job started at once (before: ``OSError: Directory not empty``, or a crash
    when the first finalised): one writes the store; the other is refused (or, started after
    the first was done, finds the job complete). Never a crash, never a mixed store."""
    out = tmp_path / "t.zarr"
    procs = [_start(images, out, "--slow", "0.1") for _ in range(2)]
    outcomes = [(p.communicate(timeout=120), p.returncode) for p in procs]
    done = [json.loads(stdout.strip().splitlines()[-1]) for (stdout, _), rc in outcomes if rc == 0]
    refused = [err for (_, err), rc in outcomes if rc != 0]
    assert len(done) + len(refused) == 2
    assert sorted(d["already_complete"] for d in done) == [False] + [True] * (len(done) - 1)
    for err in refused:
        # The holder is named once it has written its lock file; in the instant between its
        # flock and that write, the refusal says "another process".
        assert "StoreLocked: the store" in err, err[-3000:]
        assert "is in use by process" in err or "is in use by another process" in err, err[-3000:]
    _assert_same_bytes(reference, out)


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path, capsys, quiet_cli, monkeypatch):
    """A lock file of this host whose process is gone is taken over with a notice; one of
    another host is refused with a message naming the file to delete; nothing is touched."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out, lock = tmp_path / "s.zarr", tmp_path / "s.zarr.lock"
    owner = {"host": socket.gethostname(), "pid": dead.pid, "started": "earlier", "command": "x"}
    lock.write_text(json.dumps(owner))
    x = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    tiny = dataset_worker.model()
    run = explain_dataset(x, tiny, out=out, batch_size=4, progress=False)
    assert run.processed == 6 and open_results(out).complete and not lock.exists()
    err = capsys.readouterr().err
    assert f"taking over the lock {str(lock)!r} left by process {dead.pid}" in err, err

    lock.write_text(json.dumps(dict(owner, host="elsewhere.example", pid=4242)))
    before = _tree(out)
    with pytest.raises(StoreLocked, match="process 4242 on elsewhere.example.*delete the lock file"):
        explain_dataset(x, tiny, out=out, batch_size=4, resume=False, progress=False)
    monkeypatch.setattr(explain_dir, "load_model", _no_model)
    args = ["explain-dir", str(tmp_path), "--out", str(out), "--model", f"{WORKER}:model", "-q"]
    assert cli.main(args) == 3
    assert f"If it is not, delete the lock file {str(lock)!r}" in capsys.readouterr().err
    assert _tree(out) == before and lock.exists()


def test_sigkill_while_finalising_then_rerun(images, reference, tmp_path):
    """Killed after every batch was committed (before the store is marked complete), then
    killed after it was marked complete (before the commit markers went): each rerun takes the
    dead run's lock over and the store ends byte-identical to an uninterrupted run's."""
    out, lock = tmp_path / "k.zarr", tmp_path / "k.zarr.lock"
    for point in ("finalize", "drop_progress"):
        proc = _start(images, out, "--pause-at", point)
        _wait_for_line(proc, f"PAUSED {point}")
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert lock.exists()  # left behind by the killed run
        assert open_results(out).complete is (point == "drop_progress")
        assert (out / ".progress").is_dir()
    done, err = _finish(_start(images, out))
    assert done["already_complete"] and "taking over the lock" in err
    _assert_same_bytes(reference, out)
    assert not lock.exists()


# --------------------------------------------------------------------------------------------
# Outputs that cannot be used
# --------------------------------------------------------------------------------------------


def test_unwritable_output_exits_3_before_the_model(images, tmp_path, monkeypatch, capsys, quiet_cli):
    monkeypatch.setattr(explain_dir, "load_model", _no_model)
    monkeypatch.setattr(explain_job, "load_model", _no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    image = str(images / "img00.png")
    targets = [blocker / "out"]
    if os.geteuid() != 0:  # root writes into read-only folders: only a file in the path stops it
        readonly = tmp_path / "readonly"
        readonly.mkdir(mode=0o500)
        targets.append(readonly / "out")
    for out in targets:
        assert cli.main(["explain", image, "--out", str(out), "-q"]) == 3
        err = capsys.readouterr().err
        assert err.startswith("gradcam-jax: error: cannot write the output folder") and "Traceback" not in err
        args = ["explain-dir", str(images), "--out", str(out / "s.zarr"), "--model", f"{WORKER}:model"]
        assert cli.main(args) == 3
        err = capsys.readouterr().err
        assert "error: cannot write the output" in err and "Traceback" not in err
    assert cli.main(["explain-dir", str(images), "--out", str(blocker), "--model", f"{WORKER}:model"]) == 3
    assert "exists and is a file; it is left as it is" in capsys.readouterr().err
    assert blocker.read_text() == ""


def test_a_folder_that_is_not_a_store_is_refused_and_untouched(
    images, tmp_path, monkeypatch, capsys, quiet_cli
):
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "precious.txt").write_text("keep me")
    (mine / "sub" / "notes.txt").write_text("and me")
    before = _tree(mine)
    monkeypatch.setattr(explain_dir, "load_model", _no_model)
    for extra in ([], ["--no-resume"]):
        args = ["explain-dir", str(images), "--out", str(mine), "--model", f"{WORKER}:model", *extra]
        assert cli.main(args) == 3
        assert "is a folder that is not a gradcam_jax store; it is left as it is" in capsys.readouterr().err
    assert _tree(mine) == before and not (tmp_path / "mine.lock").exists()


def test_an_empty_folder_is_kept_and_a_killed_creation_is_tidied(tmp_path):
    """An existing empty folder (a mount point, say) holds the store and is never removed, nor
    by --no-resume; a folder a killed run was creating a store in is cleared and reused."""
    x = np.random.default_rng(2).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    tiny = dataset_worker.model()
    empty = tmp_path / "empty"
    empty.mkdir()
    inode = empty.stat().st_ino
    explain_dataset(x, tiny, out=empty, batch_size=4, progress=False)
    explain_dataset(x, tiny, out=empty, batch_size=4, methods="layer_cam", resume=False, progress=False)
    assert empty.stat().st_ino == inode and open_results(empty).methods == ["layer_cam"]
    half = tmp_path / "half"
    (half / "maps").mkdir(parents=True)
    (half / INCOMPLETE).touch()
    (half / "maps" / "zarr.json").write_text("{}")
    explain_dataset(x, tiny, out=half, batch_size=4, progress=False)
    assert open_results(half).complete and not (half / INCOMPLETE).exists()
    ref = tmp_path / "ref"
    explain_dataset(x, tiny, out=ref, batch_size=4, progress=False)
    _assert_same_bytes(ref, half)


# --------------------------------------------------------------------------------------------
# Inputs: a 16-bit PNG; the weight cache
# --------------------------------------------------------------------------------------------


def test_a_16_bit_png_is_explained_as_its_8_bit_version(tmp_path, quiet_cli):
    """Before: I;16 -> RGB clipped every pixel to 255 (a white image, explained as such)."""
    folder = tmp_path / "pngs"
    folder.mkdir()
    v = (np.add.outer(np.arange(16), np.arange(16)) * 2000 + 300).astype(np.uint16)
    Image.frombytes("I;16", (16, 16), v.astype("<u2").tobytes()).save(folder / "a16.png")
    Image.fromarray((v >> 8).astype(np.uint8)).save(folder / "b8.png")  # what it should read as
    Image.fromarray(np.full((16, 16), 255, np.uint8)).save(folder / "c_white.png")
    with Image.open(folder / "a16.png") as im:
        assert im.mode == "I;16"
    store = tmp_path / "s.zarr"
    args = ["explain-dir", str(folder), "--out", str(store), "--model", f"{WORKER}:model", "-q"]
    assert cli.main([*args, "--resolution", "input"]) == 0
    res = open_results(store)
    maps, classes = np.asarray(res["maps"][:]), np.asarray(res["classes"][:])
    assert res.failures() == []
    np.testing.assert_array_equal(maps[0], maps[1])
    np.testing.assert_array_equal(classes[0], classes[1])
    assert not np.array_equal(maps[0], maps[2])  # not the white image

    out = tmp_path / "figures"
    files = [str(folder / n) for n in ("a16.png", "b8.png")]
    model = ["--model", "cli_model:tiny_model", "--methods", "grad_cam", "--dpi", "40", "-q"]
    assert cli.main(["explain", *files, *model, "--save-maps", "--out", str(out)]) == 0
    a, b = cli_model.read_npz(out / "a16.npz"), cli_model.read_npz(out / "b8.npz")
    np.testing.assert_array_equal(a["grad_cam"], b["grad_cam"])
    np.testing.assert_array_equal(a["probs"], b["probs"])


def test_an_altered_weight_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    """A valid .npz with a kernel zeroed, an array missing or one extra: rebuilt from the
    checkpoint with a one-line notice (before: loaded as is, or a Flax ScopeVariableNotFoundError
    on every later load)."""
    monkeypatch.setenv("GRADCAM_JAX_CACHE", str(tmp_path))
    fresh = zoo.efficientnet_lite0()
    (cached,) = tmp_path.glob("efficientnet_lite0-*.npz")
    assert cached.with_name(cached.stem + ".manifest.json").is_file()
    kernel = "params/head/conv/kernel"
    expected = np.asarray(fresh.variables["params"]["head"]["conv"]["kernel"])
    x = fresh.preprocess(zoo.demo_image())
    top = int(np.argmax(fresh.logits(x)))
    with np.load(cached) as z:
        arrays = {k: z[k] for k in z.files}
    changes = {
        "has an altered array 'params/head/conv/kernel'": {**arrays, kernel: np.zeros_like(arrays[kernel])},
        "lacks the array 'params/head/conv/kernel'": {k: v for k, v in arrays.items() if k != kernel},
        "has an unexpected array 'params/extra'": {**arrays, "params/extra": np.ones(3, np.float32)},
    }
    for notice, changed in changes.items():
        np.savez(cached, **changed)
        capsys.readouterr()
        m = zoo.efficientnet_lite0()
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"gradcam_jax: the weight cache {cached} {notice}" in err, err
        assert err.rstrip().endswith(f"; rebuilding it from {zoo_checkpoint()}.")
        np.testing.assert_array_equal(np.asarray(m.variables["params"]["head"]["conv"]["kernel"]), expected)
        assert int(np.argmax(m.logits(x))) == top
    zoo.efficientnet_lite0()  # the rebuilt cache matches its manifest: no notice
    assert capsys.readouterr().err == ""
