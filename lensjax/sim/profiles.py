"""Deflection angles of lens mass profiles, in lenstronomy's parameterisation.

All functions are pure jax.numpy, broadcast over their arguments and keep the
dtype of the coordinates (float32 by default, float64 when x64 is enabled).
Angles are in arcsec. Each returns the deflection (alpha_x, alpha_y) such that
the source-plane position is (x - alpha_x, y - alpha_y).

Conventions (checked against lenstronomy in tests/sim/test_profiles.py):
- ellipticity (e1, e2): c = |(e1, e2)|, q = (1 - c) / (1 + c), phi = atan2(e2, e1) / 2.
- SIE is lenstronomy's NIE with a vanishing core; theta_E is the product-average
  Einstein radius, so the Keeton deflection uses b = theta_E * sqrt(q).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lensjax.sim import domain

Array = jax.Array

# lenstronomy's SIE keeps a core of 1e-10 arcsec so that the centre is finite.
SIE_CORE_ARCSEC = 1e-10


def sie_near_round_modulus(dtype) -> float:
    """Ellipticity modulus c = |(e1, e2)| below which `deflection_sie` uses its
    first-order expansion in (e1, e2): sqrt(machine epsilon) of `dtype` (3.5e-4 in
    float32, 1.5e-8 in float64), where the neglected O(c^2) terms fall below the
    dtype's rounding."""
    return float(jnp.finfo(dtype).eps) ** 0.5


def ellipticity_to_phi_q(e1: Array, e2: Array) -> tuple[Array, Array]:
    """(e1, e2) -> (position angle phi in rad, axis ratio q); lenstronomy caps c at 0.9999."""
    c = jnp.minimum(jnp.hypot(e1, e2), 0.9999)
    return jnp.arctan2(e2, e1) / 2.0, (1.0 - c) / (1.0 + c)


def phi_q_to_ellipticity(phi: Array, q: Array) -> tuple[Array, Array]:
    """(position angle phi in rad, axis ratio q in (0, 1]) -> (e1, e2)."""
    domain.check_in_range("q", q, 0.0, 1.0, low_inclusive=False)
    c = (1.0 - q) / (1.0 + q)
    return c * jnp.cos(2.0 * phi), c * jnp.sin(2.0 * phi)


def shear_polar_to_cartesian(angle: Array, gamma: Array) -> tuple[Array, Array]:
    """Shear magnitude and angle (rad) -> (gamma1, gamma2), lenstronomy's convention."""
    domain.check_nonnegative("gamma", gamma)
    return gamma * jnp.cos(2.0 * angle), gamma * jnp.sin(2.0 * angle)


def _rotate(x: Array, y: Array, angle: Array) -> tuple[Array, Array]:
    """Coordinates in a frame rotated by `angle` (lenstronomy's util.rotate)."""
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return x * cos + y * sin, -x * sin + y * cos


def deflection_sis(x: Array, y: Array, theta_E: Array, center_x: Array = 0.0,
                   center_y: Array = 0.0) -> tuple[Array, Array]:
    """Singular isothermal sphere: alpha = theta_E * r_hat. Shapes broadcast."""
    domain.check_nonnegative("theta_E", theta_E)
    dx, dy = x - center_x, y - center_y
    r = jnp.sqrt(dx * dx + dy * dy)
    scale = theta_E / jnp.maximum(r, jnp.finfo(dx.dtype).tiny ** 0.5)
    return scale * dx, scale * dy


def deflection_sie(x: Array, y: Array, theta_E: Array, e1: Array, e2: Array,
                   center_x: Array = 0.0, center_y: Array = 0.0) -> tuple[Array, Array]:
    """Singular isothermal ellipsoid (lenstronomy SIE = NIE with s -> 0). Shapes broadcast.

    Differentiable everywhere off the centre, round point included: for
    c = |(e1, e2)| < `sie_near_round_modulus` the deflection is its expansion to first
    order in (e1, e2) (`_sie_near_round`), which is smooth through e = 0, where the
    position angle arctan2(e2, e1) / 2 of the elliptical formula is undefined.
    """
    domain.check_nonnegative("theta_E", theta_E)
    dtype = jnp.result_type(x)
    e1 = jnp.asarray(e1, dtype=dtype)
    e2 = jnp.asarray(e2, dtype=dtype)
    dx, dy = x - center_x, y - center_y
    near_round = e1 * e1 + e2 * e2 < sie_near_round_modulus(dtype) ** 2
    # The elliptical branch gets a harmless ellipticity where it is not used, so that
    # its gradient there (NaN at e = 0) does not leak through jnp.where.
    ell_x, ell_y = _sie_elliptical(dx, dy, theta_E, jnp.where(near_round, 0.5, e1),
                                   jnp.where(near_round, 0.0, e2))
    round_x, round_y = _sie_near_round(dx, dy, theta_E, e1, e2)
    return jnp.where(near_round, round_x, ell_x), jnp.where(near_round, round_y, ell_y)


