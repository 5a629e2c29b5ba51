"""SpotServe's measured latency profiles (its artifact's ``T4-4x_megatron_*.json``) as a
`MeasuredProfile` (pure: the dict is decoded by the caller).

SpotServe's format: ``"tp-<M>": {"bsz-<b>": {"init": ms per layer for a 512-token prefill,
"incr": ms per layer per decode step}}``, ``embed`` ms for batch 1/2/4/8, ``pp_init_comm`` /
``pp_incr_comm`` ms per pipeline hop, ``final_fix_factor``. The artifact adds two embedding times
per request: we put them on the prefill (`head.prefill`), none on each decode step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from elastic_llm.planning.errors import ProfileError
from elastic_llm.planning.measured import FORMAT, MeasuredProfile

#: Prompt tokens SpotServe's ``init`` times were measured with.
SPOTSERVE_PROMPT_TOKENS = 512
#: One T4's memory (bytes), all of it usable for weights + KV as the artifact assumes.
T4_MEMORY_BYTES = 16 * 10**9
#: The instances' network in SpotServe's setup (50 Gbps), bytes/s.
SPOTSERVE_NETWORK = 50e9 / 8
_BATCHES = (1, 2, 4, 8)


def spotserve_profile(data: Mapping[str, Any], model: str | None = None,
                      device_memory_bytes: int = T4_MEMORY_BYTES,
                      network_bandwidth: float = SPOTSERVE_NETWORK, max_tensor: int | None = None) -> MeasuredProfile:
    """A `MeasuredProfile` (one GPU per worker) from SpotServe's profile dict.

    `model`: the `ModelSpec.name` it times (None: any). `max_tensor`: the largest tensor degree
    kept; None: the profile's own ``max_tp``, the bound the artifact's optimizer searches (8 for
    GPT-20B: a tensor group of two 4-GPU instances; every degree when the file has no ``max_tp``).
    Raises `ProfileError` on a malformed dict."""
    try:
        if max_tensor is None:
            max_tensor = int(data.get("max_tp", 1 << 30))
        degrees = sorted(m for m in (int(key[3:]) for key in data if str(key).startswith("tp-")) if m <= max_tensor)
        prefill = {str(m): {str(int(b[4:])): float(v["init"]) / 1000.0 for b, v in data[f"tp-{m}"].items()}
                   for m in degrees}
        decode = {str(m): {str(int(b[4:])): float(v["incr"]) / 1000.0 for b, v in data[f"tp-{m}"].items()}
                  for m in degrees}
        embed = [float(x) / 1000.0 for x in data["embed"]]
        head_prefill = {str(b): 2.0 * e for b, e in zip(_BATCHES, embed, strict=False)}
        hops = {"prefill": {str(b): float(data["pp_init_comm"]) / 1000.0 for b in _BATCHES},
                "decode": {str(b): float(data["pp_incr_comm"]) / 1000.0 for b in _BATCHES}}
        name = str(data.get("name", "spotserve"))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ProfileError(f"malformed SpotServe profile: {err!r}") from None
    if not degrees:
        raise ProfileError("SpotServe profile has no 'tp-<M>' tables")
    return MeasuredProfile({
        "format": FORMAT, "name": name, "model": model, "input_len": SPOTSERVE_PROMPT_TOKENS,
        "devices_per_instance": 1, "device_memory_bytes": int(device_memory_bytes),
        "network_bandwidth": float(network_bandwidth),
        "layer": {"prefill": prefill, "decode": decode},
        "head": {"prefill": {str(m): head_prefill for m in degrees}, "decode": {}},
        "stage_hop": hops,
        "settings": {"source": "SpotServe artifact profile", "final_fix_factor": data.get("final_fix_factor")},
    })
