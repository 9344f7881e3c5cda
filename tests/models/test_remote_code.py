"""An export is a model anyone can load without tttexp: the code beside the weights is generated from the package,
names nothing of it, and computes what the package computes (one subprocess checks every variant, and runs
lm-evaluation-harness's own ``hf`` model on one export)."""

from __future__ import annotations

import ast
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from support import one_thread, rolling_nll, small_tokenizer
from tttexp.models import TTTConfig, TTTForCausalLM, remote_code

HERE = Path(__file__).parent
REPO = HERE.parents[1]
TASKS = REPO / "tests/app/harness"  # a local perplexity task (data path relative to the repository root)
TASK_TEXTS = [json.loads(line)["text"] for line in (TASKS / "ttt_local.jsonl").read_text().splitlines() if line]
TEXT = "The state of the union is strong; 1,234 tokens."

# Both inner models, both backbones, and hybrids with softmax-attention layers (GQA in one, the gated TTT
# output in the other). The first goes through the export app from a run checkpoint with its tokenizer.
VARIANTS = {
    "linear-mamba": {"ttt_layer": "linear", "backbone": "mamba"},
    "mlp-transformer": {"ttt_layer": "mlp", "backbone": "transformer"},
    "hybrid-linear-transformer": {"ttt_layer": "linear", "backbone": "transformer",
                                  "mixer_types": ["attention", "ttt"], "num_key_value_heads": 1},
    "hybrid-mlp-mamba": {"ttt_layer": "mlp", "backbone": "mamba", "mixer_types": ["ttt", "attention"],
                         "ttt_output_gate": True},
}
# The exported Triton kernels, under Triton's interpreter where there is no GPU (conftest sets it; on a GPU
# machine tests/gpu/test_remote_code_gpu.py runs them for real).
if os.environ.get("TRITON_INTERPRET") == "1":
    VARIANTS["triton-linear-mamba"] = {"ttt_layer": "linear", "backbone": "mamba", "kernel": "triton"}
    VARIANTS["triton-mlp-transformer"] = {"ttt_layer": "mlp", "backbone": "transformer", "kernel": "triton"}


def _tokenizer():
    return small_tokenizer([TEXT, "Every ship that left the harbour carried grain, timber and letters."] * 4)


def _model(vocab: int, seed: int, **options) -> TTTForCausalLM:
    torch.manual_seed(seed)
    config = TTTConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, **options)
    model = TTTForCausalLM(config).eval()
    with torch.no_grad():  # every parameter away from its initial value (gates that start at 0 included)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _export_through_the_app(model: TTTForCausalLM, tokenizer, run_dir: Path, out: Path) -> Path:
    from tttexp.app.export import export
    from tttexp.training.checkpoint import save_checkpoint
    from tttexp.training.rundir import TOKENIZER_DIR

    path = save_checkpoint(run_dir, 3, {"step": 3, "model": model.state_dict(),
                                        "model_config": model.config.to_dict()})
    tokenizer.save_pretrained(run_dir / TOKENIZER_DIR)
    return export(path, out)


def test_export_loads_without_tttexp(tmp_path):
    with one_thread():
        _export_and_load_without_tttexp(tmp_path)


