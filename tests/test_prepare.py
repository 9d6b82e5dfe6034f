"""`prepare convert`, `check` and `plan`: DICOM in, every problem reported, a measured plan the bundles read."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from custom_components import plan_network, planning, settings
from custom_components.data import DatasetError, check_datalist, load_dataset_json
from custom_components.plan_network import divisibility, dynunet_plan, pool_and_conv_props
from custom_components.planning import make_plan, patch_candidates, target_spacing
from custom_components.prepare import main
from custom_components.step_choice import choose_patch_and_batch
from custom_components.step_measure import StepMemory
from custom_components.synthetic import write_dataset
from custom_components.transforms import intensity_transform
from tests.conftest import REPO, run_bundle

# a network small enough that measuring a training step takes a fraction of a second
TINY_NETWORK = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 0}


ORIGIN_LPS = np.array([-120.0, 80.0, 35.0])


def _directions(angle: float) -> np.ndarray:
    """Patient (LPS) directions of increasing column, row and slice index: rotated by ``angle`` about z."""
    columns = np.array([np.cos(angle), np.sin(angle), 0.0])
    rows = np.array([-np.sin(angle), np.cos(angle), 0.0])
    return np.stack([columns, rows, np.cross(columns, rows)])


def write_dicom_series(folder: Path, volume: np.ndarray, spacing: tuple[float, float, float], angle: float) -> None:
    """A CT series of int16 ``volume[column, row, slice]`` with ``spacing`` (column, row, slice) in mm and the
    directions of ``_directions``; files named in shuffled order, so the slice order must come from geometry."""
    folder.mkdir(parents=True)
    columns, rows, normal = _directions(angle)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for order, index in enumerate(np.random.default_rng(0).permutation(volume.shape[2])):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CTImageStorage, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "CT", "anon", 1, int(index) + 1
        ds.ImageOrientationPatient = [*columns, *rows]
        ds.ImagePositionPatient = list(ORIGIN_LPS + index * spacing[2] * normal)
        ds.PixelSpacing, ds.SliceThickness = [spacing[1], spacing[0]], spacing[2]  # (between rows, between columns)
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, index].T).astype(np.int16).tobytes()
        ds.save_as(folder / f"IM{order:04d}", enforce_file_format=True)


def dicom_affine(spacing: tuple[float, float, float], angle: float) -> np.ndarray:
    """The RAS affine of ``write_dicom_series``'s grid, from the DICOM geometry (LPS flipped to RAS)."""
    affine = np.eye(4)
    affine[:3, :3] = _directions(angle).T * np.asarray(spacing)
    affine[:3, 3] = ORIGIN_LPS
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def test_convert_dicom_series_keeps_spacing_and_orientation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    spacing, angle = (0.7, 0.9, 2.5), 0.3
    volume = rng.integers(-1000, 1000, (20, 16, 6)).astype(np.int16)
    label = (volume > 500).astype(np.uint8) * 2
    write_dicom_series(tmp_path / "images" / "case_a", volume, spacing, angle)
    reference = tmp_path / "reference.nii.gz"  # the NIfTI written from the same array and the DICOM geometry
    nib.save(nib.Nifti1Image(volume, dicom_affine(spacing, angle)), reference)
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(label, dicom_affine(spacing, angle)), tmp_path / "labels" / "case_a.nii.gz")
    nib.save(nib.Nifti1Image(volume[:, :, :3], np.eye(4)), tmp_path / "images" / "case_b.nii")  # no label: test

    out = tmp_path / "dataset"
    args = ["--images", str(tmp_path / "images"), "--labels", str(tmp_path / "labels"), "--out", str(out)]
    assert main(["convert", *args]) == 0

    converted, expected = nib.load(out / "imagesTr" / "case_a.nii.gz"), nib.load(reference)
    np.testing.assert_array_equal(np.asarray(converted.dataobj), np.asarray(expected.dataobj))
    np.testing.assert_allclose(converted.affine, expected.affine, atol=1e-4)
    assert converted.header.get_zooms() == pytest.approx(spacing, abs=1e-5)
    assert nib.aff2axcodes(converted.affine) == nib.aff2axcodes(expected.affine)
    np.testing.assert_array_equal(np.asarray(nib.load(out / "labelsTr" / "case_a.nii.gz").dataobj), label)
    description = json.loads((out / "dataset.json").read_text())
    assert description["modality"] == {"0": "CT"}  # the DICOM Modality tag
    assert description["labels"] == {"0": "background", "1": "class_1", "2": "class_2"}
    assert description["training"] == [{"image": "./imagesTr/case_a.nii.gz", "label": "./labelsTr/case_a.nii.gz"}]
    assert description["test"] == ["./imagesTs/case_b.nii.gz"]
    assert nib.load(out / "imagesTs" / "case_b.nii.gz").shape == (20, 16, 3)


