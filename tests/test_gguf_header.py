import os
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from gpubox.gguf_header import (
    ArraySummary,
    GgufArchitectureError,
    GgufError,
    GgufFile,
    GgufHeaderError,
    GgufHeadTooShortError,
    NotGgufError,
    TruncatedGgufError,
    check_architecture,
    gguf_constants,
    gguf_head_command,
    header_from_fact,
    parse_gguf_head_output,
    parse_gguf_header,
    read_gguf_header,
)

FIXTURES = Path(__file__).parent / "fixtures"
LLAMA_SPM = FIXTURES / "gguf" / "ggml-vocab-llama-spm.gguf"
BERT_BGE = FIXTURES / "gguf" / "ggml-vocab-bert-bge.gguf"
# The first 1785664 bytes (the whole header) of SmolLM2-135M-Instruct.Q4_1.gguf, a 98362432-byte file.
SMOLLM2_HEAD = FIXTURES / "gguf" / "SmolLM2-135M-Instruct.Q4_1.head.gguf"
SMOLLM2_SIZE = int((FIXTURES / "gguf" / "SmolLM2-135M-Instruct.Q4_1.size").read_text())


def smollm2_path() -> Path:
    env = os.environ.get("GPUBOX_SMOLLM2")
    if env:
        return Path(env)
    cached = Path.home() / ".cache" / "gpubox" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if cached.is_file():
        return cached
    from tests.testbed.assets import smollm2_gguf

    return smollm2_gguf()


def smollm2_head() -> GgufFile:
    return parse_gguf_header(SMOLLM2_HEAD.read_bytes(), SMOLLM2_SIZE)


def test_reading_a_header_loads_gguf_constants_alone_without_numpy() -> None:
    """The gguf package's __init__ imports numpy (~0.1 s of every deploy that reads a header): the reader
    takes the constants module alone, and a fresh interpreter that parsed a header has neither loaded."""
    code = (
        "import sys; from gpubox.gguf_header import parse_gguf_header; "
        f"header = parse_gguf_header(open(sys.argv[1], 'rb').read(), {SMOLLM2_SIZE}); "
        "print(header.architecture, len(header.tensors), sorted({'gguf', 'numpy'} & set(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", code, str(SMOLLM2_HEAD)], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["llama", str(len(smollm2_head().tensors)), "[]"]


def test_the_constants_are_gguf_s_own() -> None:
    constants = gguf_constants()
    assert {kind.name: size for kind, size in constants.GGML_QUANT_SIZES.items()} == {
        kind.name: size for kind, size in gguf.GGML_QUANT_SIZES.items()
    }
    assert constants.Keys.General.ARCHITECTURE == gguf.Keys.General.ARCHITECTURE
    assert gguf_constants() is constants  # run once per process


def test_vocab_gguf() -> None:
    header = read_gguf_header(LLAMA_SPM)
    assert (header.version, header.architecture, header.name) == (3, "llama", "llama-spm")
    assert header.file_size == LLAMA_SPM.stat().st_size
    assert header.tensors == []
    assert header.metadata["llama.context_length"] == 4096
    assert header.context_length == 4096 and header.block_count == 32
    assert header.metadata["tokenizer.ggml.add_bos_token"] is True
    assert header.metadata["tokenizer.ggml.tokens"] == ArraySummary(element_type="STRING", length=32000)
    assert header.metadata["tokenizer.ggml.scores"] == ArraySummary(element_type="FLOAT32", length=32000)


@pytest.mark.parametrize("path", [LLAMA_SPM, BERT_BGE])
def test_metadata_matches_gguf_reader(path: Path) -> None:
    reader = gguf.GGUFReader(path)
    header = read_gguf_header(path)
    keys = [key for key in reader.fields if not key.startswith("GGUF.")]
    assert list(header.metadata) == keys
    for key in keys:
        field = reader.fields[key]
        value = header.metadata[key]
        if isinstance(value, ArraySummary):
            assert value.length == len(field.data)
        elif field.types[0] == gguf.GGUFValueType.STRING:
            assert value == str(bytes(field.parts[-1]), "utf-8")
        else:
            assert value == pytest.approx(field.parts[-1][0])


