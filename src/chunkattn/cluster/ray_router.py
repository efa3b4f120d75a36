"""The Ray Serve request router of the engine replicas: :class:`PrefixRouter`.

A module of its own on purpose: Ray Serve pickles a custom router's whole module *by value* into each process
that holds a handle, so everything defined here is copied, not shared. The types it reads from requests
(:mod:`chunkattn.cluster.wire`) and the routing core (:mod:`chunkattn.cluster.router`) live elsewhere and
are imported by reference, so ``isinstance`` checks hold.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, ReplicaResult, RequestRouter, RunningReplica

from chunkattn.cluster.router import Router, RoutingStats, make_policy
from chunkattn.cluster.wire import ReplicaRequest, ToReplica


class PrefixRouter(RequestRouter):
    """Ray Serve's side of :class:`~chunkattn.cluster.Router`: candidates come from Ray, the choice from the
    policy. A choice counts as load at once (moved if Ray sends the request elsewhere, ``on_request_routed``),
    until the request completes; the replicas' reports replace the estimates as they arrive."""

    def initialize_state(self, policy: str = "prefix-aware", block_size: int = 64, capacity_tokens: int = 65536,
                         recent_s: float = 5.0, **options: Any) -> None:
        """``recent_s``: how late a replica's report may arrive (see :class:`~chunkattn.cluster.Router`)."""
        self.core = Router(make_policy(policy, **options), block_size, recent_s=recent_s)
        self.capacity_tokens = capacity_tokens
        self._reported: dict[str, float] = {}  # replica -> time of the report applied
        self._sent: dict[str, str] = {}  # Ray's internal request id -> the replica counted as serving it
        self._routing: dict[str, Any] = {}  # Ray's internal request id -> the routing future being watched

    def _sync(self, replicas: Iterable[RunningReplica]) -> None:
        core = self.core
        live = {r.replica_id.unique_id: r for r in replicas}
        for rid in [rid for rid in core.replicas if rid not in live]:
            core.remove_replica(rid)
            self._reported.pop(rid, None)
        for rid, r in live.items():
            stats = r.routing_stats or {}
            if rid not in core.replicas:
                core.add_replica(rid, int(stats.get("capacity_tokens", self.capacity_tokens)))
            if stats and stats.get("time") != self._reported.get(rid):
                self._reported[rid] = stats["time"]
                core.report(rid, RoutingStats(int(stats["queue_len"]), stats.get("free_blocks"),
                                              stats.get("held_blocks"), stats["time"]))

    def _blocks(self, request: Any) -> list[int]:
        if not isinstance(request, ReplicaRequest):
            return []
        return self.core.blocks(request.token_ids, request.cache_salt)

    @staticmethod
    def _request(pending_request: PendingRequest | None) -> Any:
        return pending_request.args[0] if pending_request is not None and pending_request.args else None

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        self._sync(self.curr_replicas.values() or candidate_replicas)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        request = self._request(pending_request)
        if isinstance(request, ToReplica):
            return [[by_id[sorted(by_id)[request.index % len(by_id)]]]]
        blocks = self._blocks(request)
        exclude = [rid for rid in self.core.replicas if rid not in by_id]
        chosen = self.core.choose(blocks, exclude)
        if isinstance(request, ReplicaRequest) and pending_request is not None:
            # Counted at once, so that a burst of requests routed before any is sent spreads by load.
            key = pending_request.metadata.internal_request_id
            previous = self._sent.pop(key, None)
            if previous is not None:  # Ray asks again (the replica was full): undo the earlier choice's load
                self.core.finished(previous)
            self.core.record(chosen, blocks)
            self._sent[key] = chosen
            self._watch(key, pending_request)
        # If the chosen replica turns out full, Ray tries the next rank: the rest, least loaded first.
        loads = {rid: r.load for rid, r in self.core.replicas.items()}
        rest = sorted((r for rid, r in by_id.items() if rid != chosen),
                      key=lambda r: loads.get(r.replica_id.unique_id, 0))
        return [[by_id[chosen]], rest] if rest else [[by_id[chosen]]]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID,
                          result: ReplicaResult) -> None:
        request = self._request(pending_request)
        key = pending_request.metadata.internal_request_id
        chosen = self._sent.get(key)
        if isinstance(request, ReplicaRequest) and chosen != replica_id.unique_id:
            if chosen is not None:  # sent elsewhere than chosen (the fallback rank)
                self.core.finished(chosen)
            self.core.record(replica_id.unique_id, self._blocks(request))
            self._sent[key] = replica_id.unique_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._routing.pop(internal_request_id, None)
        if self._sent.pop(internal_request_id, None) is not None:
            self.core.finished(replica_id.unique_id)

    def _watch(self, key: str, pending_request: PendingRequest) -> None:
        """Undo a choice's load if the request is cancelled while Ray is still routing it (the client left
        before a replica had room): Ray then never routes it, so neither hook above would."""
        future = pending_request.future
        if self._routing.get(key) is future:
            return
        self._routing[key] = future

        def done(f: Any) -> None:
            cancelled = f.cancelled()
            if self._routing.get(key) is not f:
                return  # an earlier attempt's future (Ray retried the request): the newer one decides
            del self._routing[key]
            if cancelled:
                chosen = self._sent.pop(key, None)
                if chosen is not None:
                    self.core.finished(chosen)

        future.add_done_callback(done)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.core.remove_replica(replica_id.unique_id)
