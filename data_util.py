"""Image augmentations for contrastive pretraining, fine-tuning and evaluation.

Modelled on SimCLR's TF2 ``data_util.py`` but without flags: every option is
an argument. Every function works on ONE image at a time (HxWx3, float32 in
[0, 1]) so it can run inside ``tf.data.Dataset.map``.

Randomness is stateless: every random function takes a required ``seed``, a
key of shape [2] (int32 or int64, as ``tf.random.stateless_*`` want), and its
output is a pure function of (image, seed). A function that draws several
times splits its key (``tf.random.experimental.stateless_split``) into a
fixed number of sub-keys, one per draw, whatever options are on, so turning
blur on does not change the crop. The caller derives one key per view (see
data.build_input_fn: from the run's seed, the epoch, the example id and the
view), which makes views reproducible and resumable. ``preprocess_image``
requires the seed for training; evaluation draws nothing.

RandAugment (Model Garden's ``official.vision.ops.augment``) is the one
exception: its ops use stateful TF random ops and take no key, so views
with RandAugment are neither reproducible nor exactly resumable (the other
draws of such a view still follow its key).

Train view (SPEC §6, §7):
  Inception crop (area [crop_area_min, 1], aspect [3/4, 4/3], 100 attempts,
  bicubic resize) -> flip (p=0.5) -> colour jitter (p=0.8; brightness,
  contrast, saturation 0.8s, hue 0.2s, random order, clip after each op)
  -> [RandAugment on the uint8 image, when given] -> grayscale (p=0.2)
  -> Gaussian blur (p=0.5, sigma ~ U(0.1, 2), kernel = side // 10, when
  blur=True) -> clip to [0, 1].

Blur placement: SimCLR applies blur to each batch of views on the
accelerator (``batch_random_blur`` in its model code). Here it is applied PER
IMAGE inside the input pipeline by default, which is what the paper
describes; the distribution of each view is the same (independent draw per
view). With ``defer_blur`` (``--blur_on_device``) the pipeline only draws
each view's σ (`blur_sigma`, the same key and draw) and returns the view
before its blur and final clip; `blur_views` then blurs and clips a whole
batch of views in one depthwise convolution on the accelerator, giving the
host path's views up to float rounding. Both paths use `gaussian_taps`.

Inception-crop lower bound: SimCLR passes ``min_object_covered=0.1`` together
with ``area_range=(0.08, 1)``; for a whole-image box this silently raises the
minimum area to 0.1. Here ``crop_and_resize`` uses
``min_object_covered=area_range[0]`` so the area range is exactly
[crop_area_min, 1] as the SPEC states.
"""
import functools

import tensorflow as tf

CROP_PROPORTION = 0.875  # Standard for ImageNet.


def _split(seed, num):
  """`num` independent sub-keys of the key `seed` (a [num, 2] tensor)."""
  return tf.random.experimental.stateless_split(seed, num=num)


def random_apply(func, p, x, *, seed):
  """Returns func(x) with probability p, else x (one U[0, 1) draw from seed)."""
  return tf.cond(
      tf.less(tf.random.stateless_uniform([], seed, dtype=tf.float32),
              tf.cast(p, tf.float32)),
      lambda: func(x),
      lambda: x)


def random_brightness(image, max_delta, impl='simclrv2', *, seed):
  """Random brightness.

  simclrv2: multiplicative, image * f with f ~ U[max(0, 1 - max_delta),
  1 + max_delta]. simclrv1: additive, tf.image.stateless_random_brightness.
  """
  if impl == 'simclrv2':
    factor = tf.random.stateless_uniform(
        [], seed, tf.maximum(1.0 - max_delta, 0), 1.0 + max_delta)
    return image * factor
  elif impl == 'simclrv1':
    return tf.image.stateless_random_brightness(image, max_delta, seed)
  raise ValueError('Unknown impl {} for random brightness.'.format(impl))


def to_grayscale(image, keep_channels=True):
  """Luma grayscale (0.2989 R + 0.5870 G + 0.1140 B); 3 equal channels if keep_channels."""
  image = tf.image.rgb_to_grayscale(image)
  if keep_channels:
    image = tf.tile(image, [1, 1, 3])
  return image


