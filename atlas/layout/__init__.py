"""Layout stage: project sampled activations to 2-D (UMAP, t-SNE or PCA) and normalise.

The rooms of the stage:

- :mod:`atlas.layout.embedding`: ``embed`` (rows to 1 or 2 dimensions, seeded; the pure core) and ``pca_project``;
- :mod:`atlas.layout.normalize`: ``normalize_layout`` (the paper's percentile clip box mapped to [0, 1]);
- :mod:`atlas.layout.projection`: ``project`` (the stage: rows of the store in, a stored layout out) and ``save_layout``
  (the store writer, public so the class atlases can store their own layouts);
- :mod:`atlas.layout.neighbors`: the nearest-neighbour graph, a GEMM-based clustered search (faiss with ``knn="faiss"``);
- :mod:`atlas.layout.optimize`: a parallel yet reproducible version of umap-learn's SGD;
- :mod:`atlas.layout.quality`: kNN recall and trustworthiness of a layout;
- :mod:`atlas.layout.aligned`: AlignedUMAP layouts of consecutive layers (``aligned_project``).

The initialisation is a PCA of the data instead of a spectral embedding, which is slow and fragile on graphs with many
components (clustered data, duplicates).
"""

from __future__ import annotations

from atlas.layout.embedding import LARGE_N, LARGE_N_EPOCHS, METHODS, SMALL_N_EPOCHS, embed, pca_project
from atlas.layout.neighbors import DEFAULT_BACKEND, knn_graph
from atlas.layout.normalize import normalize_layout
from atlas.layout.optimize import optimize_layout
from atlas.layout.projection import aligned_project, layout_params, project, save_layout
from atlas.layout.quality import knn_recall, layout_quality, trustworthiness
from atlas.settings import OUTSIDE

__all__ = ["DEFAULT_BACKEND", "LARGE_N", "LARGE_N_EPOCHS", "METHODS", "OUTSIDE", "SMALL_N_EPOCHS", "aligned_project", "embed",
           "knn_graph", "knn_recall", "layout_params", "layout_quality", "normalize_layout", "optimize_layout", "pca_project",
           "project", "save_layout", "trustworthiness"]
