"""The cost model against hand-computed values and its exact limits: allreduce
formulas, bucketing (against the reducer's own), the flow shop of reductions
overlapping backward, CPU hosts, presets, and the alpha-beta fit."""

import math
from dataclasses import replace

import numpy as np
import pytest

from distprop.errors import UserError
from distprop.scaling import allreduce, fabrics, workloads
from distprop.scaling.allreduce import Fabric, Link
from distprop.scaling.calibrate import fit_alpha_beta
from distprop.scaling.model import MB, Host, exposed_time, make_buckets, predict
from distprop.scaling.workloads import Workload

FAST = Link(alpha=1e-6, beta=1e-10, gamma=1e-11)
SLOW = Link(alpha=1e-5, beta=1e-9, gamma=1e-11)


def fabric(g=4, node_reduction=None):
    return Fabric(name="test", description="test", intra=FAST, inter=SLOW, ranks_per_node=g,
                  node_reduction=node_reduction)


def test_ring_inside_one_node_is_the_textbook_formula():
    n, p = 8e6, 4
    expected = 2 * 3 * 1e-6 + 2 * 3 / 4 * n * 1e-10 + 3 / 4 * n * 1e-11
    assert allreduce.ring(n, p, fabric(g=4)) == pytest.approx(expected)


def test_ring_across_nodes_takes_the_slow_links_bytes_and_latency_at_each_node_boundary():
    n, p = 8e6, 8  # two nodes of four
    latency = 2 * 1 * 1e-5 + (2 * 7 - 2) * 1e-6
    expected = latency + 2 * 7 / 8 * n * 1e-9 + 7 / 8 * n * 1e-11
    assert allreduce.ring(n, p, fabric(g=4)) == pytest.approx(expected)


def test_rhd_matches_the_ring_bandwidth_at_powers_of_two_and_pays_the_fold_otherwise():
    n = 1e6
    four = allreduce.rhd(n, 4, fabric(g=4))
    assert four == pytest.approx(2 * 2 * 1e-6 + 2 * 3 / 4 * n * 1e-10 + 3 / 4 * n * 1e-11)
    three = allreduce.rhd(n, 3, fabric(g=4))
    assert three == pytest.approx((2 * 1 + 2) * 1e-6 + (2 * 2 / 3 + 2) * n * 1e-10 + (1 + 2 / 3) * n * 1e-11)
    assert three > allreduce.ring(n, 3, fabric(g=4))  # the reference notes: about 2 n beta more


def test_tree_latency_grows_with_the_log_of_the_nodes():
    n = 1e6
    t16 = allreduce.tree(n, 16 * 4, fabric(g=4))  # 16 nodes
    expected = 2 * (3 * 1e-6 + 4 * 1e-5) + 2 * n * 1e-9 + n * 1e-11
    assert t16 == pytest.approx(expected)


def test_hierarchy_reduces_inside_nodes_then_sends_every_shard_through_the_one_interface():
    n, g, nodes = 4e6, 4, 3
    inside = 2 * 3 * 1e-6 + 2 * 3 / 4 * n * 1e-10 + 3 / 4 * n * 1e-11
    across = 2 * 2 * 1e-5 + 2 * 2 / 3 * n * 1e-9 + 2 / 3 * n / g * 1e-11
    assert allreduce.hier(n, g * nodes, fabric(g=g)) == pytest.approx(inside + across)
    measured = Link(alpha=30e-6, beta=5e-11)
    assert allreduce.hier(n, 3, fabric(g=4, node_reduction=measured)) == pytest.approx(30e-6 + n * 5e-11)


def test_hierarchy_between_nodes_through_mpi_pays_the_fold_on_three_nodes():
    """One rank per node (hosts joined by MPI): the nodes' allreduce is recursive
    halving and doubling, which costs what a ring costs on 2 nodes and on 4, and
    folds a rank in and out with the whole message on 3."""
    n = 4e6
    mpi = replace(fabric(g=1), between_nodes="rhd")
    for p in (2, 4):
        assert allreduce.hier(n, p, mpi) == pytest.approx(2 * math.log2(p) * 1e-5 + 2 * (p - 1) / p * n * 1e-9
                                                          + (p - 1) / p * n * 1e-11)
    three = 4 * 1e-5 + (4 / 3 + 2) * n * 1e-9 + (1 + 2 / 3) * n * 1e-11
    assert allreduce.hier(n, 3, mpi) == pytest.approx(three)
    assert allreduce.hier(n, 3, mpi) > 2 * allreduce.hier(n, 3, fabric(g=1))