def _sie_elliptical(dx: Array, dy: Array, theta_E: Array, e1: Array, e2: Array
                    ) -> tuple[Array, Array]:
    """Keeton's SIE deflection at offsets (dx, dy) from the centre, for |(e1, e2)| > 0."""
    c = jnp.minimum(jnp.sqrt(e1 * e1 + e2 * e2), 0.9999)
    phi = jnp.arctan2(e2, e1) / 2.0
    q = (1.0 - c) / (1.0 + c)
    # sqrt(1 - q^2) = 2 sqrt(c) / (1 + c) exactly; the direct form cancels badly in float32.
    k = 2.0 * jnp.sqrt(c) / (1.0 + c)
    b = theta_E * jnp.sqrt(q)
    s = SIE_CORE_ARCSEC / jnp.sqrt(q)
    xr, yr = _rotate(dx, dy, phi)
    psi = jnp.sqrt(q * q * (s * s + xr * xr) + yr * yr)
    u = xr / (psi + s)
    v = yr / (psi + q * q * s)
    return _rotate(b * jnp.arctan(k * u) / k, b * jnp.arctanh(k * v) / k, -phi)


def _sie_near_round(dx: Array, dy: Array, theta_E: Array, e1: Array, e2: Array
                    ) -> tuple[Array, Array]:
    """The SIE deflection to first order in (e1, e2), at offsets (dx, dy) from the centre.

    With eps = e1 + i e2 and theta the polar angle of (dx, dy), expanding Keeton's
    formula (q = 1 - 2c, sqrt(1 - q^2) = 2 sqrt(c), arctan(k u) / k = u - k^2 u^3 / 3)
    gives alpha_x + i alpha_y = theta_E (e^{i theta} - eps e^{-i theta} / 2
    + conj(eps) e^{3 i theta} / 6) + O(c^2). The unit vector keeps the 1e-10" core of
    the elliptical formula's round limit, so the centre is finite.
    """
    s = SIE_CORE_ARCSEC
    rho = jnp.sqrt(s * s + dx * dx + dy * dy) + s
    cos, sin = dx / rho, dy / rho
    cos3, sin3 = cos * (cos * cos - 3.0 * sin * sin), sin * (3.0 * cos * cos - sin * sin)
    ax = cos - (e1 * cos + e2 * sin) / 2.0 + (e1 * cos3 + e2 * sin3) / 6.0
    ay = sin - (e2 * cos - e1 * sin) / 2.0 + (e1 * sin3 - e2 * cos3) / 6.0
    return theta_E * ax, theta_E * ay


def deflection_shear(x: Array, y: Array, gamma1: Array, gamma2: Array,
                     ra_0: Array = 0.0, dec_0: Array = 0.0) -> tuple[Array, Array]:
    """External shear (lenstronomy SHEAR). Shapes broadcast."""
    dx, dy = x - ra_0, y - dec_0
    return gamma1 * dx + gamma2 * dy, gamma2 * dx - gamma1 * dy


def _point_mass_min_radius_sq(dtype) -> float:
    # lenstronomy floors r at 1e-25; float32 cannot square that, so floor r^2
    # at the smallest normal number instead. Only a pixel centred on a mass sees it.
    return float(jnp.finfo(dtype).tiny)


def deflection_point_mass(x: Array, y: Array, theta_E: Array, center_x: Array = 0.0,
                          center_y: Array = 0.0) -> tuple[Array, Array]:
    """Point mass (lenstronomy POINT_MASS): alpha = theta_E^2 r_vec / r^2. Shapes broadcast."""
    domain.check_nonnegative("theta_E", theta_E)
    dx, dy = x - center_x, y - center_y
    r2 = jnp.maximum(dx * dx + dy * dy, _point_mass_min_radius_sq(dx.dtype))
    scale = theta_E * theta_E / r2
    return scale * dx, scale * dy


