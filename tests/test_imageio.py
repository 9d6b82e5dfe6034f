"""One image reader for every part of the project: PNG/TIFF datasets get through checks, plan and K-fold."""

from __future__ import annotations

import json
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest
import yaml
from monai.data.utils import to_affine_nd
from monai.transforms import LoadImage
from PIL import Image

from custom_components.data import estimate_cache_bytes, image_spatial_dims, load_dataset_json
from custom_components.dataset_check import DatasetError, check_case, check_datalist, voxel_sizes
from custom_components.imageio import ImageReadError, read_header, read_image
from custom_components.kfold.splits import describe_cases
from custom_components.prepare import main
from custom_components.synthetic import write_dataset

RNG_SEED = 0


@pytest.fixture(scope="module")
def png_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six synthetic 2D CT-like cases stored as 16-bit PNG images and 8-bit PNG label maps."""
    return write_dataset(
        tmp_path_factory.mktemp("png") / "ds", cases=6, seed=0, dim=2, shape=(48, 40), image_format="png"
    )


def _save_planar(array: np.ndarray, path: Path, **kwargs) -> Path:
    """``array`` indexed (x, y[, channel]) saved as a picture, which stores (rows, columns): transposed."""
    Image.fromarray(np.ascontiguousarray(np.swapaxes(array, 0, 1))).save(path, **kwargs)
    return path


def test_png_tiff_and_nifti_read_back_the_same_array(tmp_path: Path) -> None:
    pixels = np.random.default_rng(RNG_SEED).integers(0, 65535, (23, 17)).astype(np.uint16)  # (x, y), not square
    nifti = tmp_path / "image.nii.gz"
    nib.save(nib.Nifti1Image(pixels, np.diag([0.7, 0.9, 1.0, 1.0])), nifti)
    files = {
        "png": _save_planar(pixels, tmp_path / "image.png"),
        "tiff": _save_planar(pixels, tmp_path / "image.tif"),
        "nifti": nifti,
    }
    for kind, path in files.items():
        array, affine = read_image(path)
        assert array.shape == (23, 17), kind
        np.testing.assert_array_equal(array, pixels, err_msg=kind)
        header = read_header(path)
        assert header.shape == array.shape and np.allclose(header.affine, affine), kind
        assert affine.shape == (4, 4), kind
        expected = [0.7, 0.9] if kind == "nifti" else [1.0, 1.0]  # pictures carry no spacing: 1 mm pixels
        np.testing.assert_allclose(voxel_sizes(affine, 2), expected, err_msg=kind)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("channels", [1, 3])
def test_read_image_gives_what_monai_load_image_gives(tmp_path: Path, suffix: str, channels: int) -> None:
    """Training (MONAI's LoadImage) and the checks, fingerprint and K-fold (read_image) see the same pixels."""
    shape = (31, 22) if channels == 1 else (31, 22, channels)
    pixels = np.random.default_rng(RNG_SEED).integers(0, 255, shape).astype(np.uint8)
    path = _save_planar(pixels, tmp_path / f"image{suffix}")
    loaded = LoadImage(image_only=True)(str(path))
    array, affine = read_image(path)
    assert array.shape == tuple(loaded.shape) == shape
    np.testing.assert_array_equal(array, loaded.numpy())
    np.testing.assert_allclose(affine, to_affine_nd(3, loaded.affine.numpy()))
    header = read_header(path)
    assert header.shape == shape and np.allclose(header.affine, affine)


def test_tiff_pixel_size_is_the_one_training_reads(tmp_path: Path) -> None:
    """MONAI reads TIFF with ITK, which takes the pixel size from the resolution tags (72 dpi: 0.353 mm)."""
    pixels = np.random.default_rng(RNG_SEED).integers(0, 255, (20, 14)).astype(np.uint8)
    path = _save_planar(pixels, tmp_path / "scan.tif", dpi=(72, 72))
    loaded = LoadImage(image_only=True)(str(path))
    _, affine = read_image(path)
    np.testing.assert_allclose(voxel_sizes(affine, 2), [25.4 / 72] * 2)
    np.testing.assert_allclose(affine, to_affine_nd(3, loaded.affine.numpy()))
    np.testing.assert_allclose(read_header(path).affine, affine)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_itk_header_has_the_geometry_of_the_read_volume(tmp_path: Path, suffix: str) -> None:
    """An oblique, anisotropic volume: the header-only shape and affine are those of the voxels MONAI reads."""
    volume = np.random.default_rng(RNG_SEED).integers(-100, 100, (6, 7, 8)).astype(np.int16)  # ITK's (z, y, x)
    image = itk.image_from_array(volume)
    image.SetSpacing([0.5, 0.7, 2.0])
    image.SetOrigin([3.0, -4.0, 5.0])
    angle = 0.3
    rotation = [[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]]
    image.SetDirection(itk.matrix_from_array(np.array(rotation)))
    path = tmp_path / f"volume{suffix}"
    itk.imwrite(image, str(path))
    array, affine = read_image(path)
    loaded = LoadImage(image_only=True)(str(path))
    np.testing.assert_array_equal(array, volume.T)  # (x, y, z)
    np.testing.assert_allclose(affine, loaded.affine.numpy())
    np.testing.assert_allclose(voxel_sizes(affine, 3), [0.5, 0.7, 2.0])
    header = read_header(path)
    assert header.shape == (8, 7, 6)
    np.testing.assert_allclose(header.affine, affine)


def test_plan_on_a_png_dataset(png_dataset: Path) -> None:
    network = ["--set", "channels=[8,16]", "--set", "strides=[2]"]
    assert main(["plan", str(png_dataset), "--dim", "2", "--memory-gb", "1", *network]) == 0

    fingerprint = json.loads((png_dataset / "fingerprint.json").read_text())
    assert fingerprint["image_dims"] == 2 and fingerprint["num_cases"] == 6
    assert fingerprint["median_spacing"] == [1.0, 1.0]
    labels = [np.asarray(Image.open(path)) for path in sorted((png_dataset / "labelsTr").glob("*.png"))]
    assert fingerprint["classes"]["2"]["voxels"] == sum(int(np.count_nonzero(label == 2)) for label in labels)
    shapes = sorted(tuple(case["shape"]) for case in fingerprint["cases"])
    assert shapes == sorted(label.shape[::-1] for label in labels)  # (x, y): the pictures' (columns, rows)
    plan = yaml.safe_load((png_dataset / "plan_2d.yaml").read_text())
    assert plan["spacing"] == [1.0, 1.0] and plan["channels"] == [8, 16] and len(plan["patch_size"]) == 2


def test_kfold_describes_the_cases_of_a_png_dataset(png_dataset: Path) -> None:
    datalist = check_datalist(load_dataset_json(png_dataset), png_dataset, num_classes=3, spatial_dims=2)
    cases = describe_cases(datalist, ["organ", "lesion"], image_dims=2)
    assert [case["case"] for case in cases] == [f"case_{index:03d}" for index in range(6)]
    for case, item in zip(cases, datalist, strict=True):
        label = np.asarray(Image.open(item["label"]))
        present = [name for value, name in ((1, "organ"), (2, "lesion")) if np.any(label == value)]
        assert case["classes"] == present and "organ" in present
        assert case["foreground_size"] == np.count_nonzero(label) > 0  # 1 mm pixels: mm^2 = pixels


def test_header_only_sizes_of_a_png_dataset(png_dataset: Path) -> None:
    datalist = check_datalist(load_dataset_json(png_dataset), png_dataset, num_classes=3, spatial_dims=2)
    assert image_spatial_dims(datalist[0]["image"]) == 2
    pixels = sum(np.asarray(Image.open(item[key])).size for item in datalist for key in ("image", "label"))
    assert estimate_cache_bytes(datalist, None) == pixels * 4  # float32, native 1 mm spacing
    assert estimate_cache_bytes(datalist, [0.5, 0.5]) == pytest.approx(pixels * 4 * 4, rel=1e-6)


def _truncate(path: Path, keep: float) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_corrupt_files_raise_an_error_naming_the_file(tmp_path: Path, png_dataset: Path) -> None:
    volume = np.random.default_rng(RNG_SEED).normal(size=(30, 30, 20)).astype(np.float32)
    nifti = tmp_path / "volume.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), nifti)
    png = _truncate(_save_planar(np.arange(40 * 30, dtype=np.uint16).reshape(40, 30), tmp_path / "a.png"), 0.5)
    tiff = _truncate(_save_planar(np.arange(40 * 30, dtype=np.uint16).reshape(40, 30), tmp_path / "a.tif"), 0.5)
    garbage = tmp_path / "b.png"
    garbage.write_bytes(b"not a picture at all")
    for path in (_truncate(nifti, 0.5), png, tiff, garbage):
        with pytest.raises(ImageReadError) as raised:
            read_image(path)
        message = str(raised.value)
        assert message.startswith(f"{path} cannot be read (") and message.endswith("re-export the file"), message
        assert "\n" not in message and raised.value.path == path and raised.value.__cause__ is not None
    with pytest.raises(ImageReadError, match=f"{tmp_path / 'gone.png'} does not exist"):
        read_image(tmp_path / "gone.png")
    # a truncated picture still has its header: shape without decoding the pixels
    assert read_header(png).shape == (40, 30)
    with pytest.raises(DatasetError, match=f"{garbage} cannot be read"):
        image_spatial_dims(garbage)

    # the dataset check reports the file in its table instead of raising
    item = load_dataset_json(png_dataset)["training"][0]
    label = tmp_path / "label.png"
    label.write_bytes((png_dataset / item["label"]).read_bytes())
    problems = check_case(png_dataset / item["image"], _truncate(label, 0.3), num_classes=3, image_dims=2)
    assert [(problem.file, problem.fatal) for problem in problems] == [(str(label), True)]
    assert problems[0].problem.startswith("cannot be read (") and problems[0].fix == "re-export the file"
