"""`atlas fetch-weights`: InceptionV1's default weights (BVLC GoogLeNet) into the user cache; docs/weights.md."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from atlas.cli.commands import app


@app.command("fetch-weights")
def fetch_weights_command(
    force: Annotated[bool, typer.Option("--force", help="download again even when the cache already holds the weights")] = False,
) -> None:
    """Download BVLC GoogLeNet (InceptionV1's default weights) from the Caffe model zoo, check its published sha1, and
    convert it into the user cache. Any command needing the weights does this on first use; this does it now.
    $ATLAS_WEIGHTS_URL (with $ATLAS_WEIGHTS_SHA1 or $ATLAS_WEIGHTS_SHA256) downloads from elsewhere."""
    from atlas.models.weights import fetch_weights

    fetched = fetch_weights(force=force)
    how = f"downloaded from {fetched.url}" if fetched.url else (
        "already in the cache, nothing downloaded" if fetched.source == str(fetched.path) else f"converted from {fetched.source}")
    env = os.environ.get("ATLAS_WEIGHTS")
    note = f"; ATLAS_WEIGHTS={env} is set and is used before the cache" if env else ""
    typer.echo(f"InceptionV1 weights: {fetched.path} ({how}){note}")
