"""Run as a script by test_remote_code.py: load exported models the way a user without tttexp does.

``python load_without_tttexp.py CASES_JSON RESULT_JSON``: every import of ``tttexp`` fails in this process (a
finder placed first on ``sys.meta_path`` refuses it, whatever ``sys.path`` holds). For each case (an export
directory and the tensors tttexp computed there) it loads the model with ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)``, computes the logits and a greedy continuation, and records how far they are from
tttexp's; it also records what loading without ``trust_remote_code`` says and, for one case, what lm_eval's own
``hf`` model reports on a local perplexity task (run from the repository root: the task's data path is relative).
"""

from __future__ import annotations

import importlib.abc
import json
import sys
from pathlib import Path


class HideTTTExp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tttexp":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden from this process)", name=name)
        return None


sys.meta_path.insert(0, HideTTTExp())


def main(cases_file: str, result_file: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    results = {}
    for case in json.loads(Path(cases_file).read_text()):
        name, folder = case["name"], case["dir"]
        want = torch.load(case["want"], weights_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(want["ids"]).logits
        generated = model.generate(want["prompt"], max_new_tokens=16, do_sample=False)
        row = {
            "class": f"{type(model).__module__}.{type(model).__name__}",
            "max_logit_diff": float((logits - want["logits"]).abs().max()),
            "generate_equal": torch.equal(generated, want["generated"]),
            "new_tokens": generated.shape[1] - want["prompt"].shape[1],
            "mixers": [block.mixer for block in model.model.layers],
            "kernel": model.resolved_kernel(want["ids"].device.type),
        }
        package = type(model).__module__.rpartition(".")[0]
        row["kernel_modules"] = sorted(m.rpartition(".")[2] for m in sys.modules
                                       if m.startswith(package + ".") and m.endswith("_op"))
        if case.get("tokenizer_text"):
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            row["tokens"] = tokenizer(case["tokenizer_text"], add_special_tokens=False)["input_ids"]
        if case.get("harness"):  # the harness's own way in: `lm_eval --model hf --model_args pretrained=...`
            row["harness"] = _harness(folder, case["harness"])
        if case.get("untrusted"):
            try:
                AutoModelForCausalLM.from_pretrained(folder)
                row["untrusted"] = "loaded"
            except ValueError as err:
                row["untrusted"] = str(err)
        results[name] = row
    results["_tttexp_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "tttexp")
    Path(result_file).write_text(json.dumps(results))


def _harness(folder: str, include_path: str) -> dict:
    """A local task through lm_eval's ``hf`` model, as its command line builds it from ``--model_args``."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={folder},trust_remote_code=True", tasks=["ttt_local_rolling"],
        device="cpu", batch_size=4, bootstrap_iters=0,
        task_manager=TaskManager(include_path=include_path, include_defaults=False),
    )
    return results["results"]["ttt_local_rolling"]


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
