"""Past one machine: routing requests among engine replicas by the prefixes they cache (``router``), and a
discrete-event simulator of many replicas on a calibrated cost model (``simulator``). Neither imports Ray."""

from chunkattn.cluster.router import (
    POLICIES,
    PowerOfTwoPolicy,
    PrefixAwarePolicy,
    PrefixIndex,
    RoundRobinPolicy,
    Router,
    RoutingPolicy,
    RoutingStats,
    block_hashes,
    make_policy,
)

__all__ = ["POLICIES", "PowerOfTwoPolicy", "PrefixAwarePolicy", "PrefixIndex", "RoundRobinPolicy", "Router",
           "RoutingPolicy", "RoutingStats", "block_hashes", "make_policy"]
