"""`python -m ngsd_jax.serve` refuses what it does not serve in one line, before any model is read."""

from __future__ import annotations

import pytest

from ngsd_jax import serve


@pytest.mark.parametrize("flags, message", [
    (["--mode", "always"], "serve runs the modes ngsd, base, not --mode always"),
    (["--mode", "safedecoding"], "not --mode safedecoding"),
    (["--reflect", "json"], "serve sets alpha with --reflect expert or off, not --reflect json"),
    (["--reflect", "logit"], "not --reflect logit"),
    (["--early-stop"], "serve does not run --early-stop"),
    (["--request-modes", "ngsd,expert"], "--request-modes takes modes among ngsd, base"),
    (["--slots", "0"], "--slots, --chunk and --queue-size must be >= 1"),
    (["--tau", "0.5"], "--tau must be >= 1"),
])
def test_refused_in_one_line_before_loading(flags, message, capsys, tmp_path):
    # A base that does not exist: a refusal must come before anything is read.
    code = serve.main(["--base", str(tmp_path / "absent"), "--expert", str(tmp_path / "absent"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_server_options_follow_decode_options(tmp_path):
    args = serve.build_parser().parse_args(["--base", "b", "--expert", "e", "--alpha", "0.7", "--tau", "6",
                                            "--max-new-tokens", "20", "--context", "300", "--slots", "3"])
    options = serve.decode.resolve_options(args)
    server = serve.server_options(args, options)
    assert server.reflect == "off" and server.alpha == 0.7  # an explicit --alpha means reflection off
    assert server.slots.gate.tau == 6 and server.slots.slots == 3 and server.slots.context == 300
    assert server.web.max_tokens == 20 and server.web.max_tokens_limit == 299
    assert (server.host, server.port) == ("127.0.0.1", 8000)
    # With no --reflect, decode's default (json) becomes the expert's reading of its prefill.
    args = serve.build_parser().parse_args(["--base", "b", "--expert", "e"])
    assert serve.server_options(args, serve.decode.resolve_options(args)).reflect == "expert"