def _jitter_ops(brightness, contrast, saturation, hue, impl, keys):
  """The four colour-jitter ops as closures, op k drawing from keys[k]; a
  zero strength means identity."""
  def bright(x):
    return x if brightness == 0 else random_brightness(
        x, max_delta=brightness, impl=impl, seed=keys[0])

  def contr(x):
    return x if contrast == 0 else tf.image.stateless_random_contrast(
        x, lower=max(0.0, 1.0 - contrast), upper=1.0 + contrast,
        seed=keys[1])

  def satur(x):
    return x if saturation == 0 else tf.image.stateless_random_saturation(
        x, lower=max(0.0, 1.0 - saturation), upper=1.0 + saturation,
        seed=keys[2])

  def hue_op(x):
    # tf.image.stateless_random_hue requires max_delta <= 0.5.
    return x if hue == 0 else tf.image.stateless_random_hue(
        x, max_delta=min(hue, 0.5), seed=keys[3])

  return [bright, contr, satur, hue_op]


def color_jitter_rand(image, brightness=0, contrast=0, saturation=0, hue=0,
                      impl='simclrv2', *, seed):
  """The four jitter ops in a uniformly random order; clip after each.

  The order is the argsort of 4 uniform draws (a uniform permutation).
  """
  keys = _split(seed, 5)
  ops = _jitter_ops(brightness, contrast, saturation, hue, impl, keys[1:])
  perm = tf.argsort(tf.random.stateless_uniform([4], keys[0]))
  for i in range(4):
    image = tf.switch_case(
        perm[i], [functools.partial(op, image) for op in ops])
    image = tf.clip_by_value(image, 0., 1.)
  return image


def color_jitter(image, strength, impl='simclrv2', *, seed):
  """Colour jitter of strength s: brightness/contrast/saturation 0.8s, hue 0.2s,
  in a random order (SPEC §6)."""
  brightness = 0.8 * strength
  contrast = 0.8 * strength
  saturation = 0.8 * strength
  hue = 0.2 * strength
  return color_jitter_rand(image, brightness, contrast, saturation, hue,
                           impl=impl, seed=seed)


def apply_randaugment(image, randaugment):
  """Applies a uint8 RandAugment to a float [0, 1] image; returns float [0, 1].

  `randaugment` is a callable on a uint8 HxWx3 tensor, or an object with a
  `distort` method (Model Garden's `RandAugment`, which is not callable).
  """
  fn = randaugment.distort if hasattr(randaugment, 'distort') else randaugment
  image_u8 = tf.image.convert_image_dtype(image, tf.uint8, saturate=True)
  out = fn(image_u8)
  return tf.image.convert_image_dtype(out, tf.float32)


def make_randaugment(num_layers=2, magnitude=7, **kwargs):
  """Model Garden's RandAugment (n=num_layers, m=magnitude), as used by FNC.

  Its `distort` expects a uint8 (or [0, 255]) HxWx3 image; pass the instance
  as `randaugment=` to the preprocessing functions, which handle conversion.
  Extra kwargs (cutout_const, translate_const, ...) go to the constructor.
  Its draws are stateful (no key): views using it are not reproducible.
  """
  from official.vision.ops import augment  # pylint: disable=g-import-not-at-top
  return augment.RandAugment(num_layers=num_layers, magnitude=magnitude,
                             **kwargs)


def random_color_jitter(image, p=1.0, strength=1.0, impl='simclrv2',
                        randaugment=None, *, seed):
  """With prob p: colour jitter (p=0.8) -> [randaugment] -> grayscale (p=0.2)."""
  keys = _split(seed, 4)

  def _transform(image):
    jitter = functools.partial(color_jitter, strength=strength, impl=impl,
                               seed=keys[1])
    image = random_apply(jitter, p=0.8, x=image, seed=keys[2])
    if randaugment is not None:
      image = apply_randaugment(image, randaugment)
    return random_apply(to_grayscale, p=0.2, x=image, seed=keys[3])
  return random_apply(_transform, p=p, x=image, seed=keys[0])


