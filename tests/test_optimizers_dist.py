"""Two-process (gloo, CPU) tests of the distributed paths of Muon and DistAdam in core/optimizers.py.

One spawn runs every scenario (process start-up dominates the cost); each test asserts one property of
its results: sharded Adam state, one owner per Muon matrix, 2-process == 1-process results, and the grad
norm from the optimizers' shards.
"""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import core.optimizers as optim

WORLD = 2
STEPS = 3
# Muon: 5 same-shape matrices (odd: the last chunk is short), a batched qkv-like 3-D param, a wide one.
MUON_SHAPES = [(24, 16)] * 5 + [(3, 16, 16)] * 2 + [(16, 40)]
# Adam: rows divisible by 2, not divisible (padded), a 1-D vector of odd length, a 0-d scalar.
ADAM_SHAPES = [(64, 8), (7, 8), (15,), ()]


def make_params(shapes, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def rank_grad(shape, step, index, rank):
    """The gradient rank `rank` sees for parameter `index` at `step` (deterministic, different per rank)."""
    g = torch.Generator().manual_seed(1000 * step + 10 * index + rank)
    return torch.randn(shape, generator=g)


def build(world_size, rank):
    muon_params, adam_params = make_params(MUON_SHAPES, 1), make_params(ADAM_SHAPES, 2)
    adam_params[1].lr_mul = 4.0  # the multiplier must reach the sharded update too
    muon = optim.Muon(muon_params, lr=0.05, momentum=0.9, rank=rank, world_size=world_size)
    # eps comparable to sqrt(v): Adam is otherwise blind to the gradient scale, and the test must see
    # whether the ranks average (not sum) their gradients.
    adam = optim.DistAdam(adam_params, lr=0.01, betas=(0.8, 0.95), eps=0.1, rank=rank, world_size=world_size)
    return muon, muon_params, adam, adam_params


def state_numel(opt):
    return sum(t.numel() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def worker(rank, port, out_dir):
    torch.set_num_threads(1)  # two processes on two cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        muon, muon_params, adam, adam_params = build(WORLD, rank)
        # Count which matrices this rank orthogonalises (wrap the orthogonaliser Muon calls).
        orthogonalised = []
        real_ns = muon.orthogonalize
        assert real_ns is optim.zeropower_via_newtonschulz5  # the record's NS5 by default

        def counting_ns(G):
            orthogonalised.append(tuple(G.shape))
            return real_ns(G)
        muon.orthogonalize = counting_ns
        from core.distributed import DistInfo, global_grad_norm_from_shards
        info = DistInfo(rank, rank, WORLD, torch.device("cpu"), "gloo")
        grad_norms = []
        for step in range(STEPS):
            for i, p in enumerate(muon_params + adam_params):
                p.grad = rank_grad(p.shape, step, i, rank)
            muon.step()
            adam.step()
            grad_norms.append(global_grad_norm_from_shards([adam, muon], info).item())
        torch.save({
            "muon": [p.detach() for p in muon_params],
            "adam": [p.detach() for p in adam_params],
            "adam_state_numel": state_numel(adam),
            "muon_owned": [i for i, p in enumerate(muon_params) if p in muon.state],
            "owner_rank": [muon.owner_rank(p) for p in muon_params],
            "ns_calls": orthogonalised,
            "grad_norms": grad_norms,
        }, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    per_rank = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    # The single-process reference sees, at every step, the average of the ranks' gradients.
    muon, muon_params, adam, adam_params = build(1, 0)
    grad_norms = []
    for step in range(STEPS):
        for i, p in enumerate(muon_params + adam_params):
            p.grad = sum(rank_grad(p.shape, step, i, r) for r in range(WORLD)) / WORLD
        grad_norms.append(torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in muon_params + adam_params])).item())
        muon.step()
        adam.step()
    single = {"muon": [p.detach() for p in muon_params], "adam": [p.detach() for p in adam_params],
              "adam_state_numel": state_numel(adam), "grad_norms": grad_norms}
    return per_rank, single


def test_two_process_result_equals_one_process(results):
    per_rank, single = results
    for r in range(WORLD):
        for kind in ("muon", "adam"):
            for i, (got, want) in enumerate(zip(per_rank[r][kind], single[kind])):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"rank {r} {kind} param {i}")
    # and training really moved them
    start = make_params(MUON_SHAPES, 1) + make_params(ADAM_SHAPES, 2)
    for p0, p in zip(start, single["muon"] + single["adam"]):
        assert (p - p0.detach()).abs().max() > 1e-3


def test_distadam_state_is_sharded(results):
    per_rank, single = results
    for r in range(WORLD):
        ratio = per_rank[r]["adam_state_numel"] / single["adam_state_numel"]
        # half, plus the pad rows of the parameters whose dim 0 is odd
        assert 0.45 < ratio < 0.56, ratio


def test_each_muon_matrix_orthogonalised_by_exactly_one_rank(results):
    per_rank, _ = results
    owned = [set(per_rank[r]["muon_owned"]) for r in range(WORLD)]
    assert owned[0].isdisjoint(owned[1])
    assert owned[0] | owned[1] == set(range(len(MUON_SHAPES)))
    for r in range(WORLD):
        assert owned[r] == {i for i, o in enumerate(per_rank[r]["owner_rank"]) if o == r}
        assert per_rank[r]["owner_rank"] == per_rank[0]["owner_rank"]  # all ranks agree on owners
        # one NS call per owned matrix per step, nothing else
        assert len(per_rank[r]["ns_calls"]) == STEPS * len(owned[r])
    assert sum(len(p["ns_calls"]) for p in per_rank) == STEPS * len(MUON_SHAPES)
    # the work is shared: each rank orthogonalises some matrices
    assert all(len(o) >= 3 for o in owned)


def test_grad_norm_from_the_optimizers_shards_equals_the_one_process_norm(results):
    # issue 13 item 4: DistAdam's row shards (with pad rows) and Muon's owned matrices (with a short chunk)
    # cover the averaged gradient exactly once, so one scalar all-reduce gives the 1-process norm
    per_rank, single = results
    for r in range(WORLD):
        assert per_rank[r]["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-6), f"rank {r}"
