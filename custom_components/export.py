"""``python -m custom_components.export RUN --format onnx|torchscript``: a run folder's model for other runtimes.

    python -m custom_components.export RUN --format onnx [--output FILE] [--opset N]   # RUN/models/model.onnx
    python -m custom_components.export RUN --format torchscript [--output FILE]        # RUN/models/model.ts

The network is built from ``RUN/configs/inference.yaml`` (``network_def``, every key as the run trained it) and
``RUN/models/model.pt`` is loaded into it (CPU, eval mode). The exported model takes ``image`` (batch, channels,
spatial...) and returns ``pred`` (batch, num_classes, spatial...): logits of one patch, before softmax; the sliding
window, preprocessing and postprocessing stay with the caller, as in ``configs/inference.yaml``.

ONNX goes through torch's dynamo exporter (``torch.onnx.export(dynamo=True)``) with a dynamic batch axis and dynamic
spatial axes: MONAI's UNet exports with symbolic sizes, and any size that is a multiple of the network's divisor
(the product of ``strides`` per axis, e.g. 16 for four stride-2 levels) runs; other sizes fail in ONNX Runtime as
they fail in PyTorch (the skip connections' concatenation needs equal sizes). ``torch.export`` alone refuses named
dynamic sizes here (it would want each axis as ``4*k`` and the batch fixed to the example's 1); the ONNX exporter
relaxes them (``Dim.DYNAMIC``) and the graph it writes holds no shape-dependent step, so the check at a second
batch and size is what shows it. TorchScript is ``torch.jit.script``
(any size), saved as MONAI's ``ckpt_export`` saves it (``metadata.json`` and ``inference.json`` inside), though
PyTorch deprecates TorchScript. The configs and ``metadata.json`` are embedded in either file.

Before the file replaces ``--output`` its exact bytes are loaded back (ONNX Runtime's CPU provider, or
``torch.jit.load``) and compared with PyTorch on seeded random inputs: the metadata's channels at ``patch_size``
(batch 1), then batch 2 at another valid size. The check passes when ``|exported - pytorch| <= ATOL + RTOL *
|pytorch|`` everywhere (1e-4 each, as ``torch.testing.assert_close``); a failed check writes nothing and exits 1.
ONNX needs the optional extra ``export``: ``pip install 'unet-bundles[export]'``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser

from custom_components.checkpoint import MODEL_FILE
from custom_components.kfold.layout import INFERENCE_CONFIG, METADATA_FILE
from custom_components.networks import total_downsampling, without_deep_supervision
from custom_components.run_files import ModelError, atomic_write_bytes, load_weights

FORMATS = {"onnx": "model.onnx", "torchscript": "model.ts"}  # format -> default file name in RUN/models
ATOL = 1e-4  # the check's tolerance: |exported - pytorch| <= ATOL + RTOL * |pytorch| at every voxel
RTOL = 1e-4
SEED = 0  # of the check's random inputs, so that two exports of one run report the same differences
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # the optional extra `export`
EXPORT_EXTRA = "pip install 'unet-bundles[export]'"
INPUT_NAME, OUTPUT_NAME = "image", "pred"  # as metadata.json's network_data_format names them


class ExportError(RuntimeError):
    """A run folder, option or model that cannot be exported or fails the check; the message says why and the fix."""


@dataclass
class RunModel:
    """A run folder's network with its weights loaded, and what the export and the check need to know of it."""

    run: Path
    network: torch.nn.Module
    in_channels: int
    patch_size: list[int]
    divisor: list[int]
    axis_names: list[str]  # names of the spatial axes in the exported model (x, y, z; 2D: the slice plane's)
    metadata: dict[str, Any]
    config: dict[str, Any]  # inference.yaml as data, embedded in the exported file


@dataclass
class Check:
    """One comparison of the exported model with PyTorch on one input."""

    shape: list[int]
    max_abs_diff: float
    passed: bool
    problem: str = ""
    tolerance_used: float = float("inf")  # max of |diff| / (ATOL + RTOL * |pytorch|): the check passes up to 1


