"""Models referenced by a local Hugging Face directory load offline and round-trip."""

import pytest
import torch

from slimkit import SlimkitError, load, new_model, save

transformers = pytest.importorskip("transformers")


@pytest.fixture
def tiny_bert_dir(tmp_path):
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_huggingface_directory_round_trip(tiny_bert_dir, tmp_path):
    arch = {"huggingface": str(tiny_bert_dir), "task": "sequence-classification"}
    model = new_model(arch).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)  # weights now differ from the directory's: the slimkit copy must win
    save(model, tmp_path / "slim")
    again = load(tmp_path / "slim")
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids), again(input_ids=ids))
    for p in tiny_bert_dir.iterdir():
        p.unlink()  # the saved model holds the config itself: it needs nothing from the directory it came from
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "slim")(input_ids=ids), model(input_ids=ids))


def test_missing_huggingface_directory(tmp_path):
    with pytest.raises(SlimkitError, match="not a local Hugging Face model directory"):
        new_model({"huggingface": str(tmp_path)})
