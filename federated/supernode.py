"""``python -m federated.supernode [flower-supernode arguments]``: Flower's SuperNode with
short polling intervals.

Why: Flower 1.42's SuperNode (``flwr.supernode.start_client_internal``) sleeps a fixed 3 s
whenever a pull from the SuperLink finds no message, and 0.5 s between checks for the
ClientApp's reply; neither is configurable. A message that arrives just after an empty pull
waits up to 3 s, every exchange of every round (train, evaluate, four secure-aggregation
stages). Here those sleeps are capped at ``FEDERATED_NODE_POLL_S`` seconds (default 0.2):
the same loop, asking more often. At 0.2 s an idle node sends five small pulls a second to
its SuperLink, which a federation of a few members does not notice.

Everything else is Flower's ``flower-supernode`` unchanged (same arguments, TLS, node auth).
"""

from __future__ import annotations

import os
import sys
import time as _time

DEFAULT_POLL_S = 0.2


class _ShortSleeps:
    """The ``time`` module, with ``sleep`` capped at ``cap`` seconds."""

    def __init__(self, cap: float):
        self.cap = cap

    def sleep(self, seconds: float) -> None:
        _time.sleep(min(seconds, self.cap))

    def __getattr__(self, name: str):
        return getattr(_time, name)


def main() -> None:
    from flwr.common.logger import update_console_handler
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli import flower_supernode

    # Node logs are files: timestamps (where a round's seconds go), no colour codes.
    update_console_handler(timestamps=True, colored=False)

    cap = float(os.environ.get("FEDERATED_NODE_POLL_S", DEFAULT_POLL_S))
    if not cap > 0:
        sys.exit(f"FEDERATED_NODE_POLL_S must be > 0, got {cap}")
    # The module looks `time` up at call time, so its loops see the capped sleep.
    start_client_internal.time = _ShortSleeps(cap)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