def deflection_point_masses(x: Array, y: Array, theta_E: Array, center_x: Array,
                            center_y: Array) -> tuple[Array, Array]:
    """Sum of K point masses on one image plane.

    x, y: (..., H, W) or any shape P; theta_E, center_x, center_y: (K,).
    Returns two arrays of the shape of x. Padding with theta_E = 0 adds nothing,
    which gives static shapes for a variable number of subhaloes.
    """
    domain.check_nonnegative("theta_E", theta_E)
    theta_E_sq = jnp.asarray(theta_E, dtype=x.dtype) ** 2
    masses = (theta_E_sq, jnp.asarray(center_x, x.dtype), jnp.asarray(center_y, x.dtype))
    strategy = point_mass_strategy()
    if strategy == "reduce":
        return _point_masses_reduce(x, y, *masses)
    if strategy == "unroll":
        return _point_masses_unrolled(x, y, *masses)
    return _point_masses_scan(x, y, *masses)


# "unroll" writes the K masses as K terms of one elementwise fusion, so both
# accumulators stay in registers (best on CPU: 1.2-2.2x faster per pair than
# "scan" on 64^2-210^2 grids in chunks of 4 images; the simulator keeps chunks
# under CPU_CHUNK_PIXELS, beyond which this fusion falls out of cache). "scan"
# keeps one (H, W) accumulator in memory and walks the masses (compiles fastest);
# "reduce" writes the sum as one fused reduction over K (best on GPUs, where XLA
# keeps it in registers; a (H, W, K) intermediate thrashes a CPU's cache).
# "auto" picks "unroll" on CPU and "reduce" elsewhere.
POINT_MASS_STRATEGY = "auto"
POINT_MASS_STRATEGIES = ("auto", "unroll", "scan", "reduce")


def point_mass_strategy() -> str:
    """The point-mass summation in use: 'unroll', 'scan' or 'reduce'."""
    if POINT_MASS_STRATEGY not in POINT_MASS_STRATEGIES:
        raise ValueError(f"POINT_MASS_STRATEGY must be one of {POINT_MASS_STRATEGIES}, "
                         f"got {POINT_MASS_STRATEGY!r}")
    if POINT_MASS_STRATEGY != "auto":
        return POINT_MASS_STRATEGY
    return "unroll" if jax.default_backend() == "cpu" else "reduce"


def _add_point_mass(ax, ay, x, y, theta_E_sq, center_x, center_y, r2_min):
    """Accumulators (ax, ay) plus the deflection of one point mass (theta_E^2 given)."""
    dx, dy = x - center_x, y - center_y
    scale = theta_E_sq / jnp.maximum(dx * dx + dy * dy, r2_min)
    return ax + scale * dx, ay + scale * dy


def _point_masses_scan(x, y, theta_E_sq, center_x, center_y):
    r2_min = _point_mass_min_radius_sq(x.dtype)

    def add_one(carry, mass):
        return _add_point_mass(*carry, x, y, *mass, r2_min), None

    zeros = jnp.zeros_like(x)
    (ax, ay), _ = jax.lax.scan(add_one, (zeros, zeros), (theta_E_sq, center_x, center_y))
    return ax, ay


def _point_masses_unrolled(x, y, theta_E_sq, center_x, center_y):
    r2_min = _point_mass_min_radius_sq(x.dtype)
    ax = ay = jnp.zeros_like(x)
    for k in range(theta_E_sq.shape[0]):
        ax, ay = _add_point_mass(ax, ay, x, y, theta_E_sq[k], center_x[k], center_y[k], r2_min)
    # Materialise the sums: otherwise XLA may copy the K-term fusion into each of
    # its consumers and evaluate it several times.
    return jax.lax.optimization_barrier((ax, ay))


def _point_masses_reduce(x, y, theta_E_sq, center_x, center_y):
    dx = x[..., None] - center_x
    dy = y[..., None] - center_y
    scale = theta_E_sq / jnp.maximum(dx * dx + dy * dy, _point_mass_min_radius_sq(x.dtype))
    return jnp.sum(scale * dx, axis=-1), jnp.sum(scale * dy, axis=-1)


# ----------------------------------------------------------------------------
# Equal point masses evenly spaced on a segment (the axion vortex)
# ----------------------------------------------------------------------------

