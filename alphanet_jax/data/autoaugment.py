"""AutoAugment "v0" in TensorFlow ops, with stateless randomness (SPEC §6.2).

The original applies timm-style AutoAugment to PIL images. Every op here works on a uint8
HxWx3 tensor and reproduces the PIL arithmetic (LUTs, truncating blends, ITU-R 601-2 luma in
16-bit fixed point, PIL's pixel-centre convention for affine maps), so the ops agree with PIL
bit for bit or, for geometric ops, everywhere except a one-pixel band at the image border.

Deviation from the original: geometric ops (shear, rotate, translate) draw their resampling
filter from {nearest, bilinear} with equal probability. The original draws from {nearest,
bilinear, bicubic}, but TF's `ImageProjectiveTransformV3` has no bicubic mode.

Per image: one of the 25 sub-policies uniformly; each of its two ops is applied with its
probability p, at a magnitude m' ~ N(m, 0.5) clipped to [0, 10]; signed arguments flip sign with
probability 1/2; geometric ops fill with (124, 116, 104).
"""

from __future__ import annotations

import math

import tensorflow as tf

FILL_COLOR = (124, 116, 104)
MAGNITUDE_STD = 0.5
MAX_MAGNITUDE = 10.0

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateYRel")
_OP_INDEX = {name: i for i, name in enumerate(OPS)}

# SPEC §6.2: the 25 sub-policies of the EfficientNet-TPU ImageNet policy, as (op, p, m) pairs.
POLICY_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateYRel", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)


# ---------------------------------------------------------------------------------------------
# Pixel ops. All take and return uint8 [H, W, 3].
# ---------------------------------------------------------------------------------------------


def _apply_lut(image: tf.Tensor, lut: tf.Tensor) -> tf.Tensor:
  """Maps each channel through its own 256-entry table; lut is [3, 256] (or [256])."""
  if lut.shape.rank == 1:
    return tf.gather(lut, tf.cast(image, tf.int32))
  channels = [tf.gather(lut[c], tf.cast(image[..., c], tf.int32)) for c in range(3)]
  return tf.stack(channels, axis=-1)


def invert(image):
  return 255 - image


