"""Simulator throughput: lensjax (batched, jitted) vs lenstronomy (one image at a time).

Both sides draw the same DeepLenseSim recipe (Recipe A in the README): SIE +
external shear + point-mass subhaloes, elliptical Sersic source, Gaussian PSF
and the recipe's noise. lenstronomy builds its LensModel / ImageModel per image,
as the published DeepLenseSim code does (the lens-model list changes with the
class and number of subhaloes). Ratios are measured in the same run: each case
alternates `--rounds` lensjax and lenstronomy windows and compares the medians.

    make bench                                   # full table (model_i 150 px, model_ii 64 px)
    python experiments/benchmarks/bench_sim.py --skip-lenstronomy --batch-size 4096   # GPU box
    python experiments/benchmarks/bench_sim.py --cases model_ii:axion --line-sum direct
        # the axion vortex summed term by term (profiles.LINE_SUM), for comparison
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from bench_machine import cpu_description  # noqa: E402  (names the CPU model)

from lensjax.sim import get_preset, instrument, profiles  # noqa: E402
from lensjax.sim.recipes import DeepLenseSimRecipe  # noqa: E402


CASES = (("model_i", "no_sub"), ("model_i", "cdm"), ("model_i", "axion"),
         ("model_ii", "no_sub"), ("model_ii", "cdm"), ("model_ii", "axion"))


# ----------------------------------------------------------------------------
# lensjax
# ----------------------------------------------------------------------------

def time_lensjax(preset, label: str, batch_size: int, min_seconds: float, round_index: int = 0
                 ) -> float:
    """Images/s of preset.sample for one class (compile excluded, results blocked on).

    Every call draws new images (its own key and start index); the warm-up takes
    the same path, so the key derivation is compiled before the clock starts too.
    """
    key = jax.random.fold_in(jax.random.key(0), round_index)
    jax.block_until_ready(preset.sample(jax.random.fold_in(key, 0), batch_size, label=label))
    calls, start = 0, time.perf_counter()
    while True:
        out = preset.sample(jax.random.fold_in(key, calls + 1), batch_size, label=label,
                            start_index=calls * batch_size)
        jax.block_until_ready(out)
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and calls >= 3:
            return calls * batch_size / elapsed


# ----------------------------------------------------------------------------
# lenstronomy reference: the same recipe, one image at a time
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _constants(preset: DeepLenseSimRecipe) -> dict:
    """Per-preset constants, computed once (not part of lenstronomy's per-image cost)."""
    return dict(main_theta_e=preset.main_theta_e, source_amp=preset.source_amplitude,
                vortex_theta_e=preset._theta_e(preset.vortex_mass / preset.vortex_num_points))


def _lenstronomy_point_masses(preset: DeepLenseSimRecipe, label: str, rng: np.random.Generator):
    if label == "cdm":
        lo, hi = preset.subhalo_mass_range
        a = 1.0 + preset.subhalo_mass_slope
        mass = (lo**a + rng.uniform(size=preset.num_subhalos) * (hi**a - lo**a)) ** (1.0 / a)
        r = rng.uniform(*preset.subhalo_radius_range, preset.num_subhalos)
        phi = rng.uniform(0, 2 * math.pi, preset.num_subhalos)
        theta_e = _constants(preset)["main_theta_e"] * np.sqrt(mass / preset.main_halo_mass)
        return theta_e, r * np.cos(phi), r * np.sin(phi)
    if label == "axion":
        n = preset.vortex_num_points
        log_m = rng.uniform(*preset.log10_axion_mass_range)
        half = 0.03 * 10.0 ** (-22.0 - log_m)
        phi = rng.uniform(0, 2 * math.pi)
        along = np.linspace(-1, 1, n) * half
        theta_e = np.full(n, _constants(preset)["vortex_theta_e"])
        return theta_e, along * np.cos(phi), along * np.sin(phi)
    return np.zeros(0), np.zeros(0), np.zeros(0)


def lenstronomy_image(preset: DeepLenseSimRecipe, label: str, rng: np.random.Generator
                      ) -> np.ndarray:
    """One image of the preset's recipe with lenstronomy (models built per image)."""
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel

    n, scale = preset.num_pix, preset.pixel_scale
    centre = (n - 1) / 2.0 * scale
    data = ImageData(image_data=np.zeros((n, n)), ra_at_xy_0=-centre, dec_at_xy_0=-centre,
                     transform_pix2angle=np.array([[scale, 0.0], [0.0, scale]]))
    psf = PSF(psf_type="GAUSSIAN", fwhm=preset.psf_fwhm, pixel_size=scale,
              truncation=preset.psf_truncation)
    theta_e, xs, ys = _lenstronomy_point_masses(preset, label, rng)
    lens_list = ["SIE", "SHEAR"] + ["POINT_MASS"] * len(theta_e)
    kwargs_lens = [dict(theta_E=_constants(preset)["main_theta_e"], e1=preset.lens_e1, e2=preset.lens_e2,
                        center_x=0.0, center_y=0.0),
                   dict(gamma1=preset.shear_gamma1, gamma2=preset.shear_gamma2)]
    kwargs_lens += [dict(theta_E=t, center_x=x, center_y=y) for t, x, y in zip(theta_e, xs, ys)]
    src_x, src_y = rng.uniform(-preset.source_center_max, preset.source_center_max, 2)
    kwargs_source = [dict(amp=_constants(preset)["source_amp"], R_sersic=preset.source_r_sersic,
                          n_sersic=preset.source_n_sersic, e1=preset.source_e1,
                          e2=preset.source_e2, center_x=src_x, center_y=src_y)]
    model = ImageModel(data, psf, lens_model_class=LensModel(lens_list),
                       source_model_class=LightModel(["SERSIC_ELLIPSE"]),
                       kwargs_numerics={"supersampling_factor": 1})
    image = model.image(kwargs_lens, kwargs_source)
    if preset.noise == "model_i":
        t = 10.0 ** rng.uniform(*preset.log10_exposure_range)
        # lenstronomy's image_util.add_poisson (Gaussian with variance model / t).
        poisson_part = rng.normal(size=image.shape) * np.sqrt(np.abs(image) / t)
        background = rng.normal(0.0, preset.background_rms, image.shape)
        image = rng.poisson(np.clip(t * (image + poisson_part + background), 0, None))
    elif preset.noise == "single_band":
        sigma = np.sqrt(preset.band.background_noise**2
                        + np.clip(image, 0, None) / preset.band.total_exposure_time)
        image = image + rng.normal(size=image.shape) * sigma
    return image


def time_lenstronomy(preset, label: str, min_seconds: float, round_index: int = 0) -> float:
    """Images/s of `lenstronomy_image`, one image after another."""
    rng = np.random.default_rng(round_index)
    lenstronomy_image(preset, label, rng)  # imports and caches out of the timing
    count, start = 0, time.perf_counter()
    while True:
        lenstronomy_image(preset, label, rng)
        count += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds and count >= 3:
            return count / elapsed


# ----------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=256,
                        help="lensjax images per call (default 256; use thousands on a GPU)")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="timing per case and side, split over --rounds windows (default 6)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating lensjax / lenstronomy windows per case; the table gives "
                             "the median of each side (default 3)")
    parser.add_argument("--skip-lenstronomy", action="store_true",
                        help="time lensjax only (e.g. on a GPU box without lenstronomy)")
    parser.add_argument("--cases", default="all",
                        help="comma list like model_i:cdm,model_ii:no_sub (default all)")
    parser.add_argument("--json", default=None, help="also write the table to this JSON file")
    parser.add_argument("--line-sum", default=profiles.LINE_SUM, choices=profiles.LINE_SUMS,
                        help="how the axion vortex's point masses are summed (profiles.LINE_SUM; "
                             "default %(default)s)")
    args = parser.parse_args(argv)
    profiles.LINE_SUM = args.line_sum  # read when the simulator is traced

    cases = CASES if args.cases == "all" else tuple(
        tuple(c.split(":")) for c in args.cases.split(","))
    for case in cases:
        if len(case) != 2 or case not in CASES:
            parser.error(f"--cases: unknown case {':'.join(case)!r}; valid: "
                         + ", ".join(f"{p}:{c}" for p, c in CASES))
    if args.rounds < 1 or args.seconds <= 0:
        parser.error("--rounds must be >= 1 and --seconds > 0")
    device = jax.devices()[0]
    print(f"lensjax simulator benchmark | jax {jax.__version__} | {device.platform}: "
          f"{device.device_kind} x{jax.device_count()} | {cpu_description()}, "
          f"{os.cpu_count()} cores | batch {args.batch_size} | {args.rounds} rounds of "
          f"{args.seconds / args.rounds:.1f} s per side, medians | "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} | line sum {args.line_sum}")
    header = f"{'preset':<9} {'class':<7} {'px':>4} {'lensjax img/s':>14} {'lenstronomy img/s':>18} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    for preset_name, label in cases:
        preset = get_preset(preset_name)
        # Alternating windows, so that a slow spell of a shared machine hits both
        # sides alike; the medians drop a window that one of them caught alone.
        window = args.seconds / args.rounds
        ours_rounds, ref_rounds = [], []
        for r in range(args.rounds):
            ours_rounds.append(time_lensjax(preset, label, args.batch_size, window, r))
            if not args.skip_lenstronomy:
                ref_rounds.append(time_lenstronomy(preset, label, window, r))
        ours = statistics.median(ours_rounds)
        ref = statistics.median(ref_rounds) if ref_rounds else None
        ratio = None if ref is None else ours / ref
        rows.append(dict(preset=preset_name, label=label, num_pix=preset.num_pix,
                         lensjax_img_per_s=ours, lenstronomy_img_per_s=ref, ratio=ratio,
                         batch_size=args.batch_size, device=device.device_kind))
        ref_text = "-" if ref is None else f"{ref:.1f}"
        ratio_text = "-" if ratio is None else f"{ratio:.1f}x"
        print(f"{preset_name:<9} {label:<7} {preset.num_pix:>4} {ours:>14.1f} {ref_text:>18} "
              f"{ratio_text:>7}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
