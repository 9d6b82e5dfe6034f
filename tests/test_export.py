"""``python -m custom_components.export``: a run folder's model as ONNX or TorchScript gives PyTorch's output, and a
folder that is not a run is refused with the file it lacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from custom_components import export
from custom_components.config_text import freeze
from tests.conftest import REPO, USER_CWD
from tests.test_resume import UNSAFE_ADVICE, Payload, refusal

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}  # what the command promises for ONNX
# PyTorch deprecates torch.jit; the TorchScript format is still what MONAI's ckpt_export writes
pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.* is deprecated:DeprecationWarning")


def network_of(run: Path) -> torch.nn.Module:
    """The run's PyTorch network with its weights, built here as a user would, independently of the module."""
    parser = ConfigParser(ConfigParser.load_config_file(str(run / "configs" / "inference.yaml")))
    parser["bundle_root"] = str(run)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(run / "models" / "model.pt", weights_only=True))
    return network.eval()


def seeded(*shape: int, seed: int = 123) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def run2d(tmp_path: Path) -> Path:
    """A small 2.5D run folder made by hand from the 2D bundle's configs (no training): one context slice on each
    side, so the network takes 3 channels; random weights."""
    source = REPO / "bundles" / "unet2d" / "configs"
    run = tmp_path / "run2d"
    values = {"channels": [8, 16], "strides": [2], "num_res_units": 1, "patch_size": [32, 24], "context_slices": 1}
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "inference.yaml").write_text(freeze((source / "inference.yaml").read_text(), values))
    metadata = json.loads((source / "metadata.json").read_text())
    metadata["network_data_format"]["inputs"]["image"]["num_channels"] = 3
    (run / "configs" / "metadata.json").write_text(json.dumps(metadata))
    parser = ConfigParser(ConfigParser.load_config_file(str(run / "configs" / "inference.yaml")))
    parser["bundle_root"] = str(run)
    torch.manual_seed(0)
    (run / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), run / "models" / "model.pt")
    return run


def test_onnx_export_of_a_3d_run_matches_pytorch(run3d: Path, tmp_path: Path) -> None:
    import onnx
    import onnxruntime

    output = tmp_path / "exported" / "unet.onnx"
    command = [sys.executable, "-m", "custom_components.export", str(run3d), "--format", "onnx", "--output", output]
    result = subprocess.run(list(map(str, command)), cwd=USER_CWD.name, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output}" in result.stdout and "input image [batch, 1, x, y, z]" in result.stdout, result.stdout
    assert "input [1, 1, 32, 32, 16]: max abs diff" in result.stdout, result.stdout  # the patch_size key
    assert not (run3d / "models" / "model.onnx").exists()  # --output honoured, the run folder untouched

    model = onnx.load(str(output))
    onnx.checker.check_model(model)
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input]
    assert dims == [["batch", 1, "x", "y", "z"]]
    assert [v.name for v in model.graph.output] == ["pred"]
    assert "network_data_format" in json.loads({p.key: p.value for p in model.metadata_props}["metadata.json"])

    # other inputs than the command's own check: another batch and other multiples of the divisor (4)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    network = network_of(run3d)
    for image in (seeded(1, 1, 32, 32, 16), seeded(3, 1, 40, 36, 24, seed=7)):
        with torch.no_grad():
            expected = network(image)
        (predicted,) = session.run(["pred"], {"image": image.numpy()})
        torch.testing.assert_close(torch.from_numpy(predicted), expected, **TOLERANCE)


