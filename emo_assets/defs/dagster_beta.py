"""The Dagster beta APIs this project uses on purpose, and the one place where their `BetaWarning` is silenced.

Dagster warns every time a beta API is called, i.e. once per asset each time the definitions are built, which
flooded `make demo` with identical warning blocks. The three used here have no stable equivalent for what they
do in Dagster 1.13: an observable source asset gives a dataset file its data version (the sha256), the
single-run backfill policy lets one run load a model once for all its partitions, and the multi-to-single
dimension mapping states which activation partitions a model's analysis reads. Each is silenced by
category *and* message, only while the definitions are built: a beta warning of any other API, and every other
warning, still reaches the user.
"""

import contextlib
import re
import warnings
from collections.abc import Iterator

import dagster as dg

# The start of the message `dagster_shared.utils.warnings.beta_warning` writes for each of them.
OBSERVABLE_SOURCE_ASSET = "Function `observable_source_asset` is currently in beta"
BACKFILL_POLICY = "Parameter `backfill_policy` of function `asset` is currently in beta"
MULTI_TO_SINGLE_MAPPING = "Class `MultiToSingleDimensionPartitionMapping` is currently in beta"
USED_BETA_APIS = (OBSERVABLE_SOURCE_ASSET, BACKFILL_POLICY, MULTI_TO_SINGLE_MAPPING)


@contextlib.contextmanager
def accepted_beta(*messages: str) -> Iterator[None]:
    """Silence the `BetaWarning`s whose message starts with one of `messages`, inside the block only."""
    with warnings.catch_warnings():
        for message in messages:
            warnings.filterwarnings("ignore", message=re.escape(message), category=dg.BetaWarning)
        yield