def test_distprops_allreduce_over_mpi_is_its_ring_only_where_the_ring_pays():
    """distprop sums large buckets on 3, 5, 6 ... ranks round its own ring; on powers
    of two and for small buckets the MPI library's algorithm stays."""
    from distprop.parallel.ring import MIN_CHUNK_BYTES

    large, small = 3 * MIN_CHUNK_BYTES, 3 * MIN_CHUNK_BYTES - 3
    for p, n, chosen in ((3, large, allreduce.ring), (3, small, allreduce.rhd), (4, 4 * MIN_CHUNK_BYTES, allreduce.rhd),
                         (2, large, allreduce.rhd), (6, 6 * MIN_CHUNK_BYTES, allreduce.ring)):
        assert allreduce.mpi_ring(n, p, fabric(g=1)) == chosen(n, p, fabric(g=1)), (p, n)
    mpi = replace(fabric(g=1), between_nodes="mpi-ring")
    assert allreduce.hier(large, 3, mpi) == pytest.approx(allreduce.ring(large, 3, fabric(g=1)))


@pytest.mark.parametrize("name", sorted(allreduce.ALGORITHMS))
def test_one_rank_costs_nothing_and_more_bytes_cost_more(name):
    assert allreduce.allreduce_time(name, 1e6, 1, fabric()) == 0.0
    for p in (2, 3, 8, 64):
        small, large = (allreduce.allreduce_time(name, n, p, fabric()) for n in (1e5, 1e7))
        assert 0 < small < large


def test_bus_bandwidth_is_nccl_tests_definition():
    assert allreduce.bus_bandwidth(1e9, 1.0, 4) == pytest.approx(1e9 * 2 * 3 / 4)


def test_ring_latency_overtakes_bandwidth_where_2_p_alpha_exceeds_2_n_beta():
    link = Link(alpha=10e-6, beta=1 / 10e9)
    flat = Fabric(name="flat", description="", intra=link, inter=link, ranks_per_node=1 << 30)
    n = 1e6  # 2(p-1) alpha > 2(p-1)/p n beta  <=>  p > n beta / alpha = 10
    ranks = list(range(2, 40))
    assert allreduce.latency_crossover("ring", n, flat, ranks) == 11
    assert allreduce.latency_crossover("ring", 1e9, flat, ranks) is None


def test_buckets_follow_the_reducers_assignment():
    from distprop import nn
    from distprop.parallel.reducer import assign_buckets

    shapes = [(300, 300), (300,), (1000, 50), (50,), (20, 20), (20,), (5000,)]
    params = [(f"p{i}", nn.Parameter(np.zeros(s, np.float32))) for i, s in enumerate(shapes)]
    cap, first = 400_000, 100_000
    groups = assign_buckets(list(reversed(params)), cap, first, inplace_bytes=1 << 40)
    expected = [sum(p.data.nbytes for _, p in g) for g in groups]
    gradients = [(p.data.nbytes, 0.0) for _, p in reversed(params)]
    assert [size for size, _ in make_buckets(gradients, cap, first)] == expected


def test_flow_shop_by_hand():
    # ready at 1, 2, 10; each reduction 3: runs 1-4, 4-7, 10-13; backward ends at 10
    assert exposed_time([1, 2, 10], [3, 3, 3], backward_end=10) == pytest.approx(3)
    # all ready early, reductions queue: 0-5, 5-10, 10-15
    assert exposed_time([0, 0, 0], [5, 5, 5], backward_end=12) == pytest.approx(3)
    assert exposed_time([0, 1], [1, 1], backward_end=10) == 0.0


def _workload(total_bytes=100 * MB, backward=0.1):
    return Workload(name="w", description="w", batch=32, unit="samples", forward_s=backward / 2,
                    backward_s=backward, optimizer_s=0.01, gradients=workloads.even_gradients(total_bytes))


