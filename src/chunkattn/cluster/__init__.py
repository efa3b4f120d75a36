"""Past one machine: routing requests among engine replicas by the prefixes they cache (``router``), a
discrete-event simulator of many replicas on a calibrated cost model (``simulator``), what travels between an
ingress and its replicas (``wire``): none of them imports Ray. The Ray Serve deployment is ``serve`` (and its
request router ``ray_router``), imported on demand: it needs the ``cluster`` extra."""

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
