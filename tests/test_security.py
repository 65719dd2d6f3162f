"""Files from someone else are data: opening a weights file, a checkpoint's saved config or a config
file never runs code (docs/security.md). Each malicious file would create a marker file if its
payload ran; every test checks that the marker does not exist and that the command ended with one
clear line, a non-zero status and no traceback."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TINY_RUN_OPTS, load_tool, run_train_net, tiny_cfg

from iaunet.checkpoint import AtomicCheckpointer, CheckpointError, read_checkpoint
from iaunet.config import ConfigError, exit_on_config_error, load_config, trained_config
from iaunet.predict import main as predict_main
from iaunet.utils.safe_load import UnsafeFileError, load_weights_file


class _Payload:
    """Unpickled, runs ``touch <marker>`` (pickle names ``posix.system``)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _state():
    return {"backbone.stem.conv1.weight": torch.zeros(2, 3, 1, 1)}


def _write(path, kind: str, marker) -> str:
    """A malicious file of ``kind`` at ``path`` (its payload touches ``marker``)."""
    payload = _Payload(marker)
    if kind == "pkl_top":
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    elif kind == "pkl_nested":  # a plausible model-zoo file with one poisoned entry
        model = {"backbone.stem.conv1.weight": np.zeros((2, 3, 1, 1), np.float32), "x": payload}
        with open(path, "wb") as f:
            pickle.dump({"model": model, "__author__": "a lab", "matching_heuristics": False}, f)
    elif kind == "torch_zip":
        torch.save({"model": _state(), "extra": payload}, path)
    elif kind == "torch_legacy":
        torch.save(
            {"model": _state(), "extra": payload}, path, _use_new_zipfile_serialization=False
        )
    else:
        raise ValueError(kind)
    return str(path)


KINDS = {"pkl_top": ".pkl", "pkl_nested": ".pkl", "torch_zip": ".pth", "torch_legacy": ".pth"}


@pytest.fixture
def evil(tmp_path):
    """kind -> (path of a malicious file, marker its payload would create)."""
    marker = tmp_path / "PAYLOAD_RAN"
    files = {k: _write(tmp_path / f"{k}{ext}", k, marker) for k, ext in KINDS.items()}
    return files, marker


def _one_clean_line(err: str, *expected: str) -> None:
    """stderr ends with one error line naming ``expected``, and shows no traceback."""
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    for text in expected:
        assert text in last, err


@pytest.mark.parametrize("kind", list(KINDS))
def test_weights_reader_refuses_code_naming_file_and_global(evil, kind):
    files, marker = evil
    with pytest.raises(UnsafeFileError) as e:
        load_weights_file(files[kind])
    assert not marker.exists()
    assert files[kind] in str(e.value) and "posix.system" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="posix.system"):  # what every command reads with
        read_checkpoint(files[kind])
    assert not marker.exists()


def test_pickle_reader_admits_model_zoo_contents(tmp_path):
    """What a model-zoo / converted .pkl holds (numpy arrays of any dtype, scalars, nested
    containers; pickle protocols 2 to 5) is read back unchanged."""
    data = {
        "model": {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.int64(3)},
        "__author__": "a lab",
        "matching_heuristics": False,
        "misc": [1, 2.5, "x", None, True, (1, 2), {1, 2}, b"\x00\xff"],
    }
    for protocol in (2, 4, 5):
        path = str(tmp_path / f"p{protocol}.pkl")
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=protocol)
        back = load_weights_file(path)
        np.testing.assert_array_equal(back["model"]["a"], data["model"]["a"])
        assert back["model"]["a"].dtype == np.float32 and back["model"]["b"] == 3
        assert back["misc"] == data["misc"]


def test_converted_backbone_pkl_loads_into_the_model(tmp_path):
    """A ResNet converted to .pkl by tools/convert_pretrained.py (its own save) loads through
    MODEL.WEIGHTS' reader, and converts again from .pkl (the tool reads its inputs the same way)."""
    import torchvision
    from detectron2.modeling import build_model

    convert = load_tool("convert_pretrained")
    src = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), src)
    converted = convert.convert_torchvision_resnet(convert.load_state_dict(str(src)), "backbone.")
    pkl = str(tmp_path / "R-18.pkl")
    convert.save(converted, pkl, author="test")
    model = build_model(tiny_cfg())
    AtomicCheckpointer(model).load(pkl)
    key = "backbone.stem.conv1.weight"
    torch.testing.assert_close(model.state_dict()[key], converted[key])
    again = convert.load_state_dict(pkl)
    torch.testing.assert_close(again[key], converted[key])


def test_saved_config_is_data(tmp_path):
    """A checkpoint's config: _BASE_ refused, unknown keys and Python tags rejected, naming the
    file; iaunet-predict ends with one line."""
    marker = tmp_path / "PAYLOAD_RAN"
    with pytest.raises(ConfigError, match="_BASE_ /etc/passwd.*refused"):
        trained_config("_BASE_: /etc/passwd\n", "m.pth")
    with pytest.raises(ConfigError, match="m.pth.*NOT_A_KEY"):
        trained_config("MODEL:\n  NOT_A_KEY: 1\n", "m.pth")
    with pytest.raises(ConfigError, match="m.pth"):
        trained_config(f"X: !!python/object/apply:os.system ['touch {marker}']\n", "m.pth")
    assert not marker.exists()


