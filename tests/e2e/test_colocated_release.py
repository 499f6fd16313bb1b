"""Colocated mode's cycle against a launched embedded server, as the loop drives it (issue 12 item 3).

A strict server with ``--enable-memory-saver`` (SGLang's flags, no CPU backup): the trainer syncs,
samples, releases every tag for its step (the rollout is refused meanwhile, naming why), resumes,
syncs again and samples the same seeded tokens. Extended (~30 s, most of it the server start): CI
runs the same server code in-process in tests/unit/test_server_pause_release.py
(test_memory_saver_release_frees_the_weights_until_they_are_sent_again) and the routes over HTTP there.
"""

import pytest
import torch

pytestmark = pytest.mark.extended


def test_release_resume_resync_cycle(tmp_path):
    from transformers import AutoModelForCausalLM

    from popo_mega.rollout.engine import SamplingParams
    from popo_mega.rollout.http_engine import HttpEngine, RolloutServerError
    from popo_mega.rollout.sglang_launcher import launch_servers, stop_servers
    from popo_mega.rollout.tiny_model import save_tiny_qwen2

    path = save_tiny_qwen2(str(tmp_path / "m"), seed=2)
    state = list(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict().items())
    servers = launch_servers("embedded", path, num_servers=1, device="cpu", dtype="float32", log_dir=str(tmp_path),
                             extra_args=("--enable-deterministic-inference", "--enable-memory-saver"))
    engine = HttpEngine([servers[0].url], sync_method="distributed", request_timeout_s=120, verify_probes=False)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    try:
        engine.sync_weights(state, "s0")
        before = [c.output_ids for c in engine.generate([[3, 4, 5]], sampling, n=2)[0]]
        engine.release_memory_occupation()
        with pytest.raises(RolloutServerError, match="memory is released"):
            engine.generate([[3, 4, 5]], sampling)
        engine.resume_memory_occupation()
        with pytest.raises(RolloutServerError, match="tensors have not been loaded since"):
            engine.generate([[3, 4, 5]], sampling)
        engine.sync_weights(state, "s1")
        after = engine.generate([[3, 4, 5]], sampling, n=2)[0]
    finally:
        engine.close()
        stop_servers(servers)
    assert [c.output_ids for c in after] == before
    assert [c.weight_version for c in after] == ["s1", "s1"]