def test_one_rank_has_efficiency_one_and_nothing_exposed():
    for host in (None, Host(cores=2)):
        result = predict(_workload(), fabrics.preset("ib-200"), "ring", 1, host=host)
        assert result.efficiency == pytest.approx(1.0)
        assert result.exposed_s == 0.0 and result.allreduce_s == 0.0


def test_a_single_bucket_at_the_end_of_backward_exposes_its_whole_allreduce():
    work, fab = _workload(), fabrics.preset("eth-25")
    result = predict(work, fab, "ring", 64, bucket_mb=1e6, first_bucket_mb=1e6)
    assert result.buckets == 1
    assert result.exposed_s == pytest.approx(allreduce.ring(work.gradient_bytes, 64, fab))


def test_nothing_is_exposed_when_allreduces_are_negligible_against_backward():
    work = _workload(total_bytes=1 * MB, backward=10.0)
    result = predict(work, fabrics.preset("ib-400"), "hier", 64)
    assert result.exposed_s < 1e-4 * work.backward_s
    assert result.efficiency == pytest.approx(1.0, abs=1e-4)


def test_cpu_ranks_pay_the_node_local_reduction_in_full_and_overlap_what_waits_on_a_wire():
    work, fab = _workload(), fabrics.preset("eth-100")
    overlapped = predict(work, fab, "ring", 16)
    assert 0 < overlapped.exposed_s < overlapped.allreduce_s
    on_cpus = predict(work, fab, "ring", 16, host=Host(cores=64))  # a ring only waits on the network
    assert on_cpus.exposed_s == pytest.approx(overlapped.exposed_s)
    one_node = Fabric(name="shm", description="", intra=FAST, inter=FAST, ranks_per_node=1 << 30,
                      node_reduction=Link(alpha=1e-4, beta=1e-9))
    shm = predict(work, one_node, "hier", 4, host=Host(cores=4))
    assert shm.exposed_s == pytest.approx(shm.allreduce_s) and shm.allreduce_s > 0


def test_a_node_with_more_ranks_than_cores_shares_them_out_evenly():
    work = _workload()
    shm = Fabric(name="shm", description="", intra=FAST, inter=FAST, ranks_per_node=1 << 30,
                 node_reduction=Link(alpha=0.0, beta=0.0))
    two, three = (predict(work, shm, "hier", p, host=Host(cores=2)) for p in (2, 3))
    assert three.step_s == pytest.approx(1.5 * two.step_s)  # each of 3 ranks has 2/3 of a core
    assert Host(cores=2, threads_per_rank=2).oversubscription(3) == 3
    assert Host(cores=4).oversubscription(3) == 1


def test_hosts_sharing_one_machines_cores_share_them_for_their_links_too():
    """Three namespace hosts (one rank each) on 2 cores: compute and wire both run at
    2/3 speed; separate hosts of 2 cores each keep the wire's time."""
    work = _workload(backward=1e-6)  # nothing to overlap: the step is compute plus every allreduce
    link = Link(alpha=1e-5, beta=1e-8)
    hosts = Fabric(name="net", description="", intra=link, inter=link, ranks_per_node=1, between_nodes="mpi-ring")
    apart = predict(work, hosts, "hier", 3, host=Host(cores=2))
    shared = predict(work, hosts, "hier", 3, host=Host(cores=2, shared=True))
    assert apart.exposed_s == pytest.approx(apart.allreduce_s)
    assert shared.exposed_s == pytest.approx(1.5 * apart.allreduce_s, rel=1e-3)
    assert shared.compute_s == pytest.approx(1.5 * apart.compute_s)


def test_stragglers_add_the_expected_maximum_of_normal_deviations():
    work, fab = _workload(total_bytes=1), fabrics.preset("ib-400")
    plain, jittery = (predict(work, fab, "ring", 256, sigma=s) for s in (0.0, 0.002))
    assert jittery.step_s - plain.step_s == pytest.approx(0.002 * math.sqrt(2 * math.log(256)))


