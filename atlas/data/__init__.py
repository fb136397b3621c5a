"""Image lists and image loading.

Where the images come from (``list_images``), always in a deterministic order:

* **A folder.** Every image directly in the folder *and* every image in its sub-folders (at
  any depth) is taken; nothing is dropped because a sub-folder exists. The order is: the
  images directly in the folder sorted by name, then each first-level sub-folder in sorted
  order, its files depth-first in sorted order. Labels: an image in a sub-folder takes the
  class of its *first-level* sub-folder when that name is a known synset (``train/n01440764/``;
  without a class list, when every first-level sub-folder with images is named like a
  synset, their sorted order gives the indices, as ImageNet's train tree does); otherwise,
  and for images directly in the folder, the class of the synset the file name starts with
  (``n01440764_tench.JPEG``), else -1. Hidden files and folders (``.name``) are ignored.
  Symlinks are followed, but every file and folder is taken once: a folder reached a second
  time (a symlinked copy of the tree, a symlink loop) is skipped, and a file whose real path
  was already listed is dropped, keeping the first in the order above. Entries with an image
  suffix that are not regular files (FIFOs, devices, sockets, broken links) are skipped and
  counted, never opened.
* **A list file**, one image per line: ``path``, ``path label``, ``path,label``, Caffe's
  ``path, label``, ``path<TAB>label``, or a CSV/TSV file with a header naming the columns
  (``path,label``; ImageNet's ``LOC_val_solution.csv`` with ``ImageId,PredictionString``,
  where the first token of the prediction is the synset). Paths are relative to the list
  file's folder. A path without suffix that names no file (``ILSVRC2012_val_00000001``) is
  looked up beside it with each image suffix. In a whitespace-separated line the label is
  the last field(s) only when they parse as a label, so ``my photo.jpg 3`` and ``my photo.jpg``
  both work. Entries are taken as listed (a file listed twice is sampled twice); a listed
  FIFO or device is not opened, it is reported unreadable when loaded (skipped, counted).
* **Labels** anywhere are a class index (0-based, the model's logit order; -1 = unknown),
  a synset (``n01440764``) or a class name: any synonym of synset_words.txt, case-insensitive,
  underscores standing for spaces (``great_white_shark``, ``Great white shark``). A label that
  is none of these is an error naming the line and the closest class names, never -1.
* **A labels file** (``labels=``, ``--labels FILE``) labels a folder's (or a list's) images:
  ``name label`` pairs (name = path relative to the folder, file name, or file name without
  suffix), ImageNet's ``LOC_val_solution.csv``, or one label per line in the order above (for
  a flat folder of ``ILSVRC2012_val_*.JPEG``: sorted file order). ImageNet's
  ``ILSVRC2012_validation_ground_truth.txt`` holds 1-based ILSVRC2012 ids, whose order is
  *not* the synset order; they are mapped through the devkit's ``meta.mat`` (``ILSVRC2012_ID``
  -> ``WNID``), which must lie beside the file; without it the file is refused (give
  synsets, 0-based indices or names per line instead).

File names need not be UTF-8: a path that is not is kept as ``fs-bytes:`` followed by its
percent-encoded bytes (the store holds UTF-8 strings), and ``load_image`` opens it again.

Images are converted to RGB, shrunk while decoding where JPEG allows (PIL draft mode),
resized so the shorter side is ``resize`` and centre-cropped to ``crop``. 16-bit and 32-bit
integer images (PIL modes I;16, I) and float images (mode F) are scaled to 0-255 by the
image's own range (values already within 0-255, or floats within 0-1, are kept as they are),
not clipped. Images of more than ``MAX_PIXELS`` pixels after JPEG draft reduction are refused
before decoding; an image of an extreme aspect ratio (resized long side over ``MAX_ASPECT`` times the
short side) is resampled only in the part that is kept, so no file costs more memory than its decoded
size plus the output. Every reader decodes through :func:`decode_image`. Files that cannot be read,
whatever the decoder raised, are reported to the caller as an OSError (or ``ImageTooLarge``), who
skips and counts them.

The package's rooms: :mod:`~atlas.data.paths` (suffixes, paths that are not UTF-8), :mod:`~atlas.data.labels`
(classes and labels), :mod:`~atlas.data.folders` (walking a folder), :mod:`~atlas.data.lists` (:func:`list_images`,
list files, labels files, the check of a source), :mod:`~atlas.data.decoding` (:func:`decode_image`,
:func:`load_image`) and :mod:`~atlas.data.loading` (datasets, loaders, batches on the device). Everything public is
re-exported here: ``from atlas.data import load_image``.
"""


from __future__ import annotations

from atlas.data.decoding import (
           MAX_ASPECT,
           MAX_PIXELS,
           ImageTooLarge,
           UnreadableImage,
           crop_patch,
           decode_image,
           load_image,
           photo_reading,
           position_to_pixels,
           to_tensor,
)
from atlas.data.labels import Classes, class_table
from atlas.data.lists import LABEL_COLUMNS, PATH_COLUMNS, ImageList, check_image_source, compare_lists, list_images
from atlas.data.loading import ImageDataset, batch_to_float, device_batch, image_loader
from atlas.data.paths import FS_PREFIX, IMAGE_SUFFIXES, INTEGER, SYNSET, SYNSET_ONLY, printable, real_path, storable_path

__all__ = ["batch_to_float", "check_image_source", "class_table", "Classes", "compare_lists", "crop_patch", "decode_image",
           "device_batch", "FS_PREFIX", "image_loader", "IMAGE_SUFFIXES", "ImageDataset", "ImageList", "ImageTooLarge", "INTEGER",
           "LABEL_COLUMNS", "list_images", "load_image", "MAX_ASPECT", "MAX_PIXELS", "PATH_COLUMNS", "photo_reading",
           "position_to_pixels", "printable", "real_path", "storable_path", "SYNSET", "SYNSET_ONLY", "to_tensor", "UnreadableImage"]
