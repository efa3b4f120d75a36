"""A load holds the weights about once: its peak resident memory stays within what the loaded model holds plus
one matrix being converted (measured in a fresh process: its high-water RSS against the RSS before the load)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from chunkattn.model import quant
from server_helpers import TINY_CONFIG

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc (Linux)")

# ~160 M weights in 10 layers: the largest matrix (gate/up, 8 M) is small beside them, so a load that holds the
# weights twice (as read and as packed, or in the checkpoint's dtype and in the model's) exceeds the bound
SHAPE = {"model_type": "llama", "vocab_size": 8192, "hidden_size": 1024, "intermediate_size": 4096,
         "num_hidden_layers": 10, "num_attention_heads": 16, "num_key_value_heads": 4,
         "max_position_embeddings": 512, "tie_word_embeddings": False}

MEASURE = textwrap.dedent("""
    import json, sys
    import torch
    from chunkattn.model.layers import Embedding, Linear
    from chunkattn.model.loader import load_model, weight_bytes

    def status(key):  # (VmHWM, not ru_maxrss: that one keeps the parent's RSS at fork and exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) * 1024

    path, dtype, random_weights = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3] == "random"
    load_model(sys.argv[4], dtype=dtype, random_weights=True)  # (what any load imports and sets up, first)
    before = status("VmRSS")
    loaded = load_model(path, dtype=dtype, random_weights=random_weights, quantization=sys.argv[5])
    peak = status("VmHWM")
    largest = max(m.in_features * m.out_features if isinstance(m, Linear) else m.weight.numel()
                  for m in loaded.model.modules() if isinstance(m, (Linear, Embedding)))
    print(json.dumps({"before": before, "peak": peak, "held": weight_bytes(loaded.model)["total"],
                      "largest": largest}))
""")


def _measure(path, dtype: str, how: str, quantization: str = "none") -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # (the system allocator: glibc's frees)
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), dtype, how, str(TINY_CONFIG), quantization],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _check(m: dict, itemsize: int, mapped: int = 0, converting: int = 0) -> None:
    grew = m["peak"] - m["before"]
    # beside what stays held: one matrix drawn in float32 (random weights) or read in the checkpoint's dtype,
    # and one being packed (``converting`` bytes a weight more while it is quantized); the checkpoint's file
    # pages while it is mapped (``mapped`` bytes); 128 MiB for the allocator and the process's own growth
    bound = m["held"] + m["largest"] * (4 + itemsize + converting) + mapped + (128 << 20)
    assert m["held"] * 0.9 < grew <= bound, (f"the load grew the process by {grew / 2**20:.0f} MiB; the model "
                                             f"holds {m['held'] / 2**20:.0f} MiB (bound {bound / 2**20:.0f} MiB)")


def _checkpoint(directory: Path, shards: int = 1) -> dict[str, torch.Tensor]:
    """SHAPE's weights in bf16 (random, std 0.02), written to ``directory`` as a Hugging Face checkpoint."""
    from transformers import AutoConfig, LlamaForCausalLM

    from helpers import write_checkpoint

    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(AutoConfig.for_model(**SHAPE)).state_dict().items()}
    sd = {k: (torch.randn(s) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    write_checkpoint(directory, SHAPE, sd, shards)
    return sd


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_random_weights_load_holds_them_about_once(tmp_path, dtype):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(SHAPE))
    _check(_measure(config, dtype, "random"), getattr(torch, dtype).itemsize)


def test_a_bfloat16_checkpoint_loaded_in_float32_is_not_held_in_both(tmp_path):
    """Each tensor is cast as it is read (and the result equals casting the checkpoint's values)."""
    from chunkattn.model.loader import _safetensors_weights, load_model

    sd = _checkpoint(tmp_path)
    _check(_measure(tmp_path, "float32", "dir"), 4, mapped=(tmp_path / "model.safetensors").stat().st_size)
    read, blocks = _safetensors_weights(tmp_path, torch.float32)  # cast as read: no bf16 tensor outlives its read
    assert not blocks and all(t.dtype == torch.float32 for t in read.values())
    assert torch.equal(read["lm_head.weight"], sd["lm_head.weight"].float())

    got = load_model(tmp_path, dtype=torch.float32, quantization="none").model.hf_state_dict()
    for name in ("model.embed_tokens.weight", "model.layers.3.self_attn.k_proj.weight", "model.norm.weight",
                 "model.layers.9.mlp.down_proj.weight", "model.layers.9.mlp.up_proj.weight", "lm_head.weight"):
        assert got[name].dtype == torch.float32 and torch.equal(got[name], sd[name].float()), name


@pytest.mark.skipif(not quant.kernel_supported(), reason="quantized weights are kept only where their kernel runs: "
                    "AVX512-BF16")
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0"])
def test_a_checkpoint_quantized_at_load_is_never_held_dense(tmp_path, qtype):
    """--quantization q8_0 / q4_0 quantizes each tensor as it is read (and packs each, freeing its blocks), so a
    load peaks near the quantized model's size, not at the checkpoint's: here a 2-shard bf16 checkpoint (320 MB)
    whose Q8_0 model holds ~170 MB. Each shard is mapped for one tensor at a time: its pages read do not pile up
    (mapped for a whole shard, they did: 474 / 392 MiB of growth against bounds of 427 / 364)."""
    shards = 2
    _checkpoint(tmp_path, shards)
    files = [f.stat().st_size for f in tmp_path.glob("model-*.safetensors")]
    assert len(files) == shards
    m = _measure(tmp_path, "bfloat16", "dir", qtype)
    assert m["held"] < 0.6 * sum(files)
    # quantizing a matrix makes float32 temporaries of it (the largest fits one QUANTIZE_SLICE); one tensor's file
    # pages (bf16) are mapped at a time
    _check(m, 2, mapped=2 * m["largest"], converting=8)
