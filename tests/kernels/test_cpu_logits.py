"""The C kernel that gives the sampler each row's argmax and log-normalizer (lora_serving/kernels/cpu_logits.c),
against torch's argmax and log_softmax."""

import pytest
import torch

from lora_serving.kernels import cpu_logits, cpu_native


@pytest.fixture(autouse=True)
def kernel_built():
    if cpu_native.library() is None:
        pytest.skip("the C kernels do not build here")


def assert_summaries_match_torch(logits):
    indices, maxima, log_sums = cpu_logits.row_summaries(logits)
    assert torch.equal(indices, logits.argmax(dim=-1))
    assert torch.equal(maxima, logits.max(dim=-1).values)
    # Every token's log-probability from the summaries, against log_softmax: the sums differ in order only.
    from_kernel = logits - maxima[:, None] - log_sums[:, None]
    torch.testing.assert_close(from_kernel, torch.log_softmax(logits, dim=-1), rtol=1e-6, atol=2e-6)


@pytest.mark.parametrize("vocab", [1, 7, 16, 17, 1000, 32001, 49152])
def test_argmax_maximum_and_log_normalizer_equal_torchs(vocab):
    generator = torch.Generator().manual_seed(vocab)
    assert_summaries_match_torch(torch.randn(5, vocab, generator=generator) * 8)


def test_ties_go_to_the_first_maximum_wherever_it_sits():
    logits = torch.randn(6, 49152, generator=torch.Generator().manual_seed(0))
    logits[0, 7] = logits[0, 40000] = 100.0  # two lanes of different vectors
    logits[1, 30000:] = 100.0  # every lane at once, from a vector's middle
    logits[2, 33] = logits[2, 17] = 50.0  # the later index in the earlier lane
    logits[3] = 0.0
    logits[4, 49151] = 100.0  # the last element, past the vectors (with vocab 49151 + 1)
    logits[5, 3] = logits[5, 19] = logits[5, 49150] = 9.0
    indices, _, _ = cpu_logits.row_summaries(logits)
    assert indices.tolist() == [7, 30000, 17, 0, 49151, 3]
    assert_summaries_match_torch(logits)
    tail = logits[:, :49149].clone()
    tail[0, 49148] = 200.0  # in the scalar tail of an odd width
    assert cpu_logits.row_summaries(tail)[0][0] == 49148


def test_nan_counts_as_the_maximum_and_infinities_as_torch_takes_them():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(1))
    logits[0, 500] = float("nan")
    logits[0, 600] = float("nan")
    logits[1, :] = float("-inf")
    logits[1, 123] = 2.0  # one finite entry: probability 1
    logits[2, 999] = float("nan")  # in the scalar tail
    logits[3, ::2] = float("-inf")
    indices, maxima, log_sums = cpu_logits.row_summaries(logits)
    assert indices.tolist()[:3] == [500, 123, 999] and indices[:3].tolist() == logits[:3].argmax(dim=-1).tolist()
    assert maxima[0].isnan() and log_sums[0].isnan() and maxima[2].isnan()
    assert logits[1, 123] - maxima[1] - log_sums[1] == 0.0
    torch.testing.assert_close(logits[3, 1::2] - maxima[3] - log_sums[3], torch.log_softmax(logits[3], -1)[1::2])


def test_rows_of_a_wider_tensor_are_read_in_place_and_other_logits_are_refused():
    wide = torch.randn(3, 50000, generator=torch.Generator().manual_seed(2))
    assert_summaries_match_torch(wide[:, 10:49162])
    assert cpu_logits.row_summaries(torch.empty(0, 49152))[0].shape == (0,)
    for other in (torch.randn(2, 64).to(torch.bfloat16), torch.randn(64, 2).t(), torch.randn(64)):
        assert not cpu_logits.serves(other)
        with pytest.raises(ValueError, match="fp32 CPU logits"):
            cpu_logits.row_summaries(other)


def test_the_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("LORA_SERVING_CPU_LOGITS", "off")
    assert not cpu_logits.serves(torch.randn(2, 64))