def posterize(image, bits):
  """Keeps the `bits` most significant bits; bits >= 8 is the identity (as the original)."""
  bits = tf.cast(bits, tf.int32)
  shift = tf.maximum(8 - bits, 0)
  mask = tf.cast(tf.bitwise.bitwise_and(tf.bitwise.invert(2 ** shift - 1), 255), tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def solarize(image, threshold):
  """PIL ImageOps.solarize: inverts every pixel >= threshold."""
  threshold = tf.cast(threshold, tf.int32)
  pixels = tf.cast(image, tf.int32)
  return tf.cast(tf.where(pixels < threshold, pixels, 255 - pixels), tf.uint8)


def solarize_add(image, addition, threshold=128):
  """Adds `addition` to pixels below `threshold`, saturating at 255."""
  pixels = tf.cast(image, tf.int32)
  added = tf.minimum(pixels + tf.cast(addition, tf.int32), 255)
  return tf.cast(tf.where(pixels < threshold, added, pixels), tf.uint8)


def autocontrast(image):
  """PIL ImageOps.autocontrast (cutoff 0): per channel, stretch [lo, hi] to [0, 255]."""
  pixels = tf.reshape(tf.cast(image, tf.float64), [-1, 3])
  lo = tf.reduce_min(pixels, axis=0)[:, None]
  hi = tf.reduce_max(pixels, axis=0)[:, None]
  # PIL computes the table in double precision and truncates with int(); float64 keeps
  # i*scale+offset exact at the top of the range (255.0, not 254.99...).
  scale = 255.0 / tf.maximum(hi - lo, 1.0)
  offset = -lo * scale
  values = tf.range(256, dtype=tf.float64)[None, :]
  # int() truncates toward zero and floor() rounds down: they differ only below 0, clipped away.
  stretched = tf.clip_by_value(tf.math.floor(values * scale + offset), 0.0, 255.0)
  lut = tf.where(hi > lo, stretched, values)
  return _apply_lut(image, tf.cast(lut, tf.uint8))


def equalize(image):
  """PIL ImageOps.equalize: per-channel histogram equalisation with PIL's step rule."""
  luts = []
  for c in range(3):
    values = tf.reshape(tf.cast(image[..., c], tf.int32), [-1])
    hist = tf.math.bincount(values, minlength=256, maxlength=256, dtype=tf.int32)
    total = tf.reduce_sum(hist)
    last_value = tf.reduce_max(values)
    # PIL: step = (sum of the non-zero bins minus the last non-zero one) // 256.
    step = (total - hist[last_value]) // 256
    safe_step = tf.maximum(step, 1)
    before = tf.cumsum(hist, exclusive=True)
    lut = tf.clip_by_value((safe_step // 2 + before) // safe_step, 0, 255)
    luts.append(tf.where(step > 0, lut, tf.range(256)))
  return _apply_lut(image, tf.cast(tf.stack(luts), tf.uint8))


def _blend(degenerate, image, factor):
  """PIL Image.blend(degenerate, image, factor): float32 maths, clipped, truncated."""
  degenerate = tf.cast(degenerate, tf.float32)
  mixed = degenerate + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - degenerate)
  return tf.cast(tf.clip_by_value(mixed, 0.0, 255.0), tf.uint8)


def grayscale(image):
  """PIL convert('L'): ITU-R 601-2 luma in 16-bit fixed point, rounded."""
  pixels = tf.cast(image, tf.int32)
  luma = (pixels[..., 0] * 19595 + pixels[..., 1] * 38470 + pixels[..., 2] * 7471 + 0x8000)
  return tf.cast(tf.bitwise.right_shift(luma, 16), tf.uint8)


def color(image, factor):
  """PIL ImageEnhance.Color: blend with the grey version."""
  grey = tf.repeat(grayscale(image)[..., None], 3, axis=-1)
  return _blend(grey, image, factor)


def contrast(image, factor):
  """PIL ImageEnhance.Contrast: blend with a constant image at the rounded mean luma."""
  mean = tf.reduce_mean(tf.cast(grayscale(image), tf.float64))
  degenerate = tf.fill(tf.shape(image), tf.cast(tf.math.floor(mean + 0.5), tf.uint8))
  return _blend(degenerate, image, factor)


def brightness(image, factor):
  """PIL ImageEnhance.Brightness: blend with black."""
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
  """PIL ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH, whose border pixels are copied."""
  pixels = tf.cast(image, tf.float32)
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(pixels[None], kernel, [1, 1, 1, 1], "VALID")[0]
  smooth = tf.clip_by_value(tf.math.floor(smooth + 0.5), 0.0, 255.0)
  # Paste the smoothed interior into the original so the 1-pixel border stays untouched.
  shape = tf.shape(image)
  interior = tf.pad(tf.ones(shape[:2] - 2, tf.bool), [[1, 1], [1, 1]])
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(interior[..., None], smooth, pixels)
  return _blend(degenerate, image, factor)


# ---------------------------------------------------------------------------------------------
# Geometric ops.
# ---------------------------------------------------------------------------------------------


def affine(image, matrix, interpolation="BILINEAR", fill=FILL_COLOR):
  """PIL Image.transform(AFFINE, matrix) with a per-channel fill colour.

  Args:
    image: uint8 [H, W, 3].
    matrix: (a, b, c, d, e, f): output pixel (x, y) samples the input at (a x + b y + c,
      d x + e y + f), in PIL's convention where pixel centres sit at half-integers.
    interpolation: "NEAREST" or "BILINEAR".
    fill: colour of the area mapped from outside the input.

  Returns:
    The transformed uint8 image.
  """
  a, b, c, d, e, f = [tf.cast(v, tf.float32) for v in matrix]
  # TF puts pixel centres at integers: shift in by 0.5 before the map, out by 0.5 after.
  tf_matrix = tf.stack([a, b, c + 0.5 * (a + b) - 0.5,
                        d, e, f + 0.5 * (d + e) - 0.5, 0.0, 0.0])[None]
  fill = tf.constant(fill, tf.float32)
  # The op fills with one scalar: transform (image - fill) with fill 0, then add fill back.
  # Interpolation is linear, so this equals filling each channel with its own colour.
  shifted = tf.cast(image, tf.float32)[None] - fill
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=shifted, transforms=tf_matrix, output_shape=tf.shape(image)[:2],
      fill_value=0.0, interpolation=interpolation, fill_mode="CONSTANT")[0]
  return tf.cast(tf.clip_by_value(tf.math.floor(out + fill + 0.5), 0.0, 255.0), tf.uint8)


def _random_affine(image, matrix, use_nearest):
  return tf.cond(use_nearest,
                 lambda: affine(image, matrix, "NEAREST"),
                 lambda: affine(image, matrix, "BILINEAR"))


def shear_x_matrix(factor):
  return (1.0, factor, 0.0, 0.0, 1.0, 0.0)


def shear_y_matrix(factor):
  return (1.0, 0.0, 0.0, factor, 1.0, 0.0)


def translate_y_matrix(pixels):
  return (1.0, 0.0, 0.0, 0.0, 1.0, pixels)


def rotate_matrix(degrees, height, width):
  """PIL Image.rotate(degrees) (counter-clockwise about the centre, same canvas)."""
  angle = -tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  cx = tf.cast(width, tf.float32) / 2.0
  cy = tf.cast(height, tf.float32) / 2.0
  return (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


# ---------------------------------------------------------------------------------------------
# Policy.
# ---------------------------------------------------------------------------------------------


def apply_op(image, op_index, magnitude, negate, use_nearest):
  """Applies OPS[op_index] at magnitude m' (SPEC §6.2 argument table).

  Args:
    image: uint8 [H, W, 3].
    op_index: int32 scalar index into OPS.
    magnitude: float32 scalar m' in [0, 10].
    negate: bool scalar, flips the sign of signed arguments.
    use_nearest: bool scalar, nearest instead of bilinear for geometric ops.

  Returns:
    The transformed uint8 image.
  """
  op_index = tf.convert_to_tensor(op_index, tf.int32)
  level = tf.convert_to_tensor(magnitude, tf.float32) / MAX_MAGNITUDE
  sign = tf.where(negate, -1.0, 1.0)
  enhance = 0.1 + 1.8 * level
  height, width = tf.shape(image)[0], tf.shape(image)[1]

  branches = {
      "AutoContrast": lambda: autocontrast(image),
      "Equalize": lambda: equalize(image),
      "Invert": lambda: invert(image),
      "Rotate": lambda: _random_affine(
          image, rotate_matrix(sign * 30.0 * level, height, width), use_nearest),
      "Posterize": lambda: posterize(image, tf.cast(tf.floor(4.0 * level), tf.int32) + 4),
      "Solarize": lambda: solarize(image, tf.cast(tf.floor(256.0 * level), tf.int32)),
      "SolarizeAdd": lambda: solarize_add(image, tf.cast(tf.floor(110.0 * level), tf.int32)),
      "Color": lambda: color(image, enhance),
      "Contrast": lambda: contrast(image, enhance),
      "Brightness": lambda: brightness(image, enhance),
      "Sharpness": lambda: sharpness(image, enhance),
      "ShearX": lambda: _random_affine(image, shear_x_matrix(sign * 0.3 * level), use_nearest),
      "ShearY": lambda: _random_affine(image, shear_y_matrix(sign * 0.3 * level), use_nearest),
      "TranslateYRel": lambda: _random_affine(
          image, translate_y_matrix(sign * 0.45 * level * tf.cast(height, tf.float32)),
          use_nearest),
  }
  out = tf.switch_case(op_index, [branches[name] for name in OPS])
  return tf.ensure_shape(out, image.shape)


def _policy_tables(policy):
  ops = tf.constant([[_OP_INDEX[op] for op, _, _ in sub] for sub in policy], tf.int32)
  probs = tf.constant([[p for _, p, _ in sub] for sub in policy], tf.float32)
  mags = tf.constant([[m for _, _, m in sub] for sub in policy], tf.float32)
  return ops, probs, mags


def autoaugment(image, seed, policy=POLICY_V0, magnitude_std=MAGNITUDE_STD):
  """Applies one random sub-policy of `policy` to a uint8 image.

  Args:
    image: uint8 [H, W, 3].
    seed: int32/int64 [2] stateless seed; the result is a pure function of (image, seed).
    policy: sequence of sub-policies, each a sequence of (op name, probability, magnitude).
    magnitude_std: standard deviation of the Gaussian magnitude noise.

  Returns:
    The augmented uint8 image.
  """
  ops, probs, mags = _policy_tables(policy)
  num_ops = len(policy[0])
  keys = tf.random.experimental.stateless_split(seed, num=3)
  choice = tf.random.stateless_uniform([], keys[0], 0, len(policy), dtype=tf.int32)
  # One row of draws per op slot: apply?, sign, filter; and the magnitude noise.
  uniforms = tf.random.stateless_uniform([num_ops, 3], keys[1])
  noise = tf.random.stateless_normal([num_ops], keys[2])
  for slot in range(num_ops):
    magnitude = tf.clip_by_value(mags[choice, slot] + magnitude_std * noise[slot],
                                 0.0, MAX_MAGNITUDE)
    apply = uniforms[slot, 0] < probs[choice, slot]
    negate = uniforms[slot, 1] < 0.5
    use_nearest = uniforms[slot, 2] < 0.5
    image = tf.cond(
        apply,
        lambda im=image, s=slot, m=magnitude, n=negate, u=use_nearest: apply_op(
            im, ops[choice, s], m, n, u),
        lambda im=image: im)
  return image
