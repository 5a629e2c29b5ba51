"""ScaleDownVeto: Dask's scale-down paths never pick a worker that holds shards."""

from __future__ import annotations

import pytest
from distributed.deploy.adaptive import Adaptive

from elastic_llm.cluster.downscaling import ScaleDownVeto

from .helpers import local_cluster, wait_for


@pytest.mark.timeout(60)
def test_retire_workers_by_count_skips_protected_workers() -> None:
    with local_cluster(3) as (cluster, client):
        client.register_plugin(ScaleDownVeto())
        veto = ScaleDownVeto.of(cluster.scheduler)
        a, b, c = sorted(cluster.scheduler.workers)
        veto.protect([a, b])
        assert cluster.scheduler.workers_to_close(n=3) == [c]
        retired = client.retire_workers(n=2)  # asks for two, only one is not protected
        assert set(retired) == {c}
        wait_for(lambda: set(cluster.scheduler.workers) == {a, b})
        assert client.retire_workers(n=1) == {}
        veto.release([b])
        assert cluster.scheduler.workers_to_close(n=2) == [b]
        veto.set_protected([b])
        assert veto.protected == {b} and cluster.scheduler.workers_to_close(n=2) == [a]


@pytest.mark.timeout(60)
def test_adaptive_scale_down_keeps_protected_workers() -> None:
    with local_cluster(3) as (cluster, client):
        client.register_plugin(ScaleDownVeto())
        veto = ScaleDownVeto.of(cluster.scheduler)
        keep = sorted(cluster.scheduler.workers)[0]
        veto.protect([keep])
        adaptive = cluster.adapt(Adaptive, minimum=0, maximum=3, interval="50ms", wait_count=1)
        try:
            wait_for(lambda: set(cluster.scheduler.workers) == {keep}, timeout=40)
            # Adaptive keeps asking (the hook keeps refusing) and the protected worker stays.
            vetoes = veto.vetoes
            wait_for(lambda: veto.vetoes >= vetoes + 5, timeout=20)
            assert set(cluster.scheduler.workers) == {keep}
            # Once released, adaptive takes it too.
            veto.release([keep])
            wait_for(lambda: not cluster.scheduler.workers, timeout=40)
        finally:
            adaptive.stop()


def test_departed_workers_leave_the_protected_set() -> None:
    veto = ScaleDownVeto(["tcp://a:1", "tcp://b:1"])
    veto.remove_worker(None, "tcp://a:1", stimulus_id="test")  # type: ignore[arg-type]
    assert veto.protected == {"tcp://b:1"}