def test_presets_carry_the_published_bus_bandwidths():
    assert fabrics.preset("ib-200").inter.beta == pytest.approx(1 / 24e9)
    assert fabrics.preset("ib-400").inter.beta == pytest.approx(1 / 47e9)
    assert fabrics.preset("eth-25").inter.beta == pytest.approx(1 / (25 / 8 * 1e9 * 0.85))
    assert fabrics.preset("ib-100", nics=4).inter.beta == pytest.approx(1 / (4 * 12.2e9))
    assert fabrics.preset("ib-200", ranks_per_node=4).ranks_per_node == 4
    with pytest.raises(UserError, match="unknown fabric 'ib-9'"):
        fabrics.preset("ib-9")
    with pytest.raises(UserError, match="needs measurements"):
        fabrics.preset("shm")


def test_reference_workloads_have_the_published_sizes():
    assert workloads.reference("resnet50").gradient_bytes == pytest.approx(25_557_032 * 4, rel=1e-9)
    assert workloads.reference("gpt2-small").gradient_bytes == pytest.approx(124_439_808 * 4, rel=1e-9)
    # ResNet-50 on an A100 with AMP: 2470 images/s, batch 256 -> about 104 ms of compute
    assert workloads.reference("resnet50").compute_s == pytest.approx(256 / 2470, rel=0.01)
    with pytest.raises(UserError, match="unknown reference model"):
        workloads.reference("vgg")


def test_alpha_beta_fit_recovers_exact_noisy_and_shaped_lines():
    sizes = [4096 * 4 ** i for i in range(7)]
    alpha, beta, note = fit_alpha_beta([(n, 20e-6 + n / 5e9) for n in sizes])
    assert alpha == pytest.approx(20e-6, rel=1e-6) and beta == pytest.approx(1 / 5e9, rel=1e-6)
    assert note is None
    rng = np.random.default_rng(0)
    noisy = [(n, (20e-6 + n / 5e9) * (1 + 0.05 * rng.standard_normal())) for n in sizes]
    alpha, beta, _ = fit_alpha_beta(noisy)
    assert alpha == pytest.approx(20e-6, rel=0.2) and beta == pytest.approx(1 / 5e9, rel=0.2)
    # measured on a veth shaped to 1 Gb/s by tbf: small messages wait for the next tick
    shaped = [(4096, 0.0080), (16384, 0.0080), (65536, 0.0081), (262144, 0.0240), (1048576, 0.0242),
              (4194304, 0.0490), (16777216, 0.2074)]
    alpha, beta, note = fit_alpha_beta(shaped)
    assert 1 / beta == pytest.approx(80e6, rel=0.25) and 0 <= alpha < 0.02 and note is None


def test_alpha_beta_fit_never_gives_a_link_without_bandwidth_cost():
    sizes = [4096 * 4 ** i for i in range(7)]
    # under load from elsewhere: the 256 KB bucket took longer than the 16 MB one
    loaded = [(n, 50e-6 + n / 2e9) for n in sizes]
    loaded[3] = (sizes[3], 0.05)
    alpha, beta, note = fit_alpha_beta(loaded)
    latency = 50e-6 + sizes[1] / 2e9  # the median of the three smallest
    assert beta == pytest.approx((loaded[6][1] - latency) / sizes[6], rel=1e-9)
    assert "not positive" in note and "beyond the small messages' latency" in note
    assert alpha == pytest.approx(50e-6, rel=0.01)  # the small messages with the bandwidth term taken off
    # every time the same: the largest message's whole time is all there is to go on
    flat = [(n, 1e-3) for n in sizes]
    alpha, beta, note = fit_alpha_beta(flat)
    assert beta == pytest.approx(1e-3 / sizes[6]) and alpha == 0 and "not positive" in note
    assert "beyond" not in note


def test_contention_scales_only_what_the_step_pays_for_communication():
    work, fab = _workload(), fabrics.preset("eth-25")
    plain, slowed = (predict(work, fab, "ring", 64, contention=c) for c in (1.0, 2.0))
    assert slowed.exposed_s == pytest.approx(2 * plain.exposed_s)
    assert slowed.step_s - slowed.exposed_s == pytest.approx(plain.step_s - plain.exposed_s)
