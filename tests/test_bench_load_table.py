"""`sparrow-bench load`'s table: the service latency ratio of each method against ar at its stream count."""

from __future__ import annotations

from dataclasses import replace

from streamer.bench_load import Row, add_ratios_vs_ar, format_table

AR_LATENCY_S, AR_FIRST_TOKEN_S = 0.9, 0.03
SPARROW_LATENCY_S, SPARROW_FIRST_TOKEN_S = 0.3, 0.06


def row(streams: int, method: str, latency: float, first_token: float) -> Row:
    return Row(batching="off", streams=streams, method=method, captions=3, latency_p50_s=latency, latency_p95_s=latency,
               first_token_p50_s=first_token, ingest_lag_p50_s=0.0, ingest_lag_p95_s=0.0, ingest_lag_max_s=0.0,
               frames_sent=24, frames_dropped=0, tau=1.0, tokens_per_s=10.0, wall_s=12.0,
               decode_tokens_per_s=10.0)


def test_ratio_is_ars_latency_over_the_methods_at_the_same_stream_count():
    ar1 = row(1, "ar", AR_LATENCY_S, AR_FIRST_TOKEN_S)
    ar4 = replace(ar1, streams=4, latency_p50_s=2 * AR_LATENCY_S)
    sp1 = row(1, "sparrow", SPARROW_LATENCY_S, SPARROW_FIRST_TOKEN_S)
    sp4 = replace(sp1, streams=4)
    lone = row(2, "sparrow", SPARROW_LATENCY_S, SPARROW_FIRST_TOKEN_S)  # no ar row at 2 streams
    rows = [ar1, ar4, sp1, sp4, lone]
    add_ratios_vs_ar(rows)
    assert sp1.latency_p50_vs_ar == AR_LATENCY_S / SPARROW_LATENCY_S  # 3x sooner
    assert sp1.first_token_vs_ar == AR_FIRST_TOKEN_S / SPARROW_FIRST_TOKEN_S  # first token twice as late
    assert sp4.latency_p50_vs_ar == 2 * AR_LATENCY_S / SPARROW_LATENCY_S
    assert ar1.latency_p50_vs_ar == 1.0 and lone.latency_p50_vs_ar is None
    table = format_table(rows).splitlines()
    assert "lat x ar" in table[0] and "1st x ar" in table[0]
    assert table[4].split()[-2:] == [f"{AR_LATENCY_S / SPARROW_LATENCY_S:.2f}x", f"{0.5:.2f}x"]
    assert table[-1].split()[-2:] == ["n/a", "n/a"]
