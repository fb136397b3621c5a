"""The run folder and its zarr v3 store: the only way stages talk to each other.

A run folder holds ``store.zarr`` (everything numeric), ``log.txt`` (skipped files and
stage messages) and, later, ``tiles/``. The store's layout:

``/``                                  attrs: model, weights, weights_sha256, seed, ... (see ``sample``)
``images/path`` (n_images,) str        the deterministic image list
``images/label`` (n_images,) int32     class index or -1
``images/ok`` (n_images,) bool         False for unreadable files (also listed in log.txt)
``images/top5`` (n_images, 5) int32    the model's top-5 classes
``images/shard_done`` (n_shards,) bool a shard's rows are written and final
``samples/{layer}/activations`` (n_rows, C)         n_rows = n_images * per_image
``samples/{layer}/attributions`` (n_rows, n_classes) h . d logit_c / d h at the sampled position
``samples/{layer}/image_index`` (n_rows,) int32
``samples/{layer}/position`` (n_rows, 2) int16      (y, x) in the layer's grid
``samples/{layer}/valid`` (n_rows,) bool            False for rows of skipped images
``layouts/{layer}/{atlas}/...``        written by ``atlas.layout`` ("full" is the whole-layer atlas)
``grids/{layer}/{atlas}/{size}/...``   written by ``atlas.grid``
``whitening/{layer}/matrix`` (C, C)    written by ``atlas.grid``
``icons/{layer}/{atlas}/{size}/...``   written by ``atlas.render``
``ledger/``                            a group whose attrs are the ledger (below); written only by this package

Layer names may contain dots (torchvision module paths); they are used as zarr node
names unchanged.

The ledger: freshness, integrity, one writer
--------------------------------------------
Every stage brackets its writes with :func:`begin_stage` and :func:`finish_stage`:

- ``begin_stage(run, stage, paths)`` marks the nodes under ``paths`` as being written (a reader
  then gets "incomplete: re-run `atlas STAGE`", never half-written data), forgets their seals,
  and replaces the completion records of ``stage`` and of every later stage by tombstones saying
  which stage invalidated them (for the whole-layer atlas "full"; sampling drops them all),
  whichever command is running the stage.
- ``finish_stage(run, stage, paths)`` *seals* every array under ``paths``: the name, size and
  crc32 of each chunk file, and the array's shape. Chunks zarr never wrote (equal to the fill
  value) are simply not in the seal, so an all-zero chunk is not "missing".
- :func:`verify` (called by every stage on what it reads) lists the chunk files of each sealed
  array and compares names and sizes, then their crc32 (skipped when the files' sizes and
  mtimes are those already checked in this process). A missing, truncated, changed or extra
  chunk, an unreadable ``zarr.json`` or an unsealed half-written node is one
  :class:`AtlasError` naming the array and the stage to re-run.
- :func:`verify` also checks lineage (:func:`check_lineage`): a grid records the ``layout_id`` of its
  layout and its own ``grid_id``, icons the ``grid_id`` of their grid; a grid or icons node whose input
  has changed since is one line saying which stage to re-run. No stage deletes another stage's data to
  signal this.
- ``atlas build`` records a stage's key with :func:`record_stage` once the stage has finished and
  skips it later only when :func:`stage_status` finds the record, the same key and every
  recorded array intact.

The ledger lives in ``store.zarr/ledger/zarr.json`` (a zarr group's attributes, written
atomically here: temporary file, then ``os.replace``). Stores without one (older runs,
synthetic test stores) are read without chunk checks.

Every command that writes takes :func:`take_lock`, an advisory lock (``fcntl.lockf``) on
``RUN/.lock`` holding the holder's pid; a second writer gets one line naming it. Taking the
lock also removes stray ``*.partial`` leftovers of killed writers (:func:`cleanup_partials`).
:func:`writer` (a decorator) releases the locks its call took and turns a read-only folder
or a full disk (``EROFS``, ``EACCES``, ``ENOSPC``, ...) into one line.

The package's rooms: :mod:`~atlas.store.schema` (paths, opening, arrays, the stage graph),
:mod:`~atlas.store.ledger` (the ledger file), :mod:`~atlas.store.seals` (seals, verification, lineage),
:mod:`~atlas.store.locks` (one writer, leftovers, faults, atomic creation) and :mod:`~atlas.store.stages` (a stage's
records: begin, finish, record, status). Everything is re-exported here: ``from atlas.store import verify``.
"""


from __future__ import annotations

from atlas.store.ledger import read_ledger
from atlas.store.locks import FAULTS, cleanup_partials, describe_fault, new_store, open_for_update, release_lock, take_lock, writer
from atlas.store.schema import (
    BUILT_ON,
    COMPRESSORS,
    FULL_ATLAS,
    LEDGER,
    LOCK_NAME,
    PARTIAL_STORE,
    STAGE_ORDER,
    STORE_NAME,
    WRITER,
    attrs,
    create_array,
    log,
    open_store,
    read_rows,
    require_layer,
    store_path,
    write_array,
)
from atlas.store.seals import (
    LINEAGE,
    check_lineage,
    check_metadata,
    damaged,
    derived_nodes,
    read_flags,
    remove_node,
    replace_node,
    seal_problems,
    stale,
    valid_rows,
    verify,
)
from atlas.store.stages import begin_stage, finish_stage, record_stage, stage_is_current, stage_status

__all__ = ["attrs", "begin_stage", "BUILT_ON", "check_lineage", "check_metadata", "cleanup_partials", "COMPRESSORS", "create_array",
           "damaged", "derived_nodes", "describe_fault", "FAULTS", "finish_stage", "FULL_ATLAS", "LEDGER", "LINEAGE", "LOCK_NAME",
           "log", "new_store", "open_for_update", "open_store", "PARTIAL_STORE", "read_flags", "read_ledger", "read_rows",
           "record_stage", "release_lock", "remove_node", "replace_node", "require_layer", "seal_problems", "stage_is_current",
           "STAGE_ORDER", "stage_status", "stale", "STORE_NAME", "store_path", "take_lock", "valid_rows", "verify", "write_array",
           "WRITER", "writer"]
