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
    (["--alpha-range", "0.9,0.1"], "--alpha-range: expected finite LOW,HIGH with LOW <= HIGH"),
])
def test_refused_in_one_line_before_loading(flags, message, capsys, tmp_path):
    # A base that does not exist: a refusal must come before anything is read.
    code = serve.main(["--base", str(tmp_path / "absent"), "--expert", str(tmp_path / "absent"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err


def test_server_setup_follows_decode_options(tmp_path):
    from ngsd_jax.serving.server import server_setup

    args = serve.build_parser().parse_args(["--base", "b", "--expert", "e", "--alpha", "0.7", "--tau", "6",
                                            "--max-new-tokens", "20", "--context", "300", "--slots", "3"])
    options = serve.serve_options(args)
    assert options.decode.reflect == "off" and options.decode.alpha == 0.7  # an explicit --alpha: reflection off
    setup = server_setup(options)
    assert setup.reflect == "off" and setup.alpha == 0.7
    assert setup.slots.gate.tau == 6 and setup.slots.slots == 3 and setup.slots.context == 300
    assert setup.web.max_tokens == 20 and setup.web.max_tokens_limit == 299
    assert (setup.host, setup.port) == ("127.0.0.1", 8000)
    # With no --reflect, decode's default (json) becomes the expert's reading of its prefill.
    args = serve.build_parser().parse_args(["--base", "b", "--expert", "e"])
    assert server_setup(serve.serve_options(args)).reflect == "expert"
    args = serve.build_parser().parse_args(["--base", "b", "--expert", "e", "--no-compilation-cache"])
    assert serve.serve_options(args).decode.devices.compilation_cache is None
