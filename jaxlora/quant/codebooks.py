"""Code books of the 4-bit and 8-bit formats, and the decision thresholds that pick a code.

Everything here is a float32 numpy constant, built once at import time; the quantizers in this
package only compare against and index into these tables.

References (formats.md): B.1 (tables), B.3 (thresholds and tie rules), B.6.1 (dynamic 8-bit map).
"""

from __future__ import annotations

import numpy as np

# NF4 (QLoRA paper, Dettmers et al. 2023): normal quantiles normalised to [-1, 1], index 7 exactly 0.
# The literals are bitsandbytes' table; each rounds to the float32 listed in formats.md B.1.
NF4_CODE = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)

# NF4 thresholds: the float32 midpoints of neighbouring codes (B.3). A value goes to
# index #{k : x > t_k}, so a value exactly on a midpoint goes to the lower index.
NF4_THRESHOLDS = ((NF4_CODE[:-1] + NF4_CODE[1:]) * np.float32(0.5)).astype(np.float32)

# FP4 (e2m1, bitsandbytes' variant): bit 3 is the sign, bits 0-2 a magnitude code. Raw values / 12.
_FP4_RAW = np.array([0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0], dtype=np.float32)
FP4_CODE = np.concatenate([_FP4_RAW, -_FP4_RAW]) / np.float32(12.0)
# Index 8 is "-0" written as an integer in bitsandbytes' table, i.e. +0.0 in the stored quant_map.
FP4_CODE[8] = np.float32(0.0)
FP4_CODE = FP4_CODE.astype(np.float32)

# FP4 magnitude thresholds: bitsandbytes' CUDA literals, NOT the exact midpoints (B.3). Using the
# literals reproduces CUDA's tie behaviour (0.2083, 0.2917, 0.5833, 0.8333 round up in magnitude).
FP4_THRESHOLDS = np.array(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], dtype=np.float32
)
# Magnitude rank (how many thresholds |x| exceeds) -> 3-bit code.
FP4_RANK_TO_CODE = np.array([0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011], dtype=np.uint8)

# The stored quant_map of each type (what checkpoints carry as ``weight.quant_map``).
CODE_4BIT = {"nf4": NF4_CODE, "fp4": FP4_CODE}
# The values bitsandbytes' dequantization kernels (CUDA and native CPU) produce: the same, except
# that FP4 code 8 decodes to -0.0 (the kernels negate entry 0 for the sign bit).
DECODE_4BIT = {"nf4": NF4_CODE, "fp4": np.where(np.arange(16) == 8, np.float32(-0.0), FP4_CODE).astype(np.float32)}


# The signed dynamic 8-bit map used for double quantization (formats.md B.6.1, Appendix 1), as the
# bit patterns of its 256 float32 values. It equals bitsandbytes'
# ``create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)``: per decade i = 0..6 the
# 2**i midpoints of torch's float32 ``linspace(0.1, 1, 2**i + 1)`` times 10**(i - 6), both signs,
# plus 0 and 1.0, sorted. It is stored as bits because torch's linspace rounds differently from
# numpy's, and these exact values are what checkpoints carry as ``nested_quant_map``.
_DYNAMIC_MAP_BITS = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
]
DYNAMIC_MAP = np.array(_DYNAMIC_MAP_BITS, dtype=np.uint32).view(np.float32)
# Float32 midpoints of the dynamic map, as CUDA computes them: (neighbour + code[pivot]) * 0.5f.
DYNAMIC_MIDPOINTS = ((DYNAMIC_MAP[:-1] + DYNAMIC_MAP[1:]) * np.float32(0.5)).astype(np.float32)

SUPPORTED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SUPPORTED_QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256
