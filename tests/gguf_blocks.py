import numpy as np
from gguf import GGMLQuantizationType as Q, GGML_QUANT_SIZES

def random_blocks(qtype, N, K, rng):
    """Random GGUF blocks of ``qtype`` for an (N, K) matrix, with finite fp16 scales: (N, row_bytes) uint8."""
    block, size = GGML_QUANT_SIZES[qtype]
    nb = N * K // block
    raw = rng.integers(0, 256, (nb, size), dtype=np.uint8)
    def f16(lo, hi, n):
        return rng.uniform(lo, hi, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    if qtype in (Q.Q4_0, Q.Q8_0):
        raw[:, 0:2] = f16(0.001, 0.02, nb)
    elif qtype == Q.Q4_1:
        raw[:, 0:2] = f16(0.001, 0.02, nb); raw[:, 2:4] = f16(-0.1, 0.1, nb)
    elif qtype == Q.Q4_K:
        raw[:, 0:2] = f16(0.0005, 0.002, nb); raw[:, 2:4] = f16(0.0005, 0.002, nb)
    elif qtype == Q.Q6_K:
        raw[:, 208:210] = f16(0.0005, 0.002, nb)
    if qtype == Q.Q8_0:  # llama.cpp's Q8_0 codes are -127..127
        q = raw[:, 2:].view(np.int8)
        q[q == -128] = -127
    return raw.reshape(N, -1)