def test_convert_stacks_modalities_and_refuses_unpaired_labels(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(1)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    for folder, offset in (("t1", 0.0), ("t2", 500.0)):
        (tmp_path / folder).mkdir()
        for case in ("p1", "p2"):
            image = (rng.random((12, 10, 5)) * 100 + offset).astype(np.float32)
            nib.save(nib.Nifti1Image(image, affine), tmp_path / folder / f"{case}.nii.gz")
    (tmp_path / "labels").mkdir()
    diagonal = np.eye(12, 10, dtype=np.float32)[..., None].repeat(5, axis=2)  # labels saved as floats
    for case in ("p1", "p2"):
        nib.save(nib.Nifti1Image(diagonal, affine), tmp_path / "labels" / f"{case}.nii.gz")
    out = tmp_path / "dataset"
    args = ["convert", "--images", str(tmp_path / "t1"), str(tmp_path / "t2"), "--labels", str(tmp_path / "labels")]
    assert main([*args, "--out", str(out), "--modality", "T1", "T2", "--label-names", "background", "tumour"]) == 0

    image = nib.load(out / "imagesTr" / "p2.nii.gz")
    assert image.shape == (12, 10, 5, 2)  # MSD: modalities on a 4th axis
    t1 = np.asarray(nib.load(tmp_path / "t1" / "p2.nii.gz").dataobj)
    np.testing.assert_allclose(np.asarray(image.dataobj)[..., 0], t1)
    assert np.asarray(image.dataobj)[..., 1].min() >= 500
    label_dtype = nib.load(out / "labelsTr" / "p1.nii.gz").get_data_dtype()
    assert label_dtype == np.uint8  # whole-number floats stored as integers
    description = load_dataset_json(out)
    assert description["modality"] == {"0": "T1", "1": "T2"}
    assert description["labels"] == {"0": "background", "1": "tumour"}
    assert "all 2 cases pass every check" in capsys.readouterr().out

    nib.save(nib.Nifti1Image(np.zeros((12, 10, 5), np.uint8), affine), tmp_path / "labels" / "p3.nii.gz")
    assert main([*args, "--out", str(tmp_path / "other")]) == 1
    assert "labels without an image: ['p3']" in capsys.readouterr().err


def _save_like(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(data, affine), path)


def test_check_reports_every_problem_of_every_case(tmp_path: Path, capsys) -> None:
    root = write_dataset(tmp_path / "ds", cases=12, seed=2, shape=(20, 20, 8))
    image = lambda n: root / "imagesTr" / f"case_{n:03d}.nii.gz"  # noqa: E731
    label = lambda n: root / "labelsTr" / f"case_{n:03d}.nii.gz"  # noqa: E731
    read = lambda path: (np.asarray(nib.load(path).dataobj), nib.load(path).affine)  # noqa: E731
    image(0).unlink()
    label(1).write_bytes(b"not a NIfTI file")
    data, affine = read(image(2))
    _save_like(image(2), np.stack([data, data], axis=-1), affine)  # two channels, dataset.json declares one
    data, affine = read(label(3))
    _save_like(label(3), data[:-2], affine)  # another grid
    data, affine = read(label(4))
    _save_like(label(4), data, np.diag([1.0, 1.0, 2.5, 1.0]))  # another voxel size
    affine = read(label(5))[1].copy()
    affine[:3, 3] += 5.0
    _save_like(label(5), read(label(5))[0], affine)  # shifted origin
    data, affine = read(label(6))
    data[0, 0, 0] = 7
    _save_like(label(6), data, affine)  # undeclared class
    data, affine = read(image(7))
    _save_like(image(7), np.where(data > 50, np.nan, data).astype(np.float32), affine)  # NaN ...
    data, affine = read(label(7))
    _save_like(label(7), data.astype(np.float32) * 0.5, affine)  # ... and interpolated labels: two problems
    data, affine = read(image(8))
    _save_like(image(8), np.full_like(data, 30), affine)  # constant
    data, affine = read(label(9))
    _save_like(label(9), np.zeros_like(data), affine)  # no foreground: a warning
    for path in (image(10), label(10)):
        data, affine = read(path)
        _save_like(path, data, np.diag([0.0008, 0.0008, 0.0025, 1.0]))  # metres, not millimetres

    assert main(["check", str(root)]) == 1
    table = capsys.readouterr().out
    expected = {
        "imagesTr/case_000.nii.gz": "does not exist",
        "labelsTr/case_001.nii.gz": "cannot be read",
        "imagesTr/case_002.nii.gz": "), not 3D",
        "labelsTr/case_003.nii.gz": "but its image case_003.nii.gz has",
        "labelsTr/case_004.nii.gz": "has voxel size [1.0, 1.0, 2.5] but its image",
        "labelsTr/case_005.nii.gz": "another origin or orientation",
        "labelsTr/case_006.nii.gz": "label values [7] outside 0..2",
        "imagesTr/case_007.nii.gz": "NaN or infinite voxels",
        "labelsTr/case_007.nii.gz": "non-integer label values",
        "imagesTr/case_008.nii.gz": "is constant",
        "labelsTr/case_009.nii.gz": "no foreground voxel",
        "imagesTr/case_010.nii.gz": "outside the plausible",
    }
    rows = [line for line in table.splitlines() if line.startswith("case_")]
    for file, problem in expected.items():
        assert any(file in row and problem in row for row in rows), (file, problem, table)
    assert len(rows) == len(expected) and "case_011" not in table
    assert any("warning" in row and "case_009" in row for row in rows)
    assert "10 unusable of 12 cases, 1 warning(s)" in table

    with pytest.raises(DatasetError) as raised:  # training runs the same check and names every unusable case
        check_datalist(load_dataset_json(root), root, 3)
    message = str(raised.value)
    assert message.startswith("10 of 12 cases cannot be used")
    assert all(file in message for file in expected if "009" not in file) and "case_009" not in message


def test_target_spacing_is_the_median_or_nnunet_anisotropic_rule() -> None:
    shapes = np.array([[200, 200, 150]] * 3)
    spacings = np.array([[0.7, 0.7, 1.0], [0.8, 0.8, 1.5], [0.9, 0.9, 2.0]])
    assert target_spacing(spacings, shapes) == pytest.approx([0.8, 0.8, 1.5])  # isotropic enough: the median
    thick = np.array([[0.7, 0.7, 4.0], [0.7, 0.7, 5.0], [0.8, 0.8, 5.0], [0.8, 0.8, 6.0], [0.9, 0.9, 8.0]])
    few_slices = np.array([[256, 256, 30]] * 5)
    # 5 mm median slices, over 3x the in-plane spacing, and 30 slices against 256: the 10th percentile, 4.4 mm
    assert target_spacing(thick, few_slices) == pytest.approx([0.8, 0.8, 4.4])
    assert target_spacing(thick, np.array([[256, 256, 200]] * 5)) == pytest.approx([0.8, 0.8, 5.0])


def _known_dataset(root: Path) -> dict:
    """Five CT cases of known spacing (z 4-8 mm: anisotropic): a 10x10x4 organ block holding the values 0..399
    and, in two cases, a 2x2x2 lesion block at 300 HU, in air at -1000 HU."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    spacings = [(0.6, 0.6, 4.0), (0.7, 0.7, 5.0), (0.7, 0.7, 5.0), (0.8, 0.8, 6.0), (0.9, 0.9, 8.0)]
    training, foreground = [], []
    for index, spacing in enumerate(spacings):
        image = np.full((40, 36, 10), -1000, np.int16)
        label = np.zeros((40, 36, 10), np.uint8)
        image[10:20, 10:20, 3:7] = np.random.default_rng(index).permutation(400).reshape(10, 10, 4)
        label[10:20, 10:20, 3:7] = 1
        if index < 2:
            image[25:27, 25:27, 4:6], label[25:27, 25:27, 4:6] = 300, 2
        foreground.append(image[label > 0])
        name = f"case_{index}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.diag([*spacing, 1.0])), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, np.diag([*spacing, 1.0])), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    labels = {"0": "background", "1": "organ", "2": "lesion"}
    description = {"modality": {"0": "CT"}, "labels": labels, "training": training}
    (root / "dataset.json").write_text(json.dumps(description))
    return {"foreground": np.concatenate(foreground), "voxels": 5 * 40 * 36 * 10, "lesion": 2 * 8, "organ": 5 * 400}


def test_plan_on_known_data(tmp_path: Path) -> None:
    known = _known_dataset(tmp_path / "known")
    path, plan = make_plan(tmp_path / "known", memory_gb=4, overrides=TINY_NETWORK, log=lambda line: None)

    fingerprint = json.loads((tmp_path / "known" / "fingerprint.json").read_text())
    assert fingerprint["median_spacing"] == pytest.approx([0.7, 0.7, 5.0])
    assert fingerprint["median_shape"] == [40, 36, 10]
    classes = fingerprint["classes"]
    assert [classes[c]["voxels"] for c in "012"] == [known["voxels"] - known["organ"] - known["lesion"], 2000, 16]
    assert classes["2"]["fraction"] == pytest.approx(16 / known["voxels"]) and classes["2"]["cases"] == 2
    assert classes["1"]["cases"] == 5
    stats = fingerprint["intensity"]["0"]
    values = known["foreground"]  # 5x the values 0..399, and 16 voxels at 300 HU: no background voxel
    assert stats["voxels_sampled"] == values.size == 2016 and stats["min"] == 0 and stats["max"] == 399
    assert stats["mean"] == pytest.approx(values.mean()) and stats["std"] == pytest.approx(values.std())
    assert [stats["percentile_00_5"], stats["percentile_99_5"]] == pytest.approx(np.percentile(values, [0.5, 99.5]))

    assert plan["spacing"] == pytest.approx([0.7, 0.7, 4.4])  # z: the anisotropic rule's 10th percentile
    assert plan["intensity"] == {
        "scheme": "ct_zscore",
        "window": pytest.approx(np.percentile(values, [0.5, 99.5]).tolist(), abs=0.01),
        "mean": pytest.approx(values.mean(), abs=1e-3),
        "std": pytest.approx(values.std(), abs=1e-3),
    }
    fractions = np.array([classes[c]["fraction"] for c in "012"])
    expected_weights = 1 / np.sqrt(fractions) / np.mean(1 / np.sqrt(fractions))
    assert plan["class_weights"] == pytest.approx(expected_weights, abs=1e-3)
    # median size at 0.7 x 0.7 x 4.4 mm is 40 x 36 x 11.4 voxels; the tiny network divides by 4 (two strides of 2)
    assert plan["patch_size"] == [40, 36, 8] and plan["batch_size"] == 2  # 5 cases: the 5% rule caps the batch

    # the README's command: the plan given with --plan_file trains (its dataset_dir too), read as data; the run
    # folder writes every planned value as the literal it trained with
    run = tmp_path / "run"
    quick = {"max_epochs": 1, "num_workers": 0, "progress_bar": False, "report": False, "output_dir": run}
    trained_log = run_bundle("bundles/unet3d/configs/train.yaml", {"plan_file": path, **quick})
    # the plan file's keys count as set, its batch_size 2 too (the bundle's default): plan auto makes no plan
    assert "plan auto: every planned key is set" in trained_log.stdout + trained_log.stderr
    trained = yaml.safe_load((run / "configs/train.yaml").read_text().split("# Wiring:")[0])
    for key in ("spacing", "intensity", "class_weights", "patch_size", "batch_size", "channels", "dataset_dir"):
        assert trained[key] == plan[key], key
    assert trained["dataset_dir"] == str((tmp_path / "known").resolve()) and trained["plan_file"] is None
    # air and the brightest organ voxel land on the window's ends, z-scored with the foreground statistics
    normalised = intensity_transform("image", **plan["intensity"])({"image": np.array([[-1000.0, 399.0]])})["image"]
    window = np.asarray(plan["intensity"]["window"])
    np.testing.assert_allclose(np.asarray(normalised).ravel(), (window - values.mean()) / values.std(), atol=1e-3)
    assert yaml.safe_load(path.read_text()) == plan


def test_plan_for_the_2d_bundle_keeps_native_slice_spacing(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "ct", cases=4, seed=4, shape=(40, 40, 12), spacing=(0.8, 0.8, 2.5))
    path, plan = make_plan(root, memory_gb=4, dim=2, overrides=TINY_NETWORK, log=lambda line: None)
    assert path == root / "plan_2d.yaml" and plan["spacing"] == [0.8, 0.8, -1.0]  # z, across slices, stays native
    median = json.loads((root / "fingerprint.json").read_text())["median_shape"]
    assert plan["patch_size"] == [int(n) // 4 * 4 for n in median[:2]]  # in-plane median, a multiple of 4


def test_plan_refuses_a_budget_no_patch_fits_and_keys_it_decides(tmp_path: Path, capsys) -> None:
    root = write_dataset(tmp_path / "ct", cases=3, seed=5, shape=(24, 24, 8))
    network = ["--set", "channels=[4,8,16]", "--set", "strides=[2,2]"]
    assert main(["plan", str(root), "--memory-gb", "0.001", *network]) == 1
    assert "over the 0.00 GiB budget: raise --memory-gb" in capsys.readouterr().err
    assert main(["plan", str(root), *network, "--set", "patch_size=[8,8,8]"]) == 1
    assert "--set patch_size: the plan decides these" in capsys.readouterr().err
    assert not (root / "plan_3d.yaml").exists()


def test_larger_budget_never_gives_smaller_patch() -> None:
    """Real measurements of the 3D bundle's (tiny) network, each candidate measured once and reused."""
    overrides = {**TINY_NETWORK, "num_classes": 3, "in_channels": 1, "class_weights": None}
    measure = StepMemory(REPO / "bundles/unet3d/configs/train.yaml", overrides, "cpu", log=lambda line: None)
    candidates = patch_candidates((48, 48, 16), (4, 4, 4))
    smallest, largest = measure(candidates[-1], 2), measure(candidates[0], 2)
    assert smallest < largest
    budgets = np.linspace(smallest * 1.02, largest * 1.3, 4)
    choices = [choose_patch_and_batch(candidates, budget, measure, max_batch=2) for budget in budgets]
    for smaller, larger in zip(choices, choices[1:], strict=False):
        assert all(a <= b for a, b in zip(smaller.patch_size, larger.patch_size, strict=True)), (smaller, larger)
    assert choices[0].patch_size != candidates[0] and choices[-1].patch_size == candidates[0]
    for choice, budget in zip(choices, budgets, strict=True):
        assert choice.step_bytes <= budget and choice.batch_size == 2


def test_choice_follows_a_memory_model_over_many_budgets() -> None:
    """With a known memory law (fixed cost plus a cost per voxel and sample) the choice is the best one that fits."""
    candidates = patch_candidates((128, 128, 64), (16, 16, 16))

    def law(patch: tuple[int, ...], batch: int) -> int:
        return int(100e6 + 2000 * np.prod(patch) * batch)

    previous = None
    for budget in np.geomspace(law(candidates[-1], 2), law(candidates[0], 12) * 1.1, 40):
        choice = choose_patch_and_batch(candidates, budget, law, max_batch=8)
        fitting = [p for p in candidates if law(p, 2) <= budget]
        assert choice.patch_size == fitting[0]  # the largest that fits
        assert choice.batch_size == max(b for b in range(2, 9) if law(choice.patch_size, b) <= budget)
        assert previous is None or np.prod(choice.patch_size) >= np.prod(previous.patch_size)
        previous = choice
    assert previous.patch_size == candidates[0] and previous.batch_size == 8
    with pytest.raises(planning.PlanError, match="the smallest patch .* needs"):
        choose_patch_and_batch(candidates, law(candidates[-1], 2) - 1, law, max_batch=8)


def test_patch_candidates_shrink_to_the_network_divisor() -> None:
    candidates = patch_candidates((100, 90, 30), (16, 16, 8))
    assert candidates[0] == (96, 80, 24)
    assert candidates[-1] == (32, 32, 16)
    for larger, smaller in zip(candidates, candidates[1:], strict=False):
        shrunk = [a > b for a, b in zip(larger, smaller, strict=True)]
        assert sum(shrunk) == 1 and all(a >= b for a, b in zip(larger, smaller, strict=True))
    assert all(n % d == 0 for patch in candidates for n, d in zip(patch, (16, 16, 8), strict=True))


def test_patch_candidates_never_pad_far_beyond_the_largest_case() -> None:
    # 12-14 slices against a network dividing z by 16: the patch z is 16 (the largest case rounded up), not 2 x 16
    candidates = patch_candidates((48, 48, 12), (16, 16, 16), largest_size=(55, 55, 14))
    assert candidates[0] == (48, 48, 16) and candidates[-1] == (32, 32, 16)
    assert all(patch[2] == 16 for patch in candidates)


def test_pool_and_conv_props_follow_nnunet() -> None:
    # 0.8 x 0.8 x 5 mm: x and y pooled until their spacing nears z's, convolved across z only from then on
    strides, kernels = pool_and_conv_props((0.8, 0.8, 5.0), (48, 48, 12))
    assert strides == [[2, 2, 1], [2, 2, 1], [2, 2, 2]]
    assert kernels == [[3, 3, 1], [3, 3, 1], [3, 3, 3], [3, 3, 3]]
    strides, kernels = pool_and_conv_props((1.0, 1.0, 1.0), (256, 256, 256))  # isotropic: at most 5 pools
    assert strides == [[2, 2, 2]] * 5 and kernels == [[3, 3, 3]] * 6
    # y stops at 5 voxels (under twice nnU-Net's 4), x alone needs three times 4: 64 -> 8 in three pools
    strides, _ = pool_and_conv_props((1.0, 1.0), (64, 20))
    assert divisibility(strides, 2).tolist() == [8, 4]
    plan = dynunet_plan((0.8, 0.8, 5.0), (48, 48, 12), [32, 64, 128, 256, 320])
    assert plan == {
        "channels": [32, 64, 128, 256],
        "strides": [[2, 2, 1], [2, 2, 1], 2],
        "kernel_sizes": [[3, 3, 1], [3, 3, 1], 3, 3],
    }
    with pytest.raises(planning.PlanError, match="DynUNet needs 2"):
        dynunet_plan((1.0, 1.0, 1.0), (12, 12, 12), [32, 64, 128])


def test_the_cpu_network_pools_thick_slices_late() -> None:
    """On CPU the plan's unet pools each axis by nnU-Net's rule, at most three times: 12 slices of 4 mm need a patch
    z that is a multiple of 2, not of 8."""
    network = plan_network.cpu_unet((0.8, 0.8, 4.0), (96, 96, 12))
    assert network == {"channels": [16, 32, 64, 128], "strides": [[2, 2, 1], [2, 2, 1], 2]}
    assert divisibility(network["strides"], 3).tolist() == [8, 8, 2]
    assert plan_network.cpu_unet((1.0, 1.0, 1.0), (64, 64, 64)) == {"channels": [16, 32, 64, 128], "strides": [2, 2, 2]}
    assert plan_network.cpu_unet((1.0, 1.0), (16, 12)) == {"channels": [16, 32], "strides": [2]}  # room for one pooling
    with pytest.raises(plan_network.PlanError, match="no room for a pooling"):
        plan_network.cpu_unet((1.0, 1.0), (6, 6))


def test_dynunet_plan_on_anisotropic_data(tmp_path: Path, capsys) -> None:
    """0.8 x 0.8 x 5 mm volumes of 10-14 slices: z is pooled once, x and y three times, and the patch z never
    exceeds the largest case rounded up to the network's divisor along z."""
    root = write_dataset(tmp_path / "thick", cases=4, seed=3, shape=(40, 40, 12), spacing=(0.8, 0.8, 5.0))
    network = ["--set", "architecture=dynunet", "--set", "channels=[4,8,16]", "--set", "num_res_units=0"]
    assert main(["plan", str(root), *network, "--set", "strides=[2,2]"]) == 1
    assert "--set strides: the plan decides these" in capsys.readouterr().err  # dynunet's strides are planned
    assert main(["plan", str(root), "--memory-gb", "4", *network]) == 0
    plan = yaml.safe_load((root / "plan_3d.yaml").read_text())
    assert plan["spacing"] == pytest.approx([0.8, 0.8, 5.0])
    assert plan["architecture"] == "dynunet" and plan["channels"] == [4, 8, 16, 16]
    assert plan["strides"] == [[2, 2, 1], [2, 2, 1], 2] and plan["kernel_sizes"] == [[3, 3, 1], [3, 3, 1], 3, 3]
    divisor = divisibility(plan["strides"], 3)
    assert divisor.tolist() == [8, 8, 2]  # z pooled fewer times than x and y
    largest_z = max(case["shape"][2] for case in json.loads((root / "fingerprint.json").read_text())["cases"])
    assert plan["patch_size"][2] <= -(-largest_z // divisor[2]) * divisor[2]
    assert all(size % d == 0 for size, d in zip(plan["patch_size"], divisor, strict=True))
    values = {key: value for key, value in plan.items() if key != "dataset_dir"}
    assert settings.check(values, REPO / "bundles/unet3d") == []  # the bundle takes the plan as written