@dataclass
class ExportResult:
    """What was written and how it compared with PyTorch."""

    path: Path
    format: str  # ONNX opset N, or TorchScript
    size_bytes: int
    export_seconds: float
    input: str  # the input's name and shape, e.g. image [batch, 1, x, y, z] float32
    dynamic: str  # which axes take other sizes
    checks: list[Check] = field(default_factory=list)


def _required(run: Path) -> None:
    """Stop unless ``run`` holds the two files of a trained run folder."""
    if not run.is_dir():
        state = "is not a folder" if run.exists() else "does not exist"
        raise ExportError(f"{run} {state}: pass the output_dir of a training run")
    missing = [str(run / name) for name in (INFERENCE_CONFIG, MODEL_FILE) if not (run / name).is_file()]
    if missing:
        raise ExportError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: {run} is not a trained run "
            "folder; pass a training run's output_dir (models/model.pt is written at its first validation)"
        )


def load_run(run: str | Path) -> RunModel:
    """The network of ``run`` built from its ``configs/inference.yaml`` with ``models/model.pt`` loaded, eval on CPU.

    Parsed in-process as ``kfold.ensemble.inference_parser`` does: ``bundle_root`` is set to the run folder, since
    the configs find it from MONAI's command line otherwise.
    """
    run = Path(run).resolve()
    _required(run)
    config_file = run / INFERENCE_CONFIG
    try:
        config = ConfigParser.load_config_file(str(config_file))
        parser = ConfigParser(config)
        parser["bundle_root"] = str(run)
        network = parser.get_parsed_content("network_def")
        dims = int(parser.get_parsed_content("spatial_dims"))
        patch_size = [int(size) for size in parser.get_parsed_content("patch_size")]
        strides = parser.get_parsed_content("strides")
        network_in_channels = int(parser.get_parsed_content("network_in_channels"))
        slice_axis = int(parser.get_parsed_content("slice_axis")) if dims == 2 and "slice_axis" in parser else 2
    except Exception as err:  # YAML, MONAI's parser and the network raise many types for a broken config
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(
            f"{config_file} does not build the network ({type(err).__name__}: {reason}); restore the run's own "
            "configs/inference.yaml (training writes it)"
        ) from err
    if not isinstance(network, torch.nn.Module):
        raise ExportError(f"{config_file}: network_def is a {type(network).__name__}, not a network")
    try:
        load_weights(network, run / MODEL_FILE)
    except ModelError as err:
        raise ExportError(str(err)) from err
    network = without_deep_supervision(network.eval())
    metadata, in_channels = {}, network_in_channels
    if (run / METADATA_FILE).is_file():
        try:
            metadata = json.loads((run / METADATA_FILE).read_text())
        except (OSError, ValueError) as err:
            raise ExportError(f"{run / METADATA_FILE} cannot be read as JSON ({err}): restore the run's own") from err
        image = metadata.get("network_data_format", {}).get("inputs", {}).get(INPUT_NAME, {})
        in_channels = int(image.get("num_channels", network_in_channels))
        if in_channels != network_in_channels:
            raise ExportError(
                f"{run / METADATA_FILE} gives {in_channels} input channels but {config_file} builds a network of "
                f"network_in_channels {network_in_channels}: the run folder's files disagree; restore them from "
                "the training run"
            )
    if len(patch_size) != dims:
        raise ExportError(f"{config_file}: patch_size {patch_size} has not spatial_dims {dims} sizes")
    axes = "xyz" if dims == 3 else "".join(name for index, name in enumerate("xyz") if index != slice_axis)
    return RunModel(
        run=run,
        network=network,
        in_channels=in_channels,
        patch_size=patch_size,
        divisor=total_downsampling(strides, dims),
        axis_names=list(axes[:dims]),
        metadata=metadata,
        config=config,
    )


def check_inputs(model: RunModel, dynamic_size: bool = True) -> list[torch.Tensor]:
    """Seeded random inputs in 0..1: batch 1 at ``patch_size``; with ``dynamic_size`` also batch 2 at another valid
    size per axis (one divisor smaller, or larger where smaller would leave less than two at the bottleneck)."""
    generator = torch.Generator().manual_seed(SEED)
    shapes = [[1, model.in_channels, *model.patch_size]]
    if dynamic_size:
        other = [
            size - step if size - step >= 2 * step else size + step
            for size, step in zip(model.patch_size, model.divisor, strict=True)
        ]
        shapes.append([2, model.in_channels, *other])
    return [torch.rand(*shape, generator=generator) for shape in shapes]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' progress lines and deprecation notes (torch.jit, torchvision ops absent): the
    command prints its own summary."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels, strict=True):
                logger.setLevel(level)