# How `deflection_point_mass_line` sums its masses. "direct": every mass as a
# `deflection_point_masses` term. "euler_maclaurin": the 2 LINE_WINDOW + 1 masses
# nearest each pixel directly, the two runs of masses beyond them in closed form
# (Euler-Maclaurin, below). "auto": "euler_maclaurin" in float32 for more than
# LINE_DIRECT_MAX_POINTS masses, "direct" otherwise (float64 keeps the plain sum,
# which is exact to float64 rounding; the closed form is within 1e-7 of its
# largest deflection).
LINE_SUM = "auto"
LINE_SUMS = ("auto", "direct", "euler_maclaurin")
LINE_WINDOW = 4
# Below this many masses the direct sum is as cheap as the closed form's tails.
LINE_DIRECT_MAX_POINTS = 32

# Midpoint Euler-Maclaurin weights c_m for the terms c_m (g_Q^m - g_P^m), m = 2, 4, 6, 8:
# B_m(1/2) / m!  times  (m - 1)!  (the derivative d^(m-1)/dk^(m-1) 1/(z - k) = (m-1)! g^m).
_EULER_MACLAURIN = ((2, -1.0 / 24.0), (4, 7.0 / 960.0), (6, -31.0 / 8064.0), (8, 127.0 / 30720.0))


def line_sum_method(dtype, num_points: int) -> str:
    """The summation `deflection_point_mass_line` uses: 'direct' or 'euler_maclaurin'."""
    if LINE_SUM not in LINE_SUMS:
        raise ValueError(f"LINE_SUM must be one of {LINE_SUMS}, got {LINE_SUM!r}")
    if num_points <= 2 * LINE_WINDOW + 1:  # the window holds every mass: the sum is direct
        return "direct"
    if LINE_SUM != "auto":
        return LINE_SUM
    small_float = jnp.finfo(dtype).bits <= 32
    return "euler_maclaurin" if small_float and num_points > LINE_DIRECT_MAX_POINTS else "direct"


def line_mass_offsets(half_length: Array, num_points: int, dtype) -> Array:
    """Positions (N,) of the masses along the segment: linspace(-1, 1, N) * half_length."""
    return jnp.linspace(-1.0, 1.0, num_points, dtype=dtype) * half_length


def deflection_point_mass_line(x: Array, y: Array, theta_E: Array, center_x: Array,
                               center_y: Array, angle: Array, half_length: Array,
                               num_points: int) -> tuple[Array, Array]:
    """N equal point masses evenly spaced on a segment: the sum of `deflection_point_mass`.

    Mass k = 0 .. N-1 sits at (center_x, center_y) + t_k (cos angle, sin angle), with
    t = `line_mass_offsets` = linspace(-1, 1, N) * half_length, and has Einstein radius
    theta_E. x, y: any shape P; theta_E, center_x, center_y, angle (rad) and
    half_length (arcsec, > 0): scalars (jax.vmap for one segment per image);
    num_points: a static int >= 2. Returns (alpha_x, alpha_y) of shape P.

    In float32 with many masses (`line_sum_method`) the sum is not taken term by
    term: along the segment the masses are a regular comb, so in units of the
    spacing h, with the pixel at z = a + i b (a along the segment from mass 0, b
    across it), the complex deflection is theta_E^2 / h times the conjugate of
    F(z) = sum_k 1 / (z - k). The LINE_WINDOW masses on each side of the nearest
    one are summed directly; each run of masses beyond them, k = A .. B, is
    log((z - A + 1/2) / (z - B - 1/2)) plus four midpoint Euler-Maclaurin
    corrections, whose error falls as (distance in spacings)^-10. It agrees
    with the direct sum to 1e-7 of the largest deflection (float64 check in
    tests/sim/test_profiles.py; float32 rounding is larger), and 64 model_ii axion
    images take 3.6 instead of 6.2 ms on one CPU core.
    """
    domain.check_positive("half_length", half_length)
    domain.check_nonnegative("theta_E", theta_E)
    if not isinstance(num_points, int) or num_points < 2:
        raise ValueError(f"num_points must be an int >= 2, got {num_points!r}")
    dtype = jnp.result_type(x)
    cos, sin = jnp.cos(angle).astype(dtype), jnp.sin(angle).astype(dtype)
    if line_sum_method(dtype, num_points) == "direct":
        offsets = line_mass_offsets(jnp.asarray(half_length, dtype), num_points, dtype)
        return deflection_point_masses(x, y, jnp.full((num_points,), theta_E, dtype),
                                       center_x + offsets * cos, center_y + offsets * sin)
    dx, dy = x - center_x, y - center_y
    spacing = 2.0 * half_length / (num_points - 1)
    a = (dx * cos + dy * sin + half_length) / spacing  # along, mass k at a = k
    b = (dy * cos - dx * sin) / spacing                 # across
    f_re, f_im = _comb_sum(a, b, num_points)
    scale = jnp.square(theta_E) / spacing
    along, across = scale * f_re, -scale * f_im
    # Materialised, as the unrolled point-mass sum is: without the barrier XLA
    # copies this long computation into each consumer (64 model_ii axion images on
    # one core: 4.4 ms without, 3.6 ms with).
    return jax.lax.optimization_barrier((along * cos - across * sin, along * sin + across * cos))


