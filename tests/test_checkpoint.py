"""Unit tests of core/checkpoint.py: atomic write, verified read, discovery, pruning, --resume resolution,
the compatibility check, RNG capture, and the gathered optimizer state (one process and two gloo processes).

The whole-run behaviour (kill, resume, signals, NaN) is in tests/test_reliability.py.
"""
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core import checkpoint as ck
from core.config import TrainConfig
from core.optimizers import DistAdam, Muon


def payload(step: int, **extra) -> dict:
    return {"format": ck.FORMAT, "format_version": ck.FORMAT_VERSION, "step": step,
            "weights": torch.arange(1000, dtype=torch.float32) * step, **extra}


# ---------------------------------------------------------------------------------------------
# files


def test_save_load_round_trip_and_listing(tmp_path):
    for step in (12, 4, 8):
        ck.save_checkpoint(ck.checkpoint_path(tmp_path, step), payload(step))
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [4, 8, 12]
    loaded = ck.load_checkpoint(ck.checkpoint_path(tmp_path, 8))
    assert loaded["step"] == 8 and torch.equal(loaded["weights"], torch.arange(1000.0) * 8)
    assert not [p for p in ck.checkpoint_dir(tmp_path).iterdir() if p.name.startswith(".tmp-")]


def test_write_atomic_leaves_no_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "checkpoints" / "step_000001.pt"

    def failing(f):
        f.write(b"half of a checkpoint")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        ck.write_atomic(target, failing)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_truncated_file_is_refused(tmp_path):
    path = ck.save_checkpoint(ck.checkpoint_path(tmp_path, 4), payload(4))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="corrupt or truncated"):
        ck.load_checkpoint(path)


def test_flipped_byte_is_caught_by_the_crc_check(tmp_path):
    # torch.load alone would load this file and return wrong weights
    path = ck.save_checkpoint(ck.checkpoint_path(tmp_path, 4), payload(4))
    data = bytearray(path.read_bytes())
    offset = data.find((torch.arange(1000, dtype=torch.float32) * 4).numpy().tobytes())
    assert offset > 0
    data[offset + 400] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="fails its CRC check"):
        ck.load_checkpoint(path)


def test_foreign_file_and_other_version_are_refused(tmp_path):
    other = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, other)
    with pytest.raises(ck.CheckpointError, match="not a speedrun-mup checkpoint"):
        ck.load_checkpoint(other)
    newer = ck.save_checkpoint(tmp_path / "v9.pt", {**payload(1), "format_version": 9})
    with pytest.raises(ck.CheckpointError, match="format version 9"):
        ck.load_checkpoint(newer)
    with pytest.raises(ck.CheckpointError, match="no such file"):
        ck.load_checkpoint(tmp_path / "missing.pt")


def test_prune_keeps_the_newest_and_removes_stale_temporaries(tmp_path):
    for step in (2, 4, 6, 8):
        ck.save_checkpoint(ck.checkpoint_path(tmp_path, step), payload(step))
    stale = ck.checkpoint_dir(tmp_path) / ".tmp-step_000010.pt.12345"
    stale.write_bytes(b"partial")
    assert [p.name for p in ck.prune(tmp_path, 2)] == ["step_000002.pt", "step_000004.pt"]
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [6, 8]
    assert ck.prune(tmp_path, 0) == []  # 0 keeps all
    assert ck.remove_stale_temporaries(tmp_path) == [stale] and not stale.exists()


def test_newest_valid_skips_a_corrupt_newest_but_refuses_when_none_loads(tmp_path):
    for step in (4, 8):
        ck.save_checkpoint(ck.checkpoint_path(tmp_path, step), payload(step))
    ck.checkpoint_path(tmp_path, 8).write_bytes(b"garbage")
    lines = []
    path, loaded = ck.newest_valid(tmp_path, lines.append)
    assert loaded["step"] == 4 and path.name == "step_000004.pt"
    assert "skipping" in lines[0] and "step_000008.pt" in lines[0]
    ck.checkpoint_path(tmp_path, 4).write_bytes(b"garbage")
    with pytest.raises(ck.CheckpointError, match="no checkpoint in .* can be loaded"):
        ck.newest_valid(tmp_path, lines.append)


# ---------------------------------------------------------------------------------------------
# --resume


def cfg_for(tmp_path, **kw) -> TrainConfig:
    base = dict(width=64, depth=2, head_dim=16, seq_len=128, batch_tokens=128, log_dir=str(tmp_path))
    base.update(kw)
    return TrainConfig(**base)


def test_resume_auto_without_a_run_starts_fresh(tmp_path):
    cfg = cfg_for(tmp_path, resume="auto", run_name="exp")
    assert ck.resolve_resume(cfg, lambda m: None) == (None, None)
    assert cfg.run_name == "exp"


def test_resume_auto_finds_the_newest_checkpoint_of_the_named_run(tmp_path):
    run = tmp_path / "exp"
    for step in (3, 6):
        ck.save_checkpoint(ck.checkpoint_path(run, step), payload(step))
    cfg = cfg_for(tmp_path, resume="auto", run_name="exp")
    path, loaded = ck.resolve_resume(cfg, lambda m: None)
    assert loaded["step"] == 6 and path == ck.checkpoint_path(run, 6)