def test_model_head_has_tensors() -> None:
    header = smollm2_head()
    assert (header.architecture, header.file_size, len(header.tensors)) == ("llama", 98362432, 272)
    assert header.name == "Smollm2 135M 8k Lc100K Mix1 Ep2"
    assert header.metadata["general.languages"] == ["en"]
    embedding = header.tensor("token_embd.weight")
    assert embedding is not None
    assert (embedding.shape, embedding.ggml_type, embedding.n_elements) == ([576, 49152], "Q8_0", 576 * 49152)
    assert embedding.n_bytes == 576 * 49152 // 32 * 34
    assert header.data_offset == SMOLLM2_HEAD.stat().st_size
    assert header.tensor_data_end == header.file_size  # the data ends where the file ends
    assert header.tensor_bytes == header.file_size - header.data_offset


def test_full_model_matches_gguf_reader() -> None:
    path = smollm2_path()
    header = read_gguf_header(path)
    assert header == smollm2_head()
    reader = gguf.GGUFReader(path)
    assert [(t.name, [int(d) for d in t.shape], t.tensor_type.name, int(t.n_bytes)) for t in reader.tensors] == [
        (t.name, t.shape, t.ggml_type, t.n_bytes) for t in header.tensors
    ]
    assert reader.data_offset == header.data_offset


def test_not_a_gguf() -> None:
    text = (FIXTURES / "llamacpp" / "server-help-0c1e57098.txt").read_bytes()
    with pytest.raises(NotGgufError, match="not a GGUF"):
        parse_gguf_header(text, len(text))


def test_truncated_file(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(BERT_BGE.read_bytes()[:100_000])
    with pytest.raises(TruncatedGgufError, match="ends after 100000 bytes, inside its header"):
        read_gguf_header(truncated)
    with pytest.raises(TruncatedGgufError):
        parse_gguf_header(b"GG", 2)


def test_truncated_tensor_data() -> None:
    head = SMOLLM2_HEAD.read_bytes()
    with pytest.raises(TruncatedGgufError, match="tensors end at byte 98362432"):
        parse_gguf_header(head, len(head) + 1000)


def test_head_too_short_is_not_truncated() -> None:
    data = BERT_BGE.read_bytes()
    with pytest.raises(GgufHeadTooShortError, match="read a bigger head"):
        parse_gguf_header(data[:65536], len(data))
    # locally the reader reads on until the header is whole
    assert read_gguf_header(BERT_BGE, head_bytes=4096) == read_gguf_header(BERT_BGE)


def test_errors_are_distinct() -> None:
    for error in (NotGgufError, TruncatedGgufError, GgufHeadTooShortError):
        assert issubclass(error, GgufError)
    assert not issubclass(TruncatedGgufError, GgufHeadTooShortError)
    assert not issubclass(GgufHeadTooShortError, TruncatedGgufError)


def test_head_command_and_parse_on_real_files(tmp_path: Path) -> None:
    def fact(path: Path, head_bytes: int = 32 << 20) -> GgufFile | GgufHeaderError | None:
        command = gguf_head_command(str(path), head_bytes)
        output = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True).stdout
        return parse_gguf_head_output(output.splitlines())

    assert fact(LLAMA_SPM) == read_gguf_header(LLAMA_SPM)
    assert fact(tmp_path / "missing.gguf") is None
    error = fact(BERT_BGE, head_bytes=1000)
    assert isinstance(error, GgufHeaderError) and error.kind == "head_too_short"
    not_gguf = fact(FIXTURES / "llamacpp" / "version-0c1e57098.txt")
    assert isinstance(not_gguf, GgufHeaderError) and not_gguf.kind == "not_gguf"
    with pytest.raises(NotGgufError, match="^/x.gguf: not a GGUF"):
        raise not_gguf.exception("/x.gguf")


def test_json_roundtrip() -> None:
    header = smollm2_head()
    assert header_from_fact(header.to_json()) == header
    vocab = read_gguf_header(LLAMA_SPM)
    rebuilt = header_from_fact(vocab.to_json())
    assert rebuilt == vocab
    assert rebuilt.metadata["tokenizer.ggml.add_bos_token"] is True
    assert rebuilt.metadata["llama.block_count"] == 32 and type(rebuilt.metadata["llama.block_count"]) is int


def test_check_architecture() -> None:
    header = smollm2_head()
    check_architecture(header, "llama")
    with pytest.raises(GgufArchitectureError) as error:
        check_architecture(header, "gemma4-assistant", role="drafter", path="/srv/models/smollm2.gguf")
    assert str(error.value).startswith("/srv/models/smollm2.gguf is a `llama` GGUF, not a `gemma4-assistant` drafter: ")
    assert isinstance(error.value, ValueError)