def _export_and_load_without_tttexp(tmp_path: Path) -> None:
    tokenizer = _tokenizer()
    vocab = len(tokenizer)
    ids = torch.randint(0, vocab, (2, 37), generator=torch.Generator().manual_seed(1))
    cases = []
    for seed, (name, options) in enumerate(VARIANTS.items()):
        model = _model(vocab, seed, **options)
        out = tmp_path / name
        if seed == 0:
            _export_through_the_app(model, tokenizer, tmp_path / "run", out)
        else:
            model.save_pretrained(out)
            remote_code.write(out)
        with torch.no_grad():
            want = {"ids": ids, "logits": model(ids).logits, "prompt": ids[:1, :5]}
        want["generated"] = model.generate(want["prompt"], max_new_tokens=16, do_sample=False)
        torch.save(want, tmp_path / f"{name}.pt")
        cases.append({"name": name, "dir": str(out), "want": str(tmp_path / f"{name}.pt"), "untrusted": seed == 0,
                      "tokenizer_text": TEXT if seed == 0 else None, "harness": str(TASKS) if seed == 0 else None})
        if seed == 0:
            rolling = rolling_nll(model, tokenizer, TASK_TEXTS)
    (tmp_path / "cases.json").write_text(json.dumps(cases))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")  # TRITON_INTERPRET stays as conftest set it
    done = subprocess.run([sys.executable, str(HERE / "load_without_tttexp.py"), str(tmp_path / "cases.json"),
                           str(tmp_path / "result.json")], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result.pop("_tttexp_modules") == []
    for name, options in VARIANTS.items():
        row = result[name]
        assert row["class"].startswith("transformers_modules.") and row["class"].endswith(
            "modeling_tttexp.TTTForCausalLM"), name
        assert row["max_logit_diff"] <= 1e-5, (name, row["max_logit_diff"])
        assert row["generate_equal"] and row["new_tokens"] == 16, name
        assert row["mixers"] == options.get("mixer_types", ["ttt", "ttt"]), name
        triton = options.get("kernel") == "triton"
        assert row["kernel"] == ("triton" if triton else "torch"), name
        if triton:  # the export's own kernel modules, not the package's
            assert row["kernel_modules"] == ["ops_ttt_linear_op", "ops_ttt_mlp_op"], name
    first = result["linear-mamba"]
    assert first["tokens"] == tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert "trust_remote_code=True" in first["untrusted"] and "contains custom code" in first["untrusted"]
    words = sum(len(re.split(r"\s+", t)) for t in TASK_TEXTS)
    assert first["harness"]["word_perplexity,none"] == pytest.approx(math.exp(rolling / words), rel=1e-4)
    exported = json.loads((tmp_path / "linear-mamba" / "config.json").read_text())
    assert exported["auto_map"] == remote_code.AUTO_MAP and (tmp_path / "linear-mamba" / "model.safetensors").is_file()


def test_generated_code_is_the_package_code_without_tttexp():
    files = remote_code.generate()
    modules = {f"{remote_code.flat_name(m)}.py": m for m in remote_code.closure()}
    assert set(files) == set(modules)
    assert {"configuration_tttexp.py", "modeling_tttexp.py"} <= set(files)
    for name, text in files.items():
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != "tttexp" for a in node.names), name
            elif isinstance(node, ast.ImportFrom) and node.level:
                assert f"{node.module}.py" in files, (name, node.module)  # every relative import is shipped
            elif isinstance(node, ast.ImportFrom):
                assert node.module.split(".")[0] != "tttexp", (name, node.module)
        # every definition of the package module it comes from, and nothing else but the generator's own names
        package = _defined(ast.parse(remote_code.module_file(modules[name]).read_text()))
        assert _defined(tree) - {"_MODULE", "_OP_NAMESPACE"} == package, name
    # the kernels' op names leave the package's namespace; triton imports can fail quietly for transformers
    assert '"tttexp::' not in files["ops_ttt_linear_op.py"] and "_OP_NAMESPACE" in files["ops_ttt_linear_op.py"]
    assert "try:  # imported only where triton runs" in files["ops_triton_utils.py"]


def _defined(tree: ast.Module) -> set[str]:
    """Names a module defines at its top level (functions, classes, assignments)."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
    return names


def test_generator_refuses_forms_it_does_not_rewrite():
    node = ast.parse("import tttexp.ops as o").body[0]
    with pytest.raises(remote_code.RemoteCodeError, match="binds a tttexp name"):
        remote_code._rewrite_import(node, "tttexp.models.modeling")
    node = ast.parse("from tttexp.ops import *").body[0]
    with pytest.raises(remote_code.RemoteCodeError, match="import \\*"):
        remote_code._rewrite_import(node, "tttexp.models.modeling")
    with pytest.raises(remote_code.RemoteCodeError, match="still names tttexp"):
        remote_code._check("import tttexp\n", "x")
    with pytest.raises(remote_code.RemoteCodeError, match="names tttexp at run time"):
        remote_code._check("op = torch.library.custom_op('tttexp::f', mutates_args=())\n", "x")