def _compute_crop_shape(image_height, image_width, aspect_ratio,
                        crop_proportion):
  """Largest centred crop of aspect `aspect_ratio` (w/h), scaled by crop_proportion."""
  h = tf.cast(image_height, tf.float32)
  w = tf.cast(image_width, tf.float32)

  def _requested_wider_than_image():
    crop_h = tf.cast(tf.math.rint(crop_proportion / aspect_ratio * w), tf.int32)
    crop_w = tf.cast(tf.math.rint(crop_proportion * w), tf.int32)
    return crop_h, crop_w

  def _image_wider_than_requested():
    crop_h = tf.cast(tf.math.rint(crop_proportion * h), tf.int32)
    crop_w = tf.cast(tf.math.rint(crop_proportion * aspect_ratio * h), tf.int32)
    return crop_h, crop_w

  return tf.cond(aspect_ratio > w / h, _requested_wider_than_image,
                 _image_wider_than_requested)


def _resize(image, height, width):
  return tf.image.resize([image], [height, width],
                         method=tf.image.ResizeMethod.BICUBIC)[0]


def _resize_if_needed(image, height, width):
  """Bicubic resize to [height, width] unless the image already has that size."""
  shape = tf.shape(image)
  same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))
  return tf.cond(same, lambda: tf.identity(image),
                 lambda: _resize(image, height, width))


def center_crop(image, height, width, crop_proportion=CROP_PROPORTION):
  """Centre crop of `crop_proportion` of the side (aspect height:width), bicubic resize."""
  shape = tf.shape(image)
  image_height, image_width = shape[0], shape[1]
  crop_height, crop_width = _compute_crop_shape(
      image_height, image_width, width / height, crop_proportion)
  offset_height = ((image_height - crop_height) + 1) // 2
  offset_width = ((image_width - crop_width) + 1) // 2
  image = tf.image.crop_to_bounding_box(image, offset_height, offset_width,
                                        crop_height, crop_width)
  return _resize(image, height, width)


def distorted_bounding_box_crop(image, bbox=None, min_object_covered=0.1,
                                aspect_ratio_range=(0.75, 1.33),
                                area_range=(0.05, 1.0), max_attempts=100,
                                return_box=False, *, seed):
  """Random crop via tf.image.stateless_sample_distorted_bounding_box
  (Inception style).

  Args:
    image: HxWxC tensor.
    bbox: [1, N, 4] boxes (ymin, xmin, ymax, xmax) in [0, 1]; None = whole image.
    min_object_covered: the crop must cover at least this fraction of bbox.
    aspect_ratio_range: allowed crop width / height.
    area_range: allowed crop area as a fraction of the image area.
    max_attempts: samples tried before falling back to the whole image.
    return_box: also return (offset_y, offset_x, crop_height, crop_width).
    seed: [2] key of the draw.
  Returns:
    The cropped image (and the box when return_box).
  """
  if bbox is None:
    bbox = tf.constant([0.0, 0.0, 1.0, 1.0], dtype=tf.float32, shape=[1, 1, 4])
  shape = tf.shape(image)
  begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, bounding_boxes=bbox, seed=seed,
      min_object_covered=min_object_covered,
      aspect_ratio_range=aspect_ratio_range, area_range=area_range,
      max_attempts=max_attempts, use_image_if_no_bounding_boxes=True)
  offset_y, offset_x, _ = tf.unstack(begin)
  target_height, target_width, _ = tf.unstack(size)
  image = tf.image.crop_to_bounding_box(image, offset_y, offset_x,
                                        target_height, target_width)
  if return_box:
    return image, (offset_y, offset_x, target_height, target_width)
  return image


def crop_and_resize(image, height, width, area_range=(0.08, 1.0),
                    max_attempts=100, return_box=False, *, seed):
  """Inception crop (area area_range, aspect [3/4, 4/3]·width/height), bicubic resize.

  With return_box, also returns the crop box (offset_y, offset_x, h, w).
  """
  aspect_ratio = width / height
  image, box = distorted_bounding_box_crop(
      image,
      min_object_covered=area_range[0],
      aspect_ratio_range=(3. / 4 * aspect_ratio, 4. / 3. * aspect_ratio),
      area_range=area_range,
      max_attempts=max_attempts,
      return_box=True, seed=seed)
  image = _resize(image, height, width)
  if return_box:
    return image, box
  return image


