"""An export on a GPU: the code beside the weights picks the Triton kernels (its own copies, under its own op
namespace, loaded next to the package's in one process) and computes what the package computes."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from tttexp.models import TTTConfig, TTTForCausalLM, remote_code

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("layer", ["linear", "mlp"])
def test_export_runs_its_triton_kernels(tmp_path, layer):
    torch.manual_seed(0)
    config = TTTConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, ttt_layer=layer, mixer_types=["ttt", "attention"])
    model = TTTForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(tmp_path)
    remote_code.write(tmp_path)
    model.cuda()
    # AutoModelForCausalLM would pick the package's classes here (tttexp registered them in this process)
    remote_class = get_class_from_dynamic_module("modeling_tttexp.TTTForCausalLM", tmp_path)
    remote = remote_class.from_pretrained(tmp_path).cuda().eval()
    assert type(remote).__module__.startswith("transformers_modules.")
    assert model.resolved_kernel("cuda") == "triton" and remote.resolved_kernel("cuda") == "triton"

    ids = torch.randint(0, 512, (2, 100), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        want, got = model(ids).logits, remote(ids).logits
        model.config.kernel = "torch"
        reference = model(ids).logits
        model.config.kernel = "auto"
    assert (got - want).abs().max() <= 1e-5
    assert (got - reference).abs().max() <= 5e-3 * reference.abs().max()
    # the export's own kernel module ran, not the package's
    ops = [name for name in sys.modules if name.startswith("transformers_modules.")
           and name.endswith(f"ops_ttt_{layer}_op")]
    assert ops and sys.modules[ops[0]]._OP_NAMESPACE != "tttexp"

    prompt = ids[:1, :20]
    generated = remote.generate(prompt, max_new_tokens=16, do_sample=False)
    assert torch.equal(generated, model.generate(prompt, max_new_tokens=16, do_sample=False))
    assert generated.shape[1] == 36
