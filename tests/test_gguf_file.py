"""The direct GGUF reader against gguf's own GGUFReader, on a file written by gguf's GGUFWriter."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter, quantize

from speculative_cascade.engine.gguf_file import GGUFFile


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "t.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_token_list([f"tok{i}" for i in range(300)])  # a string array: skipped
    w.add_array("test.ints", [3, 1, 4, 1, 5])
    rng = np.random.default_rng(0)
    w.add_tensor("a.weight", rng.standard_normal((8, 64)).astype(np.float32))
    w.add_tensor("b.weight", rng.standard_normal((4, 32)).astype(np.float16))
    q = quantize(rng.standard_normal((16, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    w.add_tensor("c.weight", q, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_fields_and_tensors_match_gguf_reader(gguf_path):
    ours, ref = GGUFFile(gguf_path), GGUFReader(str(gguf_path))
    assert ours.fields["general.architecture"] == "llama"
    assert ours.fields["llama.block_count"] == 2
    assert ours.fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert ours.fields["tokenizer.ggml.tokens"] is None
    assert list(ours.fields["test.ints"]) == [3, 1, 4, 1, 5]
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.tensor_type == b.tensor_type and a.shape == tuple(int(d) for d in b.shape)
        assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape
        assert np.array_equal(a.data.view(np.uint8), b.data.view(np.uint8))


def test_truncated_file_is_a_value_error(gguf_path, tmp_path):
    data = gguf_path.read_bytes()
    for cut in (6, 40, len(data) // 2, len(data) - 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            GGUFFile(bad)
