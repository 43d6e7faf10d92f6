"""FSDP2 shards Infinity by block chunk (upstream's wrapping units) and computes the same
loss and gradients as one process (2 gloo ranks on CPU)."""

import os
import socket

import torch
import torch.multiprocessing as mp

CFG = {"tokenizer": {"codebook_dim": 6, "base_ch": 24, "ch_mult": (1, 1), "patch_size": 2},
       "backbone": {"depth": 4, "embed_dim": 64, "num_heads": 2, "block_chunks": 2, "text_channels": 16,
                    "text_maxlen": 8, "drop_path_rate": 0.0, "cond_drop_rate": 0.0}}   # no random draws


def _model_and_inputs():
    from sar_adapters.infinity import InfinityAdapter

    torch.manual_seed(0)
    ad = InfinityAdapter.from_config(CFG)
    s = ad.default_schedule
    cond = ad.text_condition(torch.randn(5, 16), [2, 3])
    return ad.backbone, cond, torch.randn(2, s.total_tokens - 1, 6), s


def _worker(rank, port, out):
    import torch.distributed as dist

    from sar_core.train.distributed import _fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        m, cond, x, s = _model_and_inputs()
        m.train()
        _fully_shard(m, None)   # the trainer's FSDP2 wrapping
        loss = m(cond, x, s).square().mean()
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in m.named_parameters() if p.grad is not None}
        if rank == 0:
            torch.save({"loss": loss.detach(), "grads": grads}, out)
    finally:
        dist.destroy_process_group()


def test_fsdp2_by_chunk_matches_one_process(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(port, str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    m, cond, x, s = _model_and_inputs()
    m.train()
    loss = m(cond, x, s).square().mean()
    loss.backward()
    assert torch.allclose(got["loss"], loss.detach(), atol=1e-6)
    want = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(got["grads"]) == set(want) and any(k.startswith("block_chunks.1.module.1.") for k in want)
    for n in want:
        assert torch.allclose(got["grads"][n], want[n], atol=1e-6, rtol=1e-5), n