def test_resume_auto_without_run_name_picks_the_newest_run_of_the_same_kind(tmp_path):
    ck.save_checkpoint(ck.checkpoint_path(tmp_path / "speedrun_20250101_000000_w64", 5), payload(5))
    ck.save_checkpoint(ck.checkpoint_path(tmp_path / "speedrun_20250102_000000_w64", 7), payload(7))
    ck.save_checkpoint(ck.checkpoint_path(tmp_path / "speedrun_20250103_000000_w128", 9), payload(9))  # other width
    ck.save_checkpoint(ck.checkpoint_path(tmp_path / "speedrun_20250104_000000_mup_w64_base32", 9), payload(9))
    cfg = cfg_for(tmp_path, resume="auto")
    path, loaded = ck.resolve_resume(cfg, lambda m: None)
    assert loaded["step"] == 7 and cfg.run_name == "speedrun_20250102_000000_w64"
    cfg = cfg_for(tmp_path, resume="auto", mup=True, base_width=32)
    assert ck.resolve_resume(cfg, lambda m: None)[1]["step"] == 9


def test_resume_path_to_a_file_or_a_folder_continues_in_its_run_folder(tmp_path):
    run = tmp_path / "logs" / "exp"
    ck.save_checkpoint(ck.checkpoint_path(run, 2), payload(2))
    ck.save_checkpoint(ck.checkpoint_path(run, 4), payload(4))
    cfg = cfg_for(tmp_path / "elsewhere", resume=str(ck.checkpoint_path(run, 2)))
    path, loaded = ck.resolve_resume(cfg, lambda m: None)
    assert loaded["step"] == 2 and cfg.log_dir == str(run.parent) and cfg.run_name == "exp"
    cfg = cfg_for(tmp_path, resume=str(run))
    assert ck.resolve_resume(cfg, lambda m: None)[1]["step"] == 4
    cfg = cfg_for(tmp_path, resume=str(tmp_path))  # a folder with no checkpoints
    with pytest.raises(ck.CheckpointError, match="no checkpoints"):
        ck.resolve_resume(cfg, lambda m: None)


@pytest.mark.parametrize("field,value", [("width", 128), ("depth", 4), ("head_dim", 32), ("vocab_size", 50304),
                                         ("seq_len", 256), ("batch_tokens", 256), ("mup", True)])
def test_compatibility_check_names_the_field(tmp_path, field, value):
    saved = {"config": cfg_for(tmp_path).to_dict()}
    cfg = cfg_for(tmp_path, **{field: value})
    if field == "mup":
        cfg.base_width = 32
    with pytest.raises(ck.CheckpointError, match=f"{field} was"):
        ck.check_compatible(saved, cfg, "ck.pt")


def test_compatibility_check_lists_allowed_changes(tmp_path):
    saved = {"config": cfg_for(tmp_path, mup=True, base_width=32).to_dict()}
    with pytest.raises(ck.CheckpointError, match="base_width was 32"):
        ck.check_compatible(saved, cfg_for(tmp_path, mup=True, base_width=16), "ck.pt")
    changes = ck.check_compatible(saved, cfg_for(tmp_path, mup=True, base_width=32, iterations=99, adam_lr=0.01,
                                                 resume="auto"), "ck.pt")
    assert sorted(c.split(":")[0] for c in changes) == ["adam_lr", "iterations"]


def test_truncate_metrics_drops_rows_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    size = path.stat().st_size
    with open(path, "a") as f:
        f.write('{"step": 3}\n{"step": 4}\n')
    assert ck.truncate_metrics(tmp_path, size) == 2
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert ck.truncate_metrics(tmp_path, size) == 0


# ---------------------------------------------------------------------------------------------
# RNG and finiteness


def test_rng_states_round_trip_through_a_checkpoint_file(tmp_path):
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = ck.capture_rng(torch.device("cpu"))
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ck.save_checkpoint(tmp_path / "r.pt", {**payload(1), "rng": [state]})
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ck.restore_rng(ck.load_checkpoint(tmp_path / "r.pt")["rng"][0], torch.device("cpu"))
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_first_non_finite_names_the_tensor():
    tree = {"model": {"a": torch.ones(3), "b": torch.tensor([1.0, float("inf")])}, "ids": torch.tensor([1, 2])}
    assert ck.first_non_finite(tree) == "model.b"
    assert ck.first_non_finite({"x": [torch.zeros(2), torch.tensor(float("nan"))]}) == "x.1"
    assert ck.first_non_finite({"x": torch.zeros(2)}) is None


# ---------------------------------------------------------------------------------------------
# optimizer state: gather (one-process layout) and shard back

ADAM_SHAPES = [(6, 4), (5, 3), (7,), ()]  # rows divisible by 2, not divisible (padded), odd vector, 0-d
MUON_SHAPES = [(8, 6)] * 3 + [(3, 6, 6)]


