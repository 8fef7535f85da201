"""The DistributedDataParallel branch of train() (the 8-GPU endpoint's code) on CPU with gloo.

Two processes share each global batch; gradients are averaged across them, so for the same
seed the loss curve is the single process's, to float rounding."""

import pytest
from test_hpc_fixtures import build_hpc_scans

from ptychostream.hpc import corpus_append, train
from ptychostream.model import load_state_dict


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    scans = build_hpc_scans(tmp_path_factory)
    corpus_dir = tmp_path_factory.mktemp("ddp-corpus")
    for labels in scans["labels"]:
        corpus_append(str(corpus_dir), labels)
    return str(corpus_dir)


@pytest.mark.timeout(240)
def test_two_gloo_processes_give_the_single_process_loss_curve(corpus, tmp_path):
    # 40 pairs: 36 train (2 full global batches of 16 and one of 4, even shares), 4 validation
    kw = dict(epochs=2, batch_size=16, seed=3, max_pairs=40, progress=False, threads=1, device="cpu",
              masked_loss=True)
    one = train(corpus, str(tmp_path / "one"), **kw)
    two = train(corpus, str(tmp_path / "two"), ddp_world_size=2, **kw)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["runtime"]["steps_per_epoch"] == one["runtime"]["steps_per_epoch"] == 3
    for a, b in zip(one["history"], two["history"], strict=True):
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-12)
        # gradients are all-reduced in another order than one process sums them: float32
        # rounding, growing over steps (measured 1.4e-3 after two epochs)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=5e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=5e-3)
    # the curve moved (a DDP run that did not train would still match epoch 0's validation)
    assert one["history"][1]["train_loss"] != pytest.approx(one["history"][0]["train_loss"], rel=1e-3)
    # and the weights agree: rank 0 saved the model every rank trained
    wa = load_state_dict(one["state_dict"]).state_dict()
    wb = load_state_dict(two["state_dict"]).state_dict()
    diff = sum(float(((wa[k] - wb[k]) ** 2).sum()) for k in wa) ** 0.5
    norm = sum(float((wa[k] ** 2).sum()) for k in wa) ** 0.5
    assert diff < 1e-3 * norm, (diff, norm)


def test_ddp_options_are_checked(corpus, tmp_path):
    with pytest.raises(ValueError, match="ddp_world_size"):
        train(corpus, str(tmp_path), epochs=1, device="cpu", ddp_world_size=0)
    with pytest.raises(ValueError, match="smaller than the DDP world size"):
        train(corpus, str(tmp_path), epochs=1, batch_size=1, max_pairs=8, device="cpu",
              ddp_world_size=2, progress=False, threads=1)