def gaussian_taps(kernel_size, sigma):
  """float32 [..., 2r + 1] Gaussian taps, r = kernel_size // 2, one row per
  element of `sigma` (any shape): k(x) ∝ exp(-x² / (2σ²)) for x in [-r, r],
  normalised to sum 1; σ = 0 gives the identity (1 at the centre)."""
  radius = int(kernel_size / 2)
  x = tf.cast(tf.range(-radius, radius + 1), tf.float32)
  sigma = tf.cast(sigma, tf.float32)[..., tf.newaxis]
  blurred = sigma > 0
  sigma = tf.where(blurred, sigma, tf.ones_like(sigma))
  taps = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
  taps /= tf.reduce_sum(taps, axis=-1, keepdims=True)
  return tf.where(blurred, taps, tf.cast(tf.equal(x, 0), tf.float32))


def _separable_blur(images, taps, padding):
  """[n, H, W, C] images, channel c convolved with taps[c] ([C, k])
  horizontally then vertically (one depthwise convolution each)."""
  taps = tf.transpose(taps)  # [k, C]
  blurred = tf.nn.depthwise_conv2d(images, taps[tf.newaxis, :, :, tf.newaxis],
                                   strides=[1, 1, 1, 1], padding=padding)
  return tf.nn.depthwise_conv2d(blurred, taps[:, tf.newaxis, :, tf.newaxis],
                                strides=[1, 1, 1, 1], padding=padding)


def gaussian_blur(image, kernel_size, sigma, padding='SAME'):
  """Separable depthwise Gaussian blur of an HxWxC (or NxHxWxC) image with
  the `gaussian_taps` of the scalar `sigma`, applied horizontally then
  vertically to each channel. 'SAME' zero-pads (as SimCLR does)."""
  taps = gaussian_taps(kernel_size, sigma)
  num_channels = tf.shape(image)[-1]
  taps = tf.tile(taps[tf.newaxis], [num_channels, 1])
  expand_batch_dim = image.shape.ndims == 3
  if expand_batch_dim:
    image = tf.expand_dims(image, axis=0)
  blurred = _separable_blur(image, taps, padding)
  if expand_batch_dim:
    blurred = tf.squeeze(blurred, axis=0)
  return blurred


def blur_sigma(p=0.5, *, seed):
  """The blur draw of a view: σ ~ U(0.1, 2.0) with probability p, else 0
  (not blurred). The one draw of `random_blur` and of --blur_on_device."""
  keys = _split(seed, 2)
  applies = tf.less(tf.random.stateless_uniform([], keys[0], dtype=tf.float32),
                    tf.cast(p, tf.float32))
  sigma = tf.random.stateless_uniform([], keys[1], 0.1, 2.0, dtype=tf.float32)
  return tf.where(applies, sigma, 0.0)


def random_blur(image, height, width, p=0.5, *, seed):
  """With prob p, Gaussian blur with σ ~ U(0.1, 2.0) and kernel height // 10
  (the σ of `blur_sigma`)."""
  del width
  sigma = blur_sigma(p, seed=seed)
  return tf.cond(sigma > 0,
                 lambda: gaussian_blur(image, kernel_size=height // 10,
                                       sigma=sigma, padding='SAME'),
                 lambda: image)