def require_onnx() -> None:
    """Stop with the install command when the optional extra ``export`` is not installed."""
    missing = []
    for name in ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: {EXPORT_EXTRA} (or use --format torchscript)")


def _embedded(model: RunModel) -> dict[str, str]:
    """The run's metadata and inference config as JSON text, stored inside the exported file."""
    return {"metadata.json": json.dumps(model.metadata), "inference.json": json.dumps(model.config)}


def export_onnx(model: RunModel, opset: int | None = None) -> tuple[bytes, str, str]:
    """The network as ONNX bytes (``image`` -> ``pred``), its format with the opset, and which axes are dynamic:
    batch and every spatial axis."""
    require_onnx()
    dim = torch.export.Dim
    spatial = {2 + index: dim(name) for index, name in enumerate(model.axis_names)}
    example = torch.zeros(1, model.in_channels, *model.patch_size)
    try:
        with _quiet():
            program = torch.onnx.export(
                model.network,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: dim("batch"), **spatial},),  # one per positional argument
                opset_version=opset,
                verbose=False,
            )
    except Exception as err:  # torch.export and onnxscript raise many types; the first line says what failed
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        fix = "try another --opset" if opset is not None else "try --format torchscript"
        raise ExportError(f"torch.onnx.export failed ({type(err).__name__}: {reason[:300]}); {fix}") from err
    proto = program.model_proto
    for key, value in _embedded(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    names = ", ".join(model.axis_names)
    version = next((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), None)
    if opset is not None and version != opset:  # the exporter falls back to its lowest opset without an error
        raise ExportError(
            f"--opset {opset}: the exporter could not convert the model to it (it fell back to opset {version}); "
            "pick a higher --opset, or leave it out"
        )
    dynamic = f"batch and spatial ({names}: any multiple of {model.divisor})"
    return proto.SerializeToString(), f"ONNX opset {version}", dynamic


def export_torchscript(model: RunModel) -> tuple[bytes, str, str]:
    """The network scripted (``torch.jit.script``), saved with the run's metadata as MONAI's ``ckpt_export`` does."""
    from monai.data.torchscript_utils import save_net_with_metadata

    buffer = io.BytesIO()
    try:
        with _quiet():
            scripted = torch.jit.script(model.network)
            extra = {"inference.json": _embedded(model)["inference.json"].encode()}
            save_net_with_metadata(scripted, buffer, meta_values=model.metadata, more_extra_files=extra)
    except Exception as err:  # TorchScript's compiler raises many types
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ExportError(f"torch.jit.script failed ({type(err).__name__}: {reason[:300]}); try --format onnx") from err
    return buffer.getvalue(), "TorchScript", "batch and spatial (any size the network takes)"


def onnx_runner(data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """The ONNX model in ``data`` on ONNX Runtime's CPU provider, as a function of a tensor."""
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return lambda image: torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: image.numpy()})[0])