def _comb_sum(a: Array, b: Array, n: int) -> tuple[Array, Array]:
    """(Re, Im) of sum_{k=0}^{n-1} 1 / (a + i b - k), near masses direct, the rest in closed form."""
    w = LINE_WINDOW
    # The window [k0 - w, k0 + w] around the nearest mass, kept inside [0, n - 1].
    k0 = jnp.clip(jnp.round(a), w, n - 1 - w)
    offset = a - k0
    tiny = jnp.finfo(a.dtype).tiny
    b2 = b * b
    sum_re = sum_inv = 0.0
    for j in range(-w, w + 1):
        u = offset - j
        inv = 1.0 / jnp.maximum(u * u + b2, tiny)
        sum_re = sum_re + u * inv
        sum_inv = sum_inv + inv
    left_re, left_im = _comb_run(a, b, -0.5, k0 - (w + 0.5))
    right_re, right_im = _comb_run(a, b, k0 + (w + 0.5), n - 0.5)
    return sum_re + left_re + right_re, -b * sum_inv + left_im + right_im


def _comb_run(a: Array, b: Array, p, q) -> tuple[Array, Array]:
    """(Re, Im) of sum over the masses k in (p, q) (p, q half-integers) of 1 / (a + i b - k).

    Zero exactly when p == q. The pixel lies outside [p, q] along the segment, so
    (z - p) / (z - q) has a positive real part and its argument is an arctangent.
    """
    gp = _reciprocal(a - p, b)
    gq = _reciprocal(a - q, b)
    # log((z - p) / (z - q)) = log(1 + e), e = (q - p) / (z - q): accurate for small e.
    e_re, e_im = (q - p) * gq[0], (q - p) * gq[1]
    re = 0.5 * jnp.log1p(e_re * (2.0 + e_re) + e_im * e_im)
    im = _arctan(e_im / (1.0 + e_re))
    powers_p, powers_q = {1: gp}, {1: gq}
    for powers in (powers_p, powers_q):
        powers[2] = _multiply(powers[1], powers[1])
        powers[4] = _multiply(powers[2], powers[2])
        powers[6] = _multiply(powers[4], powers[2])
        powers[8] = _multiply(powers[4], powers[4])
    for m, weight in _EULER_MACLAURIN:
        re = re + weight * (powers_q[m][0] - powers_p[m][0])
        im = im + weight * (powers_q[m][1] - powers_p[m][1])
    return re, im


def _reciprocal(re: Array, im: Array) -> tuple[Array, Array]:
    """1 / (re + i im); 0 at 0 (as the point-mass floor gives)."""
    inv = 1.0 / jnp.maximum(re * re + im * im, jnp.finfo(re.dtype).tiny)
    return re * inv, -im * inv


def _multiply(u: tuple[Array, Array], v: tuple[Array, Array]) -> tuple[Array, Array]:
    return u[0] * v[0] - u[1] * v[1], u[0] * v[1] + u[1] * v[0]


def _arctan(t: Array) -> Array:
    """arctan(t): in float32 (Cephes atanf) in ops XLA:CPU vectorises; jnp.arctan in float64.

    XLA:CPU's own atan / atan2 cost ~6-15 ns per element here (they are not
    vectorised); this reduction + polynomial is a few plain operations and one
    division. Within 3 ulp of numpy in float32 (tests/sim/test_profiles.py).
    """
    if jnp.finfo(t.dtype).bits > 32:
        return jnp.arctan(t)
    s = jnp.abs(t)
    big = s > 2.414213562373095    # tan(3 pi / 8)
    mid = s > 0.4142135623730950   # tan(pi / 8)
    numerator = jnp.where(big, -1.0, jnp.where(mid, s - 1.0, s))
    denominator = jnp.where(big, s, jnp.where(mid, s + 1.0, 1.0))
    r = numerator / denominator
    base = jnp.where(big, 0.5 * jnp.pi, jnp.where(mid, 0.25 * jnp.pi, 0.0)).astype(t.dtype)
    z = r * r
    poly = ((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1
    return jnp.copysign(base + r + r * z * poly, t)
