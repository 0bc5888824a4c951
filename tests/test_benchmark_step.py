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


def test_the_nnx_twin_is_timed_beside_the_linen_backbone_on_the_same_work():
    results = step.run(8, "float32", 4, 1, 0, None, nnx=True)
    assert results["nnx_attention_step_s"] > 0 and results["nnx_eval_forward_s"] > 0
    assert results["nnx_over_linen_attention_step"] > 0
    # the same computation: XLA counts the same FLOPs in both compiled steps
    linen, ours = results["attention_step"]["flops"], results["nnx_attention_step"]["flops"]
    assert abs(ours - linen) <= 1e-6 * linen, (ours, linen)
