"""`elastic-llm profile` on a tiny checkpoint: the JSON loads into the cost model, shards follow
AutoTP, bad settings are refused."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from elastic_llm.cli import main
from elastic_llm.model.spec import ModelSpec
from elastic_llm.planning.config import ParallelConfig, Workload
from elastic_llm.planning.cost_model import CostModel
from elastic_llm.planning.measured import MeasuredProfile
from elastic_llm.planning.profiles import Phase
from elastic_llm.profiling import (
    ProfileResult,
    ProfileSettings,
    ProfilingError,
    default_degrees,
    format_table,
    profile_model,
    write_profile,
)
from elastic_llm.profiling.compute import open_checkpoint, rank_shard

TINY = "llama-gqa-untied"  # 4 heads, 2 KV heads, intermediate 96, 3 layers
SETTINGS = ProfileSettings(tensor_degrees=(1, 2), batch_sizes=(1, 2, 8), prefill_len=64,
                           context_len=64, repeats=3, measure_comm=False)

SMOLLM2_SHAPE = ModelSpec(name="smollm2-shape", model_type="llama", num_layers=30, hidden_size=576,
                          num_heads=9, num_kv_heads=3, head_dim=64, intermediate_size=1536,
                          vocab_size=49152, max_position_embeddings=8192)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint: Callable[[str], Path]) -> Path:
    return tiny_checkpoint(TINY)


@pytest.fixture(scope="module")
def profiled(tiny: Path) -> ProfileResult:
    return profile_model(tiny, SETTINGS)


def test_written_profile_loads_and_drives_the_cost_model(profiled: ProfileResult,
                                                         tmp_path: Path, tiny: Path) -> None:
    path = write_profile(profiled, tmp_path / "sub" / "profile.json")
    profile = MeasuredProfile.from_json(path)
    spec = open_checkpoint(tiny).spec
    assert profile.tensor_degrees() == (1, 2)
    assert profile.model_name == spec.name and profile.input_len == 64
    assert profile.to_dict()["machine"]["threads"] == 1  # informational keys survive loading
    cost = CostModel(spec, profile, Workload(input_len=64, output_len=16))
    estimates = {b: cost.estimate(ParallelConfig(1, 1, 1, b)) for b in (1, 8)}
    for estimate in estimates.values():
        for value in (estimate.prefill.total, estimate.decode_step.total, estimate.latency):
            assert math.isfinite(value) and value > 0
    # 8 requests of 64 tokens per layer against 1: more work, more time
    assert estimates[8].prefill.total > estimates[1].prefill.total
    assert estimates[8].decode_step.total > estimates[1].decode_step.total
    assert estimates[8].latency > estimates[1].latency
    # M=2 needs the tensor-parallel profile row
    tensor = cost.estimate(ParallelConfig(1, 1, 2, 2))
    assert math.isfinite(tensor.decode_step.total) and tensor.decode_step.total > 0


def test_json_tables_are_the_measurements(profiled: ProfileResult) -> None:
    data = profiled.to_json_dict()
    compute = profiled.compute
    for ph in Phase:
        for m in (1, 2):
            for b in (1, 2, 8):
                # no communication measured: a layer is its compute
                assert data["layer"][ph.value][str(m)][str(b)] == compute[ph][m][b] > 0
                assert data["head"][ph.value][str(m)][str(b)] == profiled.head[ph][m][b] > 0
    assert "tp_comm" not in data and "stage_hop" not in data
    assert data["settings"]["measure_comm"] is False
    assert data["settings"]["tensor_degrees"] == [1, 2]
    assert data["network_bandwidth"] > 0 and data["device_memory_bytes"] > 0
    assert "communication not measured" in data["measured"]["network_bandwidth_source"]
    table = format_table(profiled)
    assert "layer compute M=1" in table and "layer compute M=2" in table and "b=8" in table
    assert "embed+norm+LM head M=2" in table


def test_tp_comm_is_two_all_reduces_in_the_layer_time(profiled: ProfileResult, tiny: Path) -> None:
    with_comm = replace(profiled, all_reduce={ph: {2: {1: 0.001, 2: 0.002, 8: 0.004}}
                                               for ph in Phase},
                        stage_hop={ph: {1: 1e-4, 2: 2e-4, 8: 3e-4} for ph in Phase})
    data = with_comm.to_json_dict()
    assert data["tp_comm"]["decode"] == {"2": {"1": 0.002, "2": 0.004, "8": 0.008}}
    assert data["layer"]["decode"]["1"]["8"] == profiled.compute[Phase.DECODE][1][8]
    assert data["stage_hop"]["prefill"] == {"1": 1e-4, "2": 2e-4, "8": 3e-4}
    split = MeasuredProfile.from_json(data).layer_time(
        open_checkpoint(tiny).spec, Phase.DECODE, 2, 8, Workload(input_len=64))
    assert split.tp_comm == pytest.approx(0.008)
    assert split.compute == pytest.approx(profiled.compute[Phase.DECODE][2][8])
    assert "all-reduce x1, 2 procs" in format_table(with_comm)


def test_rank_zero_shard_follows_autotp() -> None:
    # DeepSpeed AutoTP sizes for SmolLM2 (ANCHORS.md): M=2 q [384, 192], MLP [768, 768]
    # and the LM head in 64-row granules (49152 rows = 768 granules)
    shard = rank_shard(SMOLLM2_SHAPE, 2)
    assert (shard.heads, shard.kv_heads, shard.intermediate) == ((0, 6), (0, 2), (0, 768))
    assert shard.vocab == (0, 24576)
    shard = rank_shard(SMOLLM2_SHAPE, 3)
    assert (shard.heads, shard.kv_heads, shard.intermediate) == ((0, 3), (0, 1), (0, 512))
    assert shard.vocab == (0, 16384)
    shard = rank_shard(SMOLLM2_SHAPE, 4)  # q [192, 192, 192, 0]; the MLP splits in four
    assert (shard.heads, shard.kv_heads, shard.intermediate) == ((0, 3), (0, 1), (0, 384))
    assert shard.vocab == (0, 12288)
    for degree in (2, 3, 4):
        shards = [rank_shard(SMOLLM2_SHAPE, degree, r) for r in range(degree)]
        assert [s.heads[0] for s in shards[1:]] == [s.heads[1] for s in shards[:-1]]
        assert [s.vocab[0] for s in shards[1:]] == [s.vocab[1] for s in shards[:-1]]
        assert shards[-1].heads[1] == 9 and shards[-1].intermediate[1] == 1536
        assert shards[-1].vocab[1] == 49152
    assert default_degrees(SMOLLM2_SHAPE) == (1, 2, 3)


@pytest.mark.parametrize("settings, message", [
    (ProfileSettings(tensor_degrees=(1, 10)), "larger than the model's 9 attention heads"),
    (ProfileSettings(layer=30), "layer 30 does not exist"),
    (ProfileSettings(prefill_len=9000), "context window"),
])
def test_settings_the_model_cannot_take_are_refused(settings: ProfileSettings,
                                                    message: str) -> None:
    with pytest.raises(ProfilingError, match=message):
        settings.for_model(SMOLLM2_SHAPE)


@pytest.mark.parametrize("fields", [
    {"batch_sizes": (1, 0)}, {"tensor_degrees": (-1,)}, {"prefill_len": 0},
    {"context_len": -5}, {"repeats": 0}, {"threads": 0}, {"batch_sizes": ()},
])
def test_non_positive_sizes_are_refused(fields: dict) -> None:
    with pytest.raises(ProfilingError):
        ProfileSettings(**fields)


def test_cli_writes_a_loadable_profile(tiny: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "cli.json"
    code = main(["profile", "--model", str(tiny), "--tensor", "1,2", "--batch", "1,2",
                 "--prefill-len", "8", "--context-len", "8", "--repeats", "1", "--no-comm",
                 "--output", str(output)])
    assert code == 0
    captured = capsys.readouterr()
    assert "layer compute M=2" in captured.out
    assert "[profile 8/8]" in captured.err  # (layer + head) x 2 degrees x 2 phases
    assert MeasuredProfile.from_json(output).tensor_degrees() == (1, 2)


@pytest.mark.parametrize("args, message", [
    (["--tensor", "5"], "tensor degree 5 is larger than the model's 4 attention heads"),
    (["--batch", "0,1"], "batch size must be a positive integer"),
    (["--prefill-len", "0"], "prefill-len must be a positive integer"),
])
def test_cli_bad_input_exits_2(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               args: list[str], message: str) -> None:
    output = tmp_path / "never.json"
    assert main(["profile", "--model", str(tiny), "--no-comm", "--output", str(output), *args]) == 2
    assert message in capsys.readouterr().err
    assert not output.exists()


def test_cli_unparsable_list_is_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", "--batch", "1,x"])
    assert exit_info.value.code == 2
    assert "comma-separated integers" in capsys.readouterr().err
