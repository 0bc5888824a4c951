"""benchmarks.step: the attention step it times is the one its flags name."""

from benchmarks import step


def test_kq_dropout_zero_times_an_attention_step_without_key_query_dropout():
    def attention_temp_bytes(kq_dropout):
        results, built = step.train_steps(8, "float32", 4, 1, 0, kq_dropout=kq_dropout)
        return results["attention_step"]["temp_bytes"], built[2].dropout_rate

    with_dropout, rate = attention_temp_bytes(None)
    without, rate_off = attention_temp_bytes(0.0)
    assert (rate, rate_off) == (0.25, 0.0)
    # Without dropout the key and query maps are never materialised.
    assert without < with_dropout
