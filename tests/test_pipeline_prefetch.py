"""The producer thread the torch fallback finishes batches on: order, errors, stopping, resume, and
its GPU decode ordered after the work already queued on its stream."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from pipeline import torch_loader
from pipeline.loader import StageTimer, build_loader
from pipeline.torch_loader import prefetched
from pipeline_shards import data_config


def test_items_arrive_in_order_and_at_most_depth_ahead():
    made = []

    def items():
        for i in range(10):
            made.append(i)
            yield i

    consumer = prefetched(items, depth=2)
    assert next(consumer) == 0
    time.sleep(0.2)  # the producer runs ahead until the queue is full
    assert len(made) <= 1 + 2 + 1  # the one handed over, two queued, one waiting to be queued
    assert list(consumer) == list(range(1, 10))


def test_an_error_reaches_the_consumer_at_its_item():
    def items():
        yield 1
        raise ValueError("sample 2 is broken")

    consumer = prefetched(items, depth=4)
    assert next(consumer) == 1
    with pytest.raises(ValueError, match="sample 2 is broken"):
        next(consumer)


def test_closing_the_consumer_stops_and_joins_the_producer():
    closed = threading.Event()

    def items():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    consumer = prefetched(items, depth=2)
    assert next(consumer) == 0
    consumer.close()
    assert closed.is_set()  # the source was closed on the producer thread before close() returned
    assert not any(t.name == "batch-producer" for t in threading.enumerate())


def test_the_context_is_entered_on_the_producer_thread():
    entered = []

    class Recording:
        def __enter__(self):
            entered.append(threading.current_thread().name)

        def __exit__(self, *exc):
            return False

    assert list(prefetched(lambda: iter([1, 2]), depth=1, context=Recording)) == [1, 2]
    assert entered == ["batch-producer"]


def test_the_gpu_decode_waits_for_the_work_queued_on_its_stream_before_it_starts(monkeypatch):
    # torchvision decodes on a private stream into blocks allocated on the caller's stream, which
    # may still be read by the previous batch's queued resize (pytorch/vision PR #9606).
    calls = []

    class Stream:
        def synchronize(self):
            calls.append("wait for the producer's stream")

    def decode(jpegs, mode, device):
        calls.append(f"decode {len(jpegs)} on {device}")
        return [torch.full((3, 4, 6), 7, dtype=torch.uint8) for _ in jpegs]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch_loader, "decode_jpeg", decode)
    record = SimpleNamespace(original=(4, 6), resized=(8, 12), flipped=True, source=("shard.tar", "key"))
    samples = [{"jpeg": torch.zeros(8, dtype=torch.uint8), "record": record} for _ in range(2)]
    torch_loader.decode_and_transform(samples, torch.device("cuda"), StageTimer())
    assert calls == ["wait for the producer's stream", "decode 2 on cuda"]
    assert samples[0]["image"].shape == (8, 12, 3) and "jpeg" not in samples[0]
    calls.clear()
    torch_loader.decode_jpegs([torch.zeros(8, dtype=torch.uint8)], torch.device("cpu"))
    assert calls == ["decode 1 on cpu"]  # nothing to wait for on the CPU


def test_torch_loader_resumes_exactly_although_batches_were_prefetched(train_shards):
    def loader():
        return build_loader(data_config("data.flip_prob=0.5", "data.prefetch=3"), train_shards, training=True,
                            batch_size=2, seed=1, backend="torch")

    reference = [b.image_ids.tolist() for b in loader()]
    interrupted = loader()
    batches = iter(interrupted)
    head = [next(batches).image_ids.tolist() for _ in range(2)]
    time.sleep(0.3)  # let the producer run ahead of the two batches handed over
    state = interrupted.state_dict()
    batches.close()
    resumed = loader()
    resumed.load_state_dict(state)
    assert head + [b.image_ids.tolist() for b in resumed] == reference
