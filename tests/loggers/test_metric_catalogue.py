from tttexp.loggers import catalogue as cat
from tttexp.loggers.health import KINDS, HealthMonitor

REQUIRED = [
    "train/loss", "train/learning_rate", "train/tokens_per_sec", "train/grad_norm", "train/tokens_seen",
    "train/step_time_ms", "val/loss", "val/ppl", "model/total_parameters", "model/hidden_size",
    "model/num_layers", "model/ttt_layer", "model/state_passing", "system/gpu_memory_allocated",
    "system/gpu_memory_reserved", "system/num_processes", "system/mfu", "state/resets", "state/w_norm",
    "inference/prefill_ms", "inference/decode_tokens_per_sec", "summary/total_time",
    "summary/avg_tokens_per_sec", "summary/final_loss",
]  # fmt: skip


def test_every_contract_name_is_described() -> None:
    for name in REQUIRED:
        assert name in cat.DESCRIPTIONS, name
        assert cat.DESCRIPTIONS[name].strip() and "\n" not in cat.DESCRIPTIONS[name]


def test_open_families_are_described() -> None:
    assert set(cat.FAMILIES) == {"state/", "inference/", "warnings/", "harness/"}
    assert cat.describe("state/resets") == cat.DESCRIPTIONS["state/resets"]
    assert cat.describe("inference/decode_ms_p50") == cat.FAMILIES["inference/"]
    assert cat.describe("nothing/here") is None


def test_warning_counters_match_the_health_kinds() -> None:
    catalogued = {name for name in cat.DESCRIPTIONS if name.startswith(cat.WARNINGS)}
    catalogued -= {cat.WARN_NONFINITE_STEPS, cat.WARN_RECOMPILES}  # the trainer's own counters
    assert catalogued == {f"warnings/{kind}" for kind in KINDS} == set(HealthMonitor().counts())


def test_model_facts_selects_model_keys() -> None:
    facts = {"model/hidden_size": 64, "world_size": 2, "model/ttt_layer": "mlp", "seed": 1}
    assert cat.model_facts(facts) == {"model/hidden_size": 64, "model/ttt_layer": "mlp"}