def test_config_file_with_python_tags_is_refused(tmp_path):
    """--config-file is read with yaml.safe_load (detectron2 would fall back to unsafe_load)."""
    marker = tmp_path / "PAYLOAD_RAN"
    path = tmp_path / "evil.yaml"
    path.write_text(f"VERSION: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="evil.yaml"):
        load_config(str(path))
    assert not marker.exists()


def _base_checkpoint(tmp_path) -> str:
    """A real tiny checkpoint whose saved config pulls in /etc/passwd."""
    from detectron2.modeling import build_model

    path = str(tmp_path / "base.pth")
    model = build_model(tiny_cfg())
    torch.save({"model": model.state_dict(), "config": "_BASE_: /etc/passwd\n"}, path)
    return path


@pytest.mark.parametrize("kind", [*KINDS, "base"])
def test_iaunet_predict_refuses(evil, tmp_path, capsys, kind):
    files, marker = evil
    weights = _base_checkpoint(tmp_path) if kind == "base" else files[kind]
    import cv2

    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((16, 16), np.uint8))
    code = predict_main(
        ["--weights", weights, "--input", str(tmp_path / "x.png"), "--output", str(tmp_path / "o")]
    )
    assert code != 0 and not marker.exists()
    _one_clean_line(capsys.readouterr().err, weights, "/etc/passwd" if kind == "base" else "posix")


@pytest.mark.parametrize("kind", [*KINDS, "base"])
def test_export_model_refuses(evil, tmp_path, capsys, kind):
    files, marker = evil
    weights = _base_checkpoint(tmp_path) if kind == "base" else files[kind]
    export = load_tool("export_model")
    argv = ["--weights", weights, "--format", "onnx", "--output", str(tmp_path / "m.onnx")]
    with pytest.raises(SystemExit) as e:  # as its __main__ runs it
        exit_on_config_error(lambda: export.main(argv), "export_model.py")
    assert e.value.code != 0 and not marker.exists() and not (tmp_path / "m.onnx").exists()
    _one_clean_line(capsys.readouterr().err, weights, "/etc/passwd" if kind == "base" else "posix")


def test_convert_pretrained_refuses(evil):
    files, marker = evil
    for kind in KINDS:
        proc = subprocess.run(
            [sys.executable, "tools/convert_pretrained.py", "resnet", files[kind], "out.pkl"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 2 and not marker.exists()
        _one_clean_line(proc.stderr, files[kind], "posix.system")


@pytest.mark.parametrize(
    "kind,eval_only", [("pkl_top", False), ("pkl_nested", True), ("torch_zip", False)]
)
def test_train_net_refuses(synthetic_ready, evil, tmp_path, kind, eval_only):
    """MODEL.WEIGHTS at the start of training and with --eval-only (the auto-sizing reads the
    starting model first: NUM_QUERIES 0)."""
    files, marker = evil
    args = ["--eval-only"] if eval_only else []
    args += [*TINY_RUN_OPTS, "MODEL.WEIGHTS", files[kind], "OUTPUT_DIR", str(tmp_path / "run")]
    args += ["SOLVER.MAX_ITER", "1", "MODEL.IAUNET.NUM_QUERIES", "0"]
    code, out = run_train_net(synthetic_ready, *args)
    assert code != 0 and not marker.exists()
    _one_clean_line(out, files[kind], "posix.system")


def test_local_dask_cluster_listens_on_localhost_only():
    pytest.importorskip("distributed")
    from iaunet.predict import dask_client

    with dask_client("local:1") as client:
        addresses = [client.scheduler.address, *client.scheduler_info()["workers"]]
        try:
            assert all(a.startswith("tcp://127.0.0.1:") for a in addresses), addresses
        finally:
            client.cluster.close()


class _AddOne(torch.nn.Module):
    def forward(self, x):
        return x + 1


@pytest.mark.parametrize(
    "line", ["os.system('touch {m}')", "__import__('os').system('touch {m}')", "eval('1')"]
)
def test_torchscript_cannot_run_python(tmp_path, line):
    """A TorchScript archive whose code calls Python does not load: torch compiles the archive's
    code as TorchScript, where Python's modules and builtins do not exist."""
    import zipfile

    marker = tmp_path / "PAYLOAD_RAN"
    good, bad = tmp_path / "m.pt", tmp_path / "evil.pt"
    torch.jit.script(_AddOne()).save(str(good))
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bad, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith(".py") and b"def forward" in data:
                text = data.decode()
                indent = text[text.index("return") - 4 : text.index("return")]
                payload = line.format(m=marker)
                data = text.replace("return", f"_ = {payload}\n{indent}return", 1).encode()
                assert payload.encode() in data
            dst.writestr(item, data)
    assert torch.jit.load(str(good))(torch.zeros(1)).item() == 1
    with pytest.raises(RuntimeError, match="undefined value"):
        torch.jit.load(str(bad))
    assert not marker.exists()
