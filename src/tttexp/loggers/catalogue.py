"""The metric catalogue: every key the trainer logs, with its meaning and unit.

Names are a contract shared by the trainer, the loggers, the plots and the dashboards; change them only
together. ``DESCRIPTIONS`` maps each exact name to a one-line description, ``FAMILIES`` describes the open
families (``state/``, ``inference/``, ``warnings/``) whose members may grow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DESCRIPTIONS: dict[str, str] = {}
FAMILIES: dict[str, str] = {}


def _metric(name: str, description: str) -> str:
    DESCRIPTIONS[name] = description
    return name


def _family(prefix: str, description: str) -> str:
    FAMILIES[prefix] = description
    return prefix


# The x axis of every series; each logged record carries it (see WandbLogger).
STEP = _metric("train/step", "optimizer step the record belongs to; the x axis of every series")

TRAIN_LOSS = _metric("train/loss", "training cross-entropy in nats per token, mean over the logging interval")
TRAIN_LEARNING_RATE = _metric("train/learning_rate", "learning rate of the first parameter group")
TRAIN_TOKENS_PER_SEC = _metric("train/tokens_per_sec", "training throughput over the interval, all processes")
TRAIN_GRAD_NORM = _metric("train/grad_norm", "global L2 norm of the gradients before clipping")
TRAIN_TOKENS_SEEN = _metric("train/tokens_seen", "cumulative training tokens, all processes")
TRAIN_STEP_TIME_MS = _metric("train/step_time_ms", "wall time of one optimizer step in milliseconds")
TRAIN_PREFIX = "train/"
TRAIN_NONFINITE_STEPS = _metric("train/nonfinite_steps", "steps of the interval whose loss or gradient norm was not "
                                "finite; train/loss and train/grad_norm are the means of the others")

VAL_PREFIX = "val/"
VAL_LOSS = _metric("val/loss", "validation cross-entropy in nats per token")
VAL_PPL = _metric("val/ppl", "validation perplexity, exp(val/loss)")
VAL_TOKENS = _metric("val/tokens", "tokens scored by python -m tttexp.eval")
VAL_PPL_BY_POSITION = _metric("val/ppl_by_position", "table: perplexity by position, up to 4x the training length")
VAL_PASSKEY = _metric("val/passkey", "table: passkey retrieval by length and depth")
VAL_PASSKEY_ACCURACY = _metric("val/passkey_accuracy", "passkey retrieval accuracy of python -m tttexp.eval (0 to 1)")

MODEL_TOTAL_PARAMETERS = _metric("model/total_parameters", "number of trainable parameters")
MODEL_HIDDEN_SIZE = _metric("model/hidden_size", "width of the residual stream")
MODEL_NUM_LAYERS = _metric("model/num_layers", "number of transformer blocks")
MODEL_TTT_LAYER = _metric("model/ttt_layer", "kind of TTT layer, e.g. linear or mlp")
MODEL_STATE_PASSING = _metric("model/state_passing", "whether the TTT state is carried across sequences")
MODEL_MIXER = _metric("model/mixer", "sequence mixer of the layers: ttt, attention, or one entry per layer")
MODEL_BACKBONE = _metric("model/backbone", "block layout: mamba or transformer")
MODEL_KERNEL = _metric("model/kernel", "the TTT kernel that runs on this device")
MODEL_PRESET = _metric("model/preset", "model preset name (or from_pretrained)")
MODEL_BASE_MODEL = _metric("model/base_model", "the pretrained model a from_pretrained run starts from")
MODEL_BASE_VAL_LOSS = _metric("model/base_val_loss", "validation loss of the pretrained base before conversion")
MODEL_CONVERTED_VAL_LOSS = _metric("model/converted_val_loss", "validation loss right after conversion to TTT")
MODEL_NUM_CONVERTED_LAYERS = _metric("model/num_converted_layers", "layers of the base replaced by TTT layers")

TRAINER_PRECISION = _metric("trainer/precision", "numeric precision the run trains in")
TRAINER_COMPILE = _metric("trainer/compile", "torch.compile as resolved on this device (off after a CPU fallback)")

SYSTEM_GPU_MEMORY_ALLOCATED = _metric("system/gpu_memory_allocated", "GPU memory held by tensors now, GiB")
SYSTEM_GPU_MEMORY_RESERVED = _metric("system/gpu_memory_reserved", "GPU memory reserved by the caching allocator, GiB")
SYSTEM_GPU_MEMORY_PEAK = _metric("system/gpu_memory_peak", "peak GPU memory held by tensors since the start, GiB")
SYSTEM_HOST_MEMORY_RSS = _metric("system/host_memory_rss", "resident host memory of the main process now, GiB")
SYSTEM_HOST_MEMORY_PEAK = _metric("system/host_memory_peak", "peak resident host memory of the main process, GiB")
SYSTEM_NUM_PROCESSES = _metric("system/num_processes", "number of training processes (world size)")
SYSTEM_DISTRIBUTED = _metric("system/distributed", "the process layout the run used (distributed=...): single, ddp "
                             "or fsdp; a fact of the run, recorded once")
SYSTEM_MFU = _metric("system/mfu", "model FLOPs utilisation, fraction of the peak of the accelerator (0 to 1)")

STATE = _family("state/", "state passing: resets and norms of the carried TTT state")
STATE_RESETS = _metric("state/resets", "carried-state resets since the start of training (cumulative)")
STATE_W_NORM = _metric("state/w_norm", "mean Frobenius norm of the carried fast weights W")

INFERENCE = _family("inference/", "decoding benchmarks: prefill and per-token timing")
INFERENCE_PREFILL_MS = _metric("inference/prefill_ms", "wall time to prefill the prompt in milliseconds")
INFERENCE_DECODE_TOKENS_PER_SEC = _metric("inference/decode_tokens_per_sec", "generated tokens per second")
INFERENCE_DECODE_MS_PER_TOKEN = _metric("inference/decode_ms_per_token", "wall time per decoding step, ms")
INFERENCE_SAMPLE = _metric("inference/sample", "text: the validation prompt and the tokens generated after it")

PLOTS_LOSS = _metric("plots/loss", "image: training and validation loss curves")
PLOTS_PPL_BY_POSITION = _metric("plots/ppl_by_position", "image: perplexity by position")
PLOTS_PASSKEY = _metric("plots/passkey", "image: passkey retrieval by length and depth")

WARNINGS = _family("warnings/", "cumulative count of each health-warning kind (see tttexp.loggers.health), of "
                               "non-finite steps, and of frames compiled after the process's first step (recompiles)")
WARN_NONFINITE_LOSS = _metric("warnings/nonfinite_loss", "steps whose training loss was NaN or infinite")
WARN_NONFINITE_GRAD = _metric("warnings/nonfinite_grad", "steps whose gradient norm was NaN or infinite")
WARN_LOSS_SPIKE = _metric("warnings/loss_spike", "steps whose loss jumped far above its running median")
WARN_GRAD_SPIKE = _metric("warnings/grad_spike", "steps whose gradient norm jumped far above its running median")
WARN_THROUGHPUT_DROP = _metric("warnings/throughput_drop", "steps whose throughput fell far below its median")
WARN_STATE_GROWTH = _metric("warnings/state_growth", "steps where state/w_norm grew by a large factor")
WARN_NONFINITE_STEPS = _metric("warnings/nonfinite_steps", "optimizer steps whose loss or gradients were not finite")
WARN_RECOMPILES = _metric("warnings/recompiles", "frames compiled after the process's first step")

HARNESS = _family("harness/", "lm-evaluation-harness results of python -m tttexp.eval: harness/<task>/<metric> "
                              "as the harness names them (acc, acc_norm, perplexity, word_perplexity, ...)")
HARNESS_TASKS = _metric("harness/tasks", "the lm-evaluation-harness tasks of the run, comma-separated")
HARNESS_RESULTS = _metric("harness/results", "table: one row per task and metric")
HARNESS_RESULTS_FILE = _metric("harness/results_file", "file name of the harness results in the run directory")
HARNESS_SETTINGS = _metric("harness/settings", "the harness settings the results were computed with")

SUMMARY_PREFIX = "summary/"
#: ``warnings/<kind>`` counters are summarised as ``summary/warnings_<kind>``.
SUMMARY_WARNINGS_PREFIX = "summary/warnings_"
SUMMARY_TOTAL_TIME = _metric("summary/total_time", "wall time of the whole run in seconds")
SUMMARY_AVG_TOKENS_PER_SEC = _metric("summary/avg_tokens_per_sec",
                                     "steady-state training tokens/s: the steps after the first logged window")
SUMMARY_WALL_TOKENS_PER_SEC = _metric("summary/wall_tokens_per_sec",
                                      "training tokens over the whole run's wall time (compile and eval included)")
SUMMARY_COMPILE_TIME = _metric("summary/compile_time", "seconds in the process's first step (compile, warm-up)")
SUMMARY_TRAIN_TIME = _metric("summary/train_time", "seconds in the training steps after the first")
SUMMARY_EVAL_TIME = _metric("summary/eval_time", "seconds in validation, inference timing and end-of-run reports")
SUMMARY_OTHER_TIME = _metric("summary/other_time", "the rest of the wall time in seconds: checkpoints, logging")
SUMMARY_FINAL_LOSS = _metric("summary/final_loss", "last training loss")
SUMMARY_FINAL_VAL_LOSS = _metric("summary/final_val_loss", "last validation loss")
SUMMARY_FINAL_VAL_PPL = _metric("summary/final_val_ppl", "last validation perplexity")
SUMMARY_DATA_HASH = _metric("summary/data_hash", "hash of the training tokens consumed, in order (fair comparisons)")
SUMMARY_PPL_WITHIN_TRAIN = _metric("summary/ppl_within_train", "perplexity at positions within the training length")
SUMMARY_PPL_LATE = _metric("summary/ppl_late", "perplexity at the positions beyond the training length")
SUMMARY_POSITION_EVAL_LEN = _metric("summary/position_eval_len", "length of the perplexity-by-position evaluation")
SUMMARY_PASSKEY_ACCURACY = _metric("summary/passkey_accuracy", "passkey retrieval accuracy at the end (0 to 1)")
SUMMARY_STEPS = _metric("summary/steps", "optimizer steps taken")
SUMMARY_TOKENS_SEEN = _metric("summary/tokens_seen", "training tokens seen, all processes")
SUMMARY_TRAIN_FLOPS = _metric("summary/train_flops", "training FLOPs spent: tokens x (6 x parameters + 3 x mixers)")

#: Prefixes of the series plotted against STEP (everything but summary/*).
STEP_PREFIXES: tuple[str, ...] = ("train/", "val/", "model/", "system/", "state/", "inference/", "warnings/")

MODEL_PREFIX = "model/"


def describe(name: str) -> str | None:
    """The description of an exact name, else of its open family, else None."""
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    for prefix, text in FAMILIES.items():
        if name.startswith(prefix):
            return text
    return None


def model_facts(facts: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model/...`` entries of the derived facts, logged once at step 0."""
    return {key: value for key, value in facts.items() if key.startswith(MODEL_PREFIX)}