def torchscript_runner(data: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    """The TorchScript model in ``data`` loaded with ``torch.jit.load`` on CPU, as a function of a tensor."""
    with _quiet():
        loaded = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return loaded


def compare(exported: torch.Tensor, reference: torch.Tensor, shape: Sequence[int]) -> Check:
    """The exported model's output against PyTorch's: max absolute difference and whether it is within tolerance."""
    if tuple(exported.shape) != tuple(reference.shape):
        problem = f"output shape {list(exported.shape)}, PyTorch's {list(reference.shape)}"
        return Check(list(shape), float("inf"), False, problem)
    difference = (exported.double() - reference.double()).abs()
    allowed = ATOL + RTOL * reference.double().abs()
    over = difference > allowed
    finite = bool(torch.isfinite(exported).all())
    problem = "" if finite else "non-finite values"
    if bool(over.any()):
        problem = f"{int(over.sum())} of {over.numel()} values beyond {ATOL:g} + {RTOL:g} * |pytorch|"
    used = float((difference / allowed).max())
    return Check(list(shape), float(difference.max()), finite and not bool(over.any()), problem, used)


def check(
    model: RunModel, runner: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[torch.Tensor]
) -> list[Check]:
    """The exported model against the PyTorch network on each input."""
    checks = []
    for image in inputs:
        with torch.no_grad():
            reference = model.network(image)
            try:
                exported = runner(image)
            except Exception as err:  # ONNX Runtime and TorchScript raise their own types
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                checks.append(Check(list(image.shape), float("inf"), False, f"does not run: {reason[:300]}"))
                continue
        checks.append(compare(exported, reference, image.shape))
    return checks


def export(run: str | Path, format: str, output: str | Path | None = None, opset: int | None = None) -> ExportResult:
    """Export the model of ``run`` to ``output`` (default ``RUN/models/model.onnx`` or ``model.ts``) and check it.

    Raises :class:`ExportError` for a folder that is not a run, an unknown format, a missing ONNX package, a
    failed export, or a check beyond the tolerance (then nothing is written and a previous file is kept).
    """
    format = format.lower()
    if format not in FORMATS:
        raise ExportError(f"--format {format!r} is not one of {', '.join(FORMATS)}: pick one of them")
    if opset is not None and format != "onnx":
        raise ExportError("--opset applies to --format onnx only: leave it out for TorchScript")
    if format == "onnx":
        require_onnx()  # before the network is built: the fix is an install
    run = Path(run)
    target = Path(output) if output is not None else run / "models" / FORMATS[format]
    if target.is_dir():
        raise ExportError(f"--output {target} is a folder: give a file name, e.g. {target / FORMATS[format]}")
    model = load_run(run)
    start = time.perf_counter()
    data, kind, dynamic = export_onnx(model, opset) if format == "onnx" else export_torchscript(model)
    seconds = time.perf_counter() - start
    runner = onnx_runner(data) if format == "onnx" else torchscript_runner(data)
    checks = check(model, runner, check_inputs(model))
    shape = ", ".join(["batch", str(model.in_channels), *model.axis_names])
    result = ExportResult(target, kind, len(data), seconds, f"{INPUT_NAME} [{shape}] float32", dynamic, checks)
    failed = [item for item in checks if not item.passed]
    if failed:
        details = "; ".join(
            f"input {item.shape}: max abs diff {item.max_abs_diff:.3g}, {item.problem}" for item in failed
        )
        raise ExportError(
            f"the exported {kind} model differs from PyTorch ({details}); nothing was written to {target}: "
            + ("try another --opset or --format torchscript" if format == "onnx" else "try --format onnx")
        )
    try:
        atomic_write_bytes(target, data)
    except OSError as err:
        reason = err.strerror or str(err)
        raise ExportError(f"cannot write {target} ({reason}): pass --output FILE in a writable folder") from err
    return result


def summary(result: ExportResult) -> str:
    """The lines the command prints: the file, its input, and the check against PyTorch."""
    lines = [
        f"wrote {result.path} ({result.format}, {result.size_bytes / 1e6:.1f} MB) in {result.export_seconds:.1f} s",
        f"input {result.input}, output {OUTPUT_NAME} (batch, num_classes, spatial...): logits",
        f"dynamic axes: {result.dynamic}",
        f"check against PyTorch on seeded random inputs (pass: |diff| <= {ATOL:g} + {RTOL:g} * |pytorch|):",
    ]
    lines += [
        f"  input {item.shape}: max abs diff {item.max_abs_diff:.2e} ok ({item.tolerance_used:.0%} of the tolerance)"
        for item in result.checks
    ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m custom_components.export",
        description="Export a training run's model to ONNX or TorchScript and check it against PyTorch.",
    )
    parser.add_argument("run", help="a training run folder (its output_dir: configs/inference.yaml, models/model.pt)")
    parser.add_argument("--format", required=True, help="onnx (ONNX Runtime, TensorRT, serving) or torchscript")
    parser.add_argument("--output", help="file to write (default RUN/models/model.onnx or RUN/models/model.ts)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Export and check; a bad request or a failed check ends with ``error: ...`` and the fix, no traceback."""
    args = _parser().parse_args(argv)
    try:
        result = export(args.run, args.format, args.output, args.opset)
    except ExportError as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: nothing was written")
    print(summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
