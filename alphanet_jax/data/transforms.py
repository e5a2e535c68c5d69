"""Per-image preprocessing in TF ops: decode, crops, resizes, flips, normalisation (SPEC §6.2, 8).

Every random choice comes from a stateless seed passed in by the caller, so an image's
augmentation is a pure function of (its bytes, its seed). PIL/torchvision arithmetic is followed
where it decides which pixels are kept (crop windows, output sizes, centre offsets); resizing uses
`tf.image.resize(..., "bicubic", antialias=True)`, the closest TF match to PIL's bicubic (Keys
a = -0.5, kernel widened when downsampling), rounded back to uint8 as PIL does.
"""

from __future__ import annotations

import math

import tensorflow as tf

# SPEC §6.2: ToTensor (/255) then Normalize with these (ImageNet statistics, in 0-255 units).
MEAN_RGB = (123.675, 116.28, 103.53)
STDDEV_RGB = (58.395, 57.12, 57.375)


def safe_decode(image_bytes: tf.Tensor, decode_fn, size: int):
  """Runs `decode_fn(image_bytes)` and reports failure instead of raising.

  A corrupt or truncated image makes TF's decoders raise inside the input pipeline, which would
  end the whole stream. Running the decode in a one-element dataset with `ignore_errors` turns
  the error into an empty result, replaced here by a black image and ok = False.

  Args:
    image_bytes: scalar string tensor.
    decode_fn: bytes -> uint8 [size, size, 3] image.
    size: output height and width.

  Returns:
    (image, ok): uint8 [size, size, 3] (black on failure) and a bool scalar.
  """
  attempt = tf.data.Dataset.from_tensors(image_bytes).map(
      lambda b: (decode_fn(b), tf.constant(True))).ignore_errors()
  fallback = tf.data.Dataset.from_tensors(
      (tf.zeros([size, size, 3], tf.uint8), tf.constant(False)))
  # The nested pipeline must run inline on the calling thread: an injected prefetch or a
  # parallelised map would wait for threads of the outer pipeline's (possibly small) pool.
  options = tf.data.Options()
  options.experimental_optimization.apply_default_optimizations = False
  options.experimental_optimization.map_parallelization = False
  options.experimental_optimization.inject_prefetch = False
  options.autotune.enabled = False
  image, ok = attempt.concatenate(fallback).take(1).with_options(
      options).get_single_element()
  return tf.ensure_shape(image, [size, size, 3]), ok


def decode_rgb(image_bytes: tf.Tensor) -> tf.Tensor:
  """Any of JPEG/PNG/GIF/BMP (first frame) -> uint8 [H, W, 3]; grey is replicated."""
  return tf.io.decode_image(image_bytes, channels=3, expand_animations=False)


def random_resized_crop_window(height, width, seed, scale=(0.08, 1.0),
                               ratio=(3.0 / 4.0, 4.0 / 3.0), attempts=10):
  """torchvision RandomResizedCrop.get_params with stateless draws.

  Up to `attempts` windows of area fraction U(scale) and log-uniform aspect ratio in `ratio`;
  the first that fits wins, else the centre crop clamped to `ratio` (the original's fallback).

  Args:
    height: int32 scalar image height.
    width: int32 scalar image width.
    seed: stateless seed [2].
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio (width / height).
    attempts: number of tries before the fallback.

  Returns:
    int32 [4]: (top, left, crop_height, crop_width).
  """
  h_f = tf.cast(height, tf.float32)
  w_f = tf.cast(width, tf.float32)
  draws = tf.random.stateless_uniform([4, attempts], seed)
  area = h_f * w_f * (scale[0] + (scale[1] - scale[0]) * draws[0])
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  aspect = tf.exp(log_lo + (log_hi - log_lo) * draws[1])
  # Python's round() and tf.round both round half to even.
  crop_w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)
  crop_h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
  # randint(0, n - c + 1): uniform over the valid top-left corners.
  top = tf.cast(tf.floor(draws[2] * tf.cast(height - crop_h + 1, tf.float32)), tf.int32)
  left = tf.cast(tf.floor(draws[3] * tf.cast(width - crop_w + 1, tf.float32)), tf.int32)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

  in_ratio = w_f / h_f
  fb_w = tf.where(in_ratio < ratio[0], width,
                  tf.where(in_ratio > ratio[1], tf.cast(tf.round(h_f * ratio[1]), tf.int32),
                           width))
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w_f / ratio[0]), tf.int32), height)
  fallback = tf.stack([(height - fb_h) // 2, (width - fb_w) // 2, fb_h, fb_w])
  chosen = tf.stack([top[first], left[first], crop_h[first], crop_w[first]])
  return tf.where(tf.reduce_any(fits), chosen, fallback)


def decode_and_random_crop(image_bytes, seed, scale, ratio):
  """Decodes only the random crop window when the bytes are JPEG (the ImageNet case)."""

  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    window = random_resized_crop_window(shape[0], shape[1], seed, scale, ratio)
    return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

  def other():
    image = decode_rgb(image_bytes)
    shape = tf.shape(image)
    top, left, h, w = tf.unstack(random_resized_crop_window(shape[0], shape[1], seed, scale,
                                                            ratio))
    return image[top:top + h, left:left + w]

  return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def resize_uint8(image, size):
  """Bicubic resize to `size` (h, w), rounded and clipped to uint8 like PIL."""
  out = tf.image.resize(tf.cast(image, tf.float32), size, method="bicubic", antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def random_flip(image, seed):
  """Horizontal flip with probability 1/2."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def pad_and_random_crop(image, seed, pad):
  """Zero-pads by `pad` pixels and crops back to the original size: a random translation."""
  if pad <= 0:
    return image
  shape = tf.shape(image)
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  offsets = tf.random.stateless_uniform([2], seed, 0, 2 * pad + 1, dtype=tf.int32)
  return padded[offsets[0]:offsets[0] + shape[0], offsets[1]:offsets[1] + shape[1]]


def resize_shorter_and_center_crop(image, resize_size, crop_size):
  """torchvision Resize(resize_size) + CenterCrop(crop_size) (SPEC §8.3)."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  # torchvision: the long side is int(size * long / short), truncated.
  new_long = tf.cast(tf.math.floor(resize_size * tf.cast(long, tf.float64)
                                   / tf.cast(short, tf.float64)), tf.int32)
  new_h = tf.where(h <= w, resize_size, new_long)
  new_w = tf.where(h <= w, new_long, resize_size)
  resized = tf.cond(
      (new_h == h) & (new_w == w), lambda: image, lambda: resize_uint8(image, [new_h, new_w]))
  # CenterCrop: offsets int(round((n - crop) / 2)), round half to even as Python's round.
  top = tf.cast(tf.round(tf.cast(new_h - crop_size, tf.float64) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - crop_size, tf.float64) / 2.0), tf.int32)
  crop = resized[top:top + crop_size, left:left + crop_size]
  return tf.ensure_shape(crop, [crop_size, crop_size, 3])


def normalize(image, dtype=tf.float32):
  """ToTensor then Normalize, in the original's order: x/255, minus mean/255, over std/255."""
  mean = tf.constant([m / 255.0 for m in MEAN_RGB], tf.float32)
  std = tf.constant([s / 255.0 for s in STDDEV_RGB], tf.float32)
  out = (tf.cast(image, tf.float32) / 255.0 - mean) / std
  return tf.cast(out, dtype)
