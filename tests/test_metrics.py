"""Surface metrics on shapes with known answers, the empty-mask policy, flip TTA and the largest-component step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer

from custom_components.inference import FlipTTAInferer, flip_combinations, flip_tta
from custom_components.metrics import SurfaceMetric, diagonal_mm, dice_per_class, postprocess_effect, surface_scores

SHAPE = (48, 48, 48)


def _sphere(radius: float, centre: tuple[float, ...] = (24, 24, 24)) -> np.ndarray:
    grid = np.indices(SHAPE)
    return sum((axis - c) ** 2 for axis, c in zip(grid, centre, strict=True)) <= radius**2


def _onehot(*masks: np.ndarray) -> torch.Tensor:
    """(1, classes, *spatial) from one boolean mask per foreground class; background is the rest."""
    foreground = torch.stack([torch.from_numpy(mask) for mask in masks]).float()
    return torch.cat([1 - foreground.amax(dim=0, keepdim=True), foreground])[None]


def test_concentric_spheres_have_the_known_hd95_and_surface_dice() -> None:
    # every surface point of one sphere lies (r2 - r1) = 4 voxels = 6 mm from the other's surface
    inner, outer = _onehot(_sphere(10)), _onehot(_sphere(14))
    spacing = [1.5, 1.5, 1.5]
    hd95 = surface_scores(inner, outer, "hd95", 2.0, spacing).item()
    assert hd95 == pytest.approx(6.0, abs=1.5)  # within one voxel of the continuous answer
    assert surface_scores(inner, outer, "nsd", 7.5, spacing).item() == pytest.approx(1.0)  # tolerance above 6 mm
    assert surface_scores(inner, outer, "nsd", 3.0, spacing).item() < 0.1  # tolerance well below 6 mm
    assert surface_scores(outer, outer, "hd95", 2.0, spacing).item() == 0.0


def test_two_spheres_a_known_distance_apart_and_the_spacing_from_the_affine() -> None:
    reference, shifted = _onehot(_sphere(8)), _onehot(_sphere(8, (28, 24, 24)))  # 4 voxels along the first axis
    assert surface_scores(shifted, reference, "hd95", 2.0, [1.0, 1.0, 1.0]).item() == pytest.approx(4.0)
    assert surface_scores(shifted, reference, "hd95", 2.0, [2.0, 2.0, 2.0]).item() == pytest.approx(8.0)
    # SurfaceMetric (what evaluate.yaml runs) takes each case's spacing from its label's affine
    affine = torch.diag(torch.tensor([2.0, 1.0, 0.5, 1.0]))
    from_affine = SurfaceMetric("hd95")(MetaTensor(shifted, affine=affine), MetaTensor(reference, affine=affine))
    assert from_affine.item() == pytest.approx(surface_scores(shifted, reference, "hd95", 2.0, [2.0, 1.0, 0.5]).item())
    assert from_affine.item() != pytest.approx(4.0)


def test_empty_masks_follow_one_policy() -> None:
    empty, sphere = _onehot(np.zeros(SHAPE, bool)), _onehot(_sphere(8))
    spacing = [1.0, 2.0, 3.0]
    worst = diagonal_mm(SHAPE, spacing)
    assert surface_scores(empty, empty, "hd95", 2.0, spacing).item() == 0.0
    assert surface_scores(empty, empty, "nsd", 2.0, spacing).item() == 1.0
    assert dice_per_class(empty, empty).item() == 1.0
    for pred, label in ((empty, sphere), (sphere, empty)):  # a missed structure, a false alarm
        assert surface_scores(pred, label, "hd95", 2.0, spacing).item() == pytest.approx(worst)
        assert surface_scores(pred, label, "nsd", 2.0, spacing).item() == 0.0
        assert dice_per_class(pred, label).item() == 0.0


def test_keeping_the_largest_component_removes_a_planted_island() -> None:
    reference = _sphere(8)
    island = reference.copy()
    island[2:7, 2:7, 2:7] = True  # a false positive far from the structure
    missing = _sphere(8) & (np.indices(SHAPE)[0] < 24)  # half the structure: nothing to remove
    effect = postprocess_effect(_onehot(island, missing)[0], _onehot(reference, reference)[0])
    (without, with_step), (half_without, half_with) = effect.tolist()
    assert without < 0.98 and with_step == pytest.approx(1.0)  # the island is gone, the sphere kept
    assert half_with == pytest.approx(half_without)


class _Asymmetric(torch.nn.Module):
    """A network whose output changes under flips (a position-dependent bias), so TTA averages different passes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv3d(1, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(0, 1, x.shape[-1])
        return self.conv(x) + ramp


def test_tta_equals_the_plain_output_averaged_with_its_flipped_passes() -> None:
    network, image = _Asymmetric(), torch.randn(1, 1, 8, 10, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = FlipTTAInferer(SimpleInferer(), axes=[0, 1, 2])(image, network)
        passes = []
        for combo in flip_combinations([0, 1, 2]):
            dims = [2 + axis for axis in combo]
            output = network(torch.flip(image, dims)) if dims else network(image)
            passes.append(torch.softmax(torch.flip(output, dims) if dims else output, dim=1))
    assert len(passes) == 8
    expected = torch.stack(passes).mean(dim=0)
    torch.testing.assert_close(torch.softmax(logits, dim=1), expected, atol=1e-6, rtol=1e-5)
    plain = torch.softmax(network(image), dim=1)
    assert not torch.allclose(expected, plain, atol=1e-3)  # the flips did change something


def test_tta_off_is_the_plain_inferer_and_a_slice_axis_is_never_flipped() -> None:
    inferer = SimpleInferer()
    assert flip_tta(inferer, False, None, 3) is inferer
    assert flip_tta(inferer, True, None, 3, slice_axis=2).flips == [(), (0,), (1,), (0, 1)]
    with pytest.raises(SystemExit, match="slice axis 2 is never flipped"):
        flip_tta(inferer, True, [0, 2], 3, slice_axis=2)
