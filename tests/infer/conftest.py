"""Fixtures for the inference tests: a tokenizer trained in-process, and a debug-size chat model trained for a few
seconds to answer every greeting with the same reasoning + answer (so chat, the server and the web page see a real
model produce `<think>`, `</think>`, `<answer>` and EOS, not random ids)."""

import pytest
import torch

from nanoseek.data.tokenizer import train_tokenizer
from nanoseek.model import Transformer, preset
from nanoseek.model.mtp import mtp_loss

TEXTS = ["Hello there, how are you today? Fine thanks, and you?", "The answer is 42. What is 2 + 2? It is 4.",
         "say hello to the nice people", "Reasoning: first add, then check the sum."] * 10
QUESTIONS = ["hi", "hello", "hey there", "what is up?", "good morning", "how are you?"]
REPLY = "<think>\nthey greet me, so I greet back\n</think>\n<answer>\nhello there\n</answer>"


@pytest.fixture(autouse=True)
def one_thread():
    """Debug-size matmuls gain nothing from threads, and on a busy machine spinning threads cost seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(TEXTS, 320)


def train_chat_model(tok, steps: int = 150):
    """A debug model that learned REPLY after every QUESTION, as a first turn and after one earlier exchange (with
    its MTP module, so drafts get accepted). Untrained second turns come out as whatever the machine's float
    rounding favours: a test of them would pass on one CPU and fail on another."""
    torch.manual_seed(0)
    model = Transformer(preset("debug", vocab_size=tok.vocab_size, max_position_embeddings=256))
    turn = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]  # as history keeps it
    convs = [tok.encode_chat(history + [{"role": "user", "content": q}, {"role": "assistant", "content": REPLY}])
             for history in ([], turn) for q in QUESTIONS]  # first turns, and second turns after a history
    T = max(len(ids) for ids, _ in convs)
    ids = torch.full((len(convs), T), tok.pad_id)
    labels = torch.full((len(convs), T), -100)
    for i, (seq, mask) in enumerate(convs):
        ids[i, :len(seq)] = torch.tensor(seq)
        lab = torch.tensor([t if m else -100 for t, m in zip(seq[1:], mask[1:], strict=True)])
        labels[i, :len(seq) - 1] = lab
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # session fixtures run before the per-test `one_thread`
    try:
        for _ in range(steps):
            out = model(ids, extras=True)
            ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            loss = ce + mtp_loss(out.mtp_logits, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="session")
def chat_model(tokenizer):
    return train_chat_model(tokenizer)


@pytest.fixture(scope="session")
def chat_dir(tmp_path_factory, chat_model, tokenizer):
    """The chat model as a checkpoint directory (config.json, model.safetensors, tokenizer files)."""
    path = tmp_path_factory.mktemp("chat_ckpt")
    chat_model.save_pretrained(path)
    tokenizer.save(path)
    return path


@pytest.fixture(scope="session")
def vl_dir(chat_dir, tmp_path_factory):
    """The chat checkpoint turned VL (`build_vl`: its tokenizer gains <image>, a fresh vl-debug tower and projector),
    a directory `nanoseek serve` and `nanoseek chat` load as they are."""
    from nanoseek.posttrain.vl import build_vl

    return build_vl(chat_dir, tmp_path_factory.mktemp("vl_ckpt"), preset="vl-debug")