def test_torchscript_export_of_a_3d_run_equals_pytorch(
    run3d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from monai.data.torchscript_utils import load_net_with_metadata

    output = tmp_path / "model.ts"
    assert export.main([str(run3d), "--format", "torchscript", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {output} (TorchScript" in printed and "max abs diff 0.00e+00 ok" in printed, printed
    scripted, metadata, extra = load_net_with_metadata(str(output), more_extra_files=("inference.json",))
    assert metadata["network_data_format"]["inputs"]["image"]["num_channels"] == 1  # as MONAI's ckpt_export
    assert json.loads(extra["inference.json"])["patch_size"] == [32, 32, 16]
    network = network_of(run3d)
    for image in (seeded(1, 1, 32, 32, 16), seeded(2, 1, 24, 40, 12, seed=5)):
        with torch.no_grad():
            torch.testing.assert_close(scripted(image), network(image))


def test_a_2d_run_exports_to_its_models_folder(run2d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # TorchScript only: ONNX export of the 2D network takes ~7 s more here (the exporter's cost, as for 3D above)
    assert export.main([str(run2d), "--format", "torchscript"]) == 0
    printed = capsys.readouterr().out
    written = run2d / "models" / "model.ts"
    assert f"wrote {written}" in printed and "input image [batch, 3, x, y]" in printed, printed
    assert "input [1, 3, 32, 24]: max abs diff" in printed and "input [2, 3, 30, 22]" in printed, printed
    image = seeded(2, 3, 36, 28)
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.load(str(written))(image), network_of(run2d)(image))


def test_a_folder_that_is_not_a_run_is_refused_naming_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as refused:
        export.main([str(tmp_path), "--format", "onnx"])
    message = str(refused.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    assert f"{tmp_path}/configs/inference.yaml and {tmp_path}/models/model.pt are missing" in message, message
    assert "is not a trained run folder" in message
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "inference.yaml").write_text("{}\n")
    with pytest.raises(SystemExit, match=r"models/model\.pt is missing: .* not a trained run folder"):
        export.main([str(tmp_path), "--format", "torchscript"])
    assert not (tmp_path / "models").exists()


def test_a_planted_model_is_refused_not_executed(run2d: Path, tmp_path: Path) -> None:
    """models/model.pt is read as tensors only (run_files.read_checkpoint): a planted pickle stops the export, named,
    without PyTorch's advice to load it unsafely, and its payload never runs."""
    marker = tmp_path / "executed"
    model = run2d / "models" / "model.pt"
    torch.save({"model.0.conv.weight": Payload(marker)}, model)
    with pytest.raises(SystemExit) as refused:
        export.main([str(run2d), "--format", "torchscript"])
    message = str(refused.value.code)
    assert message == f"error: {refusal(model)}use a models/model.pt that a training run wrote", message
    assert UNSAFE_ADVICE not in message and not marker.exists() and not (run2d / "models" / "model.ts").exists()


def test_options_and_missing_packages_are_refused_with_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit, match=r"^error: --format 'tflite' is not one of onnx, torchscript"):
        export.main([str(tmp_path), "--format", "tflite"])
    with pytest.raises(SystemExit, match=r"^error: --opset applies to --format onnx only"):
        export.main([str(tmp_path), "--format", "torchscript", "--opset", "17"])
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the extra `export` were not installed
    with pytest.raises(SystemExit, match=r"needs onnxruntime: pip install 'unet-bundles\[export\]'"):
        export.main([str(tmp_path), "--format", "onnx"])


def test_a_model_beyond_the_tolerance_is_not_written(
    run2d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loader = export.torchscript_runner
    monkeypatch.setattr(export, "torchscript_runner", lambda data: lambda image: loader(data)(image) + 1e-3)
    output = tmp_path / "model.ts"
    with pytest.raises(SystemExit, match=r"differs from PyTorch \(input \[1, 3, 32, 24\]: max abs diff 0\.001"):
        export.main([str(run2d), "--format", "torchscript", "--output", str(output)])
    assert not output.exists() and not list(tmp_path.glob(".model.ts.*"))


def test_the_check_tolerance_is_absolute_plus_relative() -> None:
    reference = torch.tensor([0.0, 100.0], dtype=torch.float64)  # float64: the margins below are exact
    within = export.compare(reference + torch.tensor([9e-5, 1e-2], dtype=torch.float64), reference, [2])
    assert within.passed and within.tolerance_used == pytest.approx(1e-2 / (1e-4 + 1e-4 * 100))
    failed = export.compare(reference + torch.tensor([2e-4, 0.0], dtype=torch.float64), reference, [2])
    assert not failed.passed and failed.max_abs_diff == pytest.approx(2e-4)
    assert not export.compare(reference[:1], reference, [2]).passed  # another shape