def blur_views(images, sigmas):
  """Finishes deferred-blur views (--blur_on_device): view v of image i of
  `images` (float32 [b, H, W, 3V], channels 3v..3v+2) blurred with
  sigmas[i, v] ([b, V]; 0 = not blurred), kernel H // 10 as `random_blur`,
  then clipped to [0, 1], as `preprocess_for_train` would have.

  All b·3V channels go through one separable depthwise convolution
  ([1, H, W, b·3V], per-channel taps), so the cost does not grow with the
  number of distinct σ.
  """
  images = tf.convert_to_tensor(images, tf.float32)
  height = images.shape[1]
  if height is None:
    raise ValueError('blur_views needs a static image height (the kernel '
                     'size is height // 10).')
  shape = tf.shape(images)
  channels = shape[0] * shape[3]
  taps = tf.reshape(  # [b, 3V, k] -> one row per channel of `stacked`
      gaussian_taps(height // 10, tf.repeat(sigmas, 3, axis=1)),
      [channels, -1])
  stacked = tf.reshape(tf.transpose(images, [1, 2, 0, 3]),
                       [1, shape[1], shape[2], channels])
  blurred = _separable_blur(stacked, taps, 'SAME')
  blurred = tf.transpose(
      tf.reshape(blurred, [shape[1], shape[2], shape[0], shape[3]]),
      [2, 0, 1, 3])
  return tf.clip_by_value(blurred, 0., 1.)


def finish_views(batch):
  """`batch` with its views finished: blurred by `blur_views` when it
  carries 'blur_sigma' (--blur_on_device, which it then drops), else as
  it is. Run on the accelerator at the start of each training step, and on
  the host wherever views are shown."""
  if 'blur_sigma' not in batch:
    return batch
  batch = dict(batch)
  batch['image'] = blur_views(batch['image'], batch.pop('blur_sigma'))
  return batch


def preprocess_for_train(image, height, width, color_distort=True, crop=True,
                         flip=True, blur=False, color_jitter_strength=1.0,
                         crop_area_min=0.08, impl='simclrv2',
                         randaugment=None, defer_blur=False, *, seed):
  """The training view of a float [0, 1] image keyed by `seed` ([2] int
  tensor; the same key gives the same view, see module docstring).

  Fine-tuning uses color_distort=False (crop + flip only; the crop keeps
  the area range [crop_area_min, 1]). `randaugment`
  (callable on uint8, or Model Garden RandAugment) runs after colour jitter
  and before grayscale; without colour distortion it runs after the flip.
  Returns a float32 [height, width, 3] tensor in [0, 1]; with blur and
  `defer_blur`, (the view before its blur and final clip, its
  `blur_sigma`), which `blur_views` finishes.
  """
  crop_key, flip_key, color_key, blur_key = tf.unstack(_split(seed, 4))
  if crop:
    image = crop_and_resize(image, height, width,
                            area_range=(crop_area_min, 1.0), seed=crop_key)
  else:
    image = _resize_if_needed(image, height, width)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_key)
  if color_distort:
    image = random_color_jitter(image, strength=color_jitter_strength,
                                impl=impl, randaugment=randaugment,
                                seed=color_key)
  elif randaugment is not None:
    image = apply_randaugment(image, randaugment)
  if blur and defer_blur:
    return (tf.reshape(image, [height, width, 3]),
            blur_sigma(p=0.5, seed=blur_key))
  if blur:
    image = random_blur(image, height, width, p=0.5, seed=blur_key)
  image = tf.reshape(image, [height, width, 3])
  return tf.clip_by_value(image, 0., 1.)


def preprocess_for_eval(image, height, width, crop=True):
  """Centre crop 0.875 + bicubic resize (crop=True), else only resize if needed."""
  if crop:
    image = center_crop(image, height, width, crop_proportion=CROP_PROPORTION)
  else:
    image = _resize_if_needed(image, height, width)
  image = tf.reshape(image, [height, width, 3])
  return tf.clip_by_value(image, 0., 1.)


def preprocess_image(image, height, width, is_training=False,
                     color_distort=True, test_crop=True, *,
                     color_jitter_strength=1.0, use_blur=False,
                     crop_area_min=0.08, randaugment=None, seed=None,
                     defer_blur=False):
  """Converts uint8 to float [0, 1] and dispatches to train or eval preprocessing.

  Training requires `seed`, the [2] key of the view (ValueError without);
  eval ignores it. test_crop=False skips the eval centre crop (used when
  image_size <= 32). `defer_blur`: see `preprocess_for_train`.
  """
  image = tf.image.convert_image_dtype(image, dtype=tf.float32)
  if is_training:
    if seed is None:
      raise ValueError('Training preprocessing needs seed=, the [2] key of '
                       'the view.')
    return preprocess_for_train(
        image, height, width, color_distort=color_distort,
        blur=use_blur, color_jitter_strength=color_jitter_strength,
        crop_area_min=crop_area_min, randaugment=randaugment,
        defer_blur=defer_blur, seed=seed)
  return preprocess_for_eval(image, height, width, crop=test_crop)