def build_opts(world_size: int, rank: int):
    g = torch.Generator().manual_seed(0)
    adam_p = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ADAM_SHAPES]
    muon_p = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in MUON_SHAPES]
    adam = DistAdam(adam_p, lr=0.01, rank=rank, world_size=world_size)
    muon = Muon(muon_p, lr=0.02, momentum=0.9, rank=rank, world_size=world_size)
    return adam, muon, adam_p + muon_p


def take_steps(opts, params, steps: int, rank: int):
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + 10 * i + rank))
        for opt in opts:
            opt.step()


def states_equal(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> bool:
    sa, sb = a.state_dict()["state"], b.state_dict()["state"]
    if sa.keys() != sb.keys():
        return False
    return all(torch.equal(x, sb[i][k]) if isinstance(x, torch.Tensor) else x == sb[i][k]
               for i in sa for k, x in sa[i].items())


def test_one_process_gather_and_shard_round_trip(tmp_path):
    adam, muon, params = build_opts(1, 0)
    take_steps((adam, muon), params, 2, 0)
    full = {"adam": ck.gather_optimizer_state(adam), "muon": ck.gather_optimizer_state(muon)}
    ck.save_checkpoint(tmp_path / "o.pt", {**payload(2), "optimizers": full})
    loaded = ck.load_checkpoint(tmp_path / "o.pt")["optimizers"]
    adam2, muon2, _ = build_opts(1, 0)
    for group in adam2.param_groups:
        group["lr"] = 0.5  # the current run's hyperparameters win over the checkpoint's
    ck.shard_optimizer_state(adam2, loaded["adam"])
    ck.shard_optimizer_state(muon2, loaded["muon"])
    assert states_equal(adam, adam2) and states_equal(muon, muon2)
    assert adam2.param_groups[0]["lr"] == 0.5


def test_shard_refuses_a_different_parameter_layout():
    adam, muon, params = build_opts(1, 0)
    take_steps((adam, muon), params, 1, 0)
    full = ck.gather_optimizer_state(adam)
    other = DistAdam([torch.nn.Parameter(torch.zeros(6, 4))], lr=0.01)
    with pytest.raises(ck.CheckpointError, match="parameter groups of sizes"):
        ck.shard_optimizer_state(other, full)
    full["state"][0]["exp_avg"] = torch.zeros(9, 9)
    adam2, _, _ = build_opts(1, 0)
    with pytest.raises(ck.CheckpointError, match="shape"):
        ck.shard_optimizer_state(adam2, full)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        adam, muon, params = build_opts(2, rank)
        take_steps((adam, muon), params, 2, rank)
        full = {"adam": ck.gather_optimizer_state(adam), "muon": ck.gather_optimizer_state(muon)}
        # shard the gathered state back into fresh 2-rank optimizers: each rank must get exactly its own share
        adam2, muon2, _ = build_opts(2, rank)
        ck.shard_optimizer_state(adam2, full["adam"])
        ck.shard_optimizer_state(muon2, full["muon"])
        same = states_equal(adam, adam2) and states_equal(muon, muon2)
        torch.save({"full": full, "same": same, "params": [p.detach() for p in params]}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_state_gathers_to_the_one_process_layout_and_shards_back(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["same"] and r1["same"], "a rank's re-sharded state differs from the state it had"
    # both ranks gathered the same full state, shaped like the parameters (one-process layout)
    for name in ("adam", "muon"):
        s0, s1 = r0["full"][name]["state"], r1["full"][name]["state"]
        assert s0.keys() == s1.keys() == set(range(len(ADAM_SHAPES) if name == "adam" else len(MUON_SHAPES)))
        for i in s0:
            for k, v in s0[i].items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, s1[i][k])
                    shapes = ADAM_SHAPES if name == "adam" else MUON_SHAPES
                    assert tuple(v.shape) == shapes[i], (name, i, k)
    # the 2-rank run equals a 1-process run fed the averaged gradients: its gathered state loads into
    # a one-process optimizer and matches that run's state up to float rounding (a 2 -> 1 process resume)
    adam, muon, params = build_opts(1, 0)
    for step in range(2):
        for i, p in enumerate(params):
            grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + 10 * i + r))
                     for r in (0, 1)]
            p.grad = (grads[0] + grads[1]) / 2
        adam.step(), muon.step()
    adam1, muon1, _ = build_opts(1, 0)
    ck.shard_optimizer_state(adam1, r0["full"]["adam"])
    ck.shard_optimizer_state(muon1, r0["full"]["muon"])
    for ref, got in ((adam, adam1), (muon, muon1)):
        sr, sg = ref.state_dict()["state"], got.state_dict()["state"]
        for i in sr:
            for k, v in sr[i].items():
                if isinstance(v, torch.Tensor):
                    torch.testing.assert_close(sg[i][k], v, rtol=1e-5, atol=1e-6)
                else:
                    assert sg[i][k] == v
    for p, q in zip(params, r0["params"]):
        torch.testing.assert_close(p.detach(), q, rtol=1e-4, atol=1e-5)
