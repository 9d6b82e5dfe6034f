"""Intensity normalisation chosen by one config key, built from MONAI transforms."""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import Compose, MapTransform, NormalizeIntensityd, ScaleIntensityRanged, ThresholdIntensityd

INTENSITY_SCHEMES = ("ct_window", "ct_zscore", "zscore")


def intensity_transform(
    keys: str | Sequence[str],
    scheme: str = "ct_window",
    window: Sequence[float] | None = (-160.0, 240.0),
    mean: float | None = None,
    std: float | None = None,
) -> MapTransform | Compose:
    """The intensity normalisation of the ``intensity`` config key.

    - ``ct_window``: clip Hounsfield units to ``window`` and scale linearly to 0..1 (the usual CT window).
    - ``ct_zscore``: clip to ``window`` (nnU-Net uses the 0.5/99.5 foreground percentiles), then subtract the
      dataset foreground ``mean`` and divide by ``std``: one global scaling, so HU keep their meaning.
    - ``zscore``: per-image z-score over the non-zero voxels, channel by channel (MR and other modalities,
      whose intensities have no absolute scale).
    """
    if scheme == "ct_window":
        if window is None or len(window) != 2:
            raise ValueError("intensity scheme 'ct_window' needs window: [low_HU, high_HU]")
        return ScaleIntensityRanged(keys, a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)
    if scheme == "ct_zscore":
        if window is None or len(window) != 2 or mean is None or not std:
            raise ValueError("intensity scheme 'ct_zscore' needs window, mean and std (see `prepare plan`)")
        return Compose(
            [
                ThresholdIntensityd(keys, threshold=window[0], above=True, cval=window[0]),
                ThresholdIntensityd(keys, threshold=window[1], above=False, cval=window[1]),
                NormalizeIntensityd(keys, subtrahend=mean, divisor=std),
            ]
        )
    if scheme == "zscore":
        return NormalizeIntensityd(keys, nonzero=True, channel_wise=True)
    raise ValueError(f"unknown intensity scheme {scheme!r}: choose one of {INTENSITY_SCHEMES}")
