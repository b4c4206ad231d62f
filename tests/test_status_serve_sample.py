"""``anomap status --watch`` asks Ray for Serve per sample without staying a Ray driver: a driver is killed
by Ray about a minute after the cluster's GCS goes away, and the watch must live on and say so."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from cluster.servers import start_ray_head

SAMPLER = textwrap.dedent(
    """
    import json, sys
    import ray
    from cluster.status import serve_status
    from schemas import Settings

    settings = Settings(ray_address=sys.argv[1], state_dir=sys.argv[2])
    for _ in sys.stdin:  # one sample per line read
        sample = serve_status(settings)
        print(json.dumps({"serve": sample, "driver": ray.is_initialized()}), flush=True)
    """
)


def _sample(sampler: subprocess.Popen[str], timeout_s: float = 120.0) -> dict[str, Any]:
    assert sampler.stdin is not None and sampler.stdout is not None
    sampler.stdin.write("\n")
    sampler.stdin.flush()
    ready, _, _ = select.select([sampler.stdout], [], [], timeout_s)
    assert ready, f"no sample within {timeout_s} s"
    return json.loads(sampler.stdout.readline())


def test_serve_samples_leave_no_driver_and_say_when_ray_is_unreachable(tmp_path: Path) -> None:
    head = start_ray_head(tmp_path / "ray", num_cpus=1, dashboard=False, die_with_parent=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [sys.executable, "-c", SAMPLER, head.endpoint, str(tmp_path / "state")]
    sampler = subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        first, second = _sample(sampler), _sample(sampler)  # connects, disconnects, connects again
        assert not first["driver"] and not second["driver"]
        assert first["serve"] == second["serve"]
        head.stop()
        gone = _sample(sampler, timeout_s=30)
        assert not gone["driver"] and not gone["serve"]["available"]
        assert gone["serve"]["reason"].startswith("Ray: unreachable"), gone
        assert sampler.poll() is None  # still alive to take the next sample
    finally:
        sampler.kill()
        sampler.wait()
        head.stop()
