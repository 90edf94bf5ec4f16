import os

# Kyutai's moshi reads NO_TORCH_COMPILE when it is imported; Triton binds kernels to the
# interpreter only if TRITON_INTERPRET is set before a kernel module is imported.
os.environ.setdefault("NO_TORCH_COMPILE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from . import checkpoints  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def no_tf32():
    """Exact fp32 products in torch's CUDA matmuls and cuDNN's convs (both may run in TF32 on Hopper), for
    references that are the fp32 spec."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(scope="session")
def kyutai_mimi(tmp_path_factory):
    """Kyutai's MimiModel at the real config with random non-zero codebooks, and its file."""
    path = tmp_path_factory.mktemp("kyutai_mimi") / checkpoints.KYUTAI_MIMI_FILE
    return checkpoints.kyutai_mimi(path)


@pytest.fixture(scope="session")
def kyutai_moshi(tmp_path_factory, kyutai_mimi):
    """A Kyutai checkpoint directory: a tiny fp32 LMModel, the real-config Mimi, a tokenizer."""
    directory = tmp_path_factory.mktemp("kyutai_moshi")
    mimi, mimi_file = kyutai_mimi
    return checkpoints.kyutai_moshi(directory, mimi_file)


@pytest.fixture(scope="session")
def hf_mimi(tmp_path_factory):
    """transformers' MimiModel at the real config, randomised, saved with save_pretrained."""
    return checkpoints.hf_mimi(tmp_path_factory.mktemp("hf_mimi"))


@pytest.fixture(scope="session")
def hf_moshi(tmp_path_factory):
    """A tiny transformers MoshiForConditionalGeneration, randomised, saved with save_pretrained."""
    return checkpoints.hf_moshi(tmp_path_factory.mktemp("hf_moshi"))


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    return checkpoints.train_tokenizer(tmp_path_factory.mktemp("spm"), vocab_size=checkpoints.TINY_TEXT_CARD)
