"""profile_training's pure pieces: op_name parsing, the name-stack parts, kernel kinds."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

import profile_training  # noqa: E402

HLO = "\n".join([
    "ENTRY %main.3 (x.1: f32[8,8]) -> f32[8,8] {",
    "  %input_transpose_fusion.143 = f32[16,1,1792,2048]{3,2,1,0} fusion(%x), kind=kInput, "
    'metadata={op_name="jit(step)/train_step/jvp(mamba_lm)/block/mamba2_mixer/slice" '
    'deduplicated_name="input_transpose_fusion.120" stack_frame_id=3}',
    "  ROOT %custom-call.12 = f32[8,8]{1,0} custom-call(%x), "
    'metadata={op_name="jit(step)/train_step/transpose(jvp(mamba_lm))/block/dot_general"}',
    "  %no_metadata.1 = f32[8] parameter(0)",
    "}"])


def test_instruction_op_names_keys_are_kernel_names():
  names = profile_training.instruction_op_names(HLO)
  assert names == {
      "input_transpose_fusion_143":
          "jit(step)/train_step/jvp(mamba_lm)/block/mamba2_mixer/slice",
      "input_transpose_fusion_120":
          "jit(step)/train_step/jvp(mamba_lm)/block/mamba2_mixer/slice",
      "custom_call_12": "jit(step)/train_step/transpose(jvp(mamba_lm))/block/dot_general"}


def test_part_of_unwraps_transformations_and_tells_the_direction():
  part_of = profile_training.part_of
  stack = "jit(step)/train_step/transpose(jvp(mamba_lm))/block/mamba2_mixer/ssd_chunked/"
  assert part_of(stack + "jit(_ssd_jnp)/checkpoint/reduce_sum", 4) == (
      "bwd", "mamba_lm/block/mamba2_mixer/ssd_chunked")
  assert part_of(stack + "mul", 2) == ("bwd", "mamba_lm/block")
  assert part_of("jit(step)/train_step/jvp(mamba_lm)/block/rematted_computation/add", 4) == (
      "remat", "mamba_lm/block")
  assert part_of("jit(step)/train_step/jvp(mamba_lm)/block/mamba2_mixer/jit(silu)/neg", 9) == (
      "fwd", "mamba_lm/block/mamba2_mixer/silu")
  assert part_of("jit(step)/train_step/min", 4) == ("fwd", "(top level)")


def test_kernel_kind():
  kind = profile_training.kernel_kind
  assert kind("sm90_xmma_gemm_f32f32_tf32f32") == kind("nvjet_sm90_tst_128x160") == "matmul"
  assert kind("gemm_fusion_dot_49") == "matmul"
  assert kind("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
  assert kind("input_add_transpose_fusion_23") == kind("wrapped_transpose_72") == "transpose"
  assert kind("input_reduce_fusion_498") == "reduce"
  assert kind("loop_add_fusion_23") == "elementwise"
  assert kind("Memset 0") == "memset"
  assert kind("ssd_bwd_db") == kind("ssd_chunk_scan_mgpu_mosaic_gpu_kernel") == "custom"
