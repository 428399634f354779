"""pick_device inside real Ray workers (issue 21): an actor that asked Ray for no GPU stays on CPU even where CUDA
is visible (patched in: this host has no GPU), and the driver is not mistaken for a worker."""

from __future__ import annotations


def test_actor_without_a_ray_gpu_stays_on_cpu(ray_session) -> None:
    ray = ray_session

    @ray.remote(num_cpus=0.1, num_gpus=0)
    class Probe:
        def devices(self) -> tuple[list[str] | None, str]:
            import torch

            from raypipe.device import pick_device, ray_gpu_ids

            torch.cuda.is_available = lambda: True  # as on a GPU node
            return ray_gpu_ids(), str(pick_device())

    from raypipe.device import ray_gpu_ids

    probe = Probe.remote()
    try:
        ids, device = ray.get(probe.devices.remote(), timeout=120)
    finally:
        ray.kill(probe)
    assert ids == [] and device == "cpu"  # a Ray worker with no assigned GPU
    assert ray_gpu_ids() is None  # the driver is not a Ray worker: nothing assigns it GPUs
