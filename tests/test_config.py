"""Every setting: good values parse, bad ones give one clear line and leave training running."""

from __future__ import annotations

import pytest

from gradwatch.config import (
    FIELDS,
    KEYWORDS,
    SETTINGS,
    TABLE,
    Config,
    SettingError,
    from_env,
    parse_groups,
)

BAD_VALUES = ["", "  ", "garbage", "-1", "1e999", "９", "💥", "0x10", "nan", "99999999999999"]

# For each variable: values that must be rejected (beyond BAD_VALUES where they apply).
BAD = {
    "GRADWATCH": ["2", "enable", "-1", "", "ja", "ОН"],
    "GRADWATCH_PORT": BAD_VALUES + ["65536", "80.5", "-5"],
    "GRADWATCH_HOST": ["", "  ", "bad host", "ホスト", "a" * 300, "h;rm -rf"],
    "GRADWATCH_EVERY": BAD_VALUES + ["0", "1.5"],
    "GRADWATCH_GROUPS": ["", ",", "host", "=host.", "host=", "a b=x", "other=x", "h=x,h=y", "é=x"],
    "GRADWATCH_PER_PARAM": ["", "maybe", "10", "ÿes"],
    "GRADWATCH_MAX_PARAMS": BAD_VALUES + ["0", "10000000"],
    "GRADWATCH_MAX_GROUPS": BAD_VALUES + ["1", "0", "100001"],
    "GRADWATCH_VANISHING_THRESHOLD": ["", "abc", "-1e-7", "inf", "nan", "1e999", "٣"],
    "GRADWATCH_EXPLODING_THRESHOLD": ["", "abc", "0", "-3", "inf", "nan"],
    "GRADWATCH_BACKEND": ["", "cuda", "fast", "nätive"],
    "GRADWATCH_TLS_CERT": ["", "  ", "/no/such/cert.pem", "/", "c\u00e9rt.pem"],
    "GRADWATCH_TLS_KEY": ["", "/no/such/key.pem", "/tmp"],
    "GRADWATCH_TLS_CLIENT_CA": ["", "/no/such/ca.pem", "\U0001f4a5"],
    "GRADWATCH_DISTRIBUTED": ["", "on", "ddp", "1", "öff"],
    "GRADWATCH_PER_PARAM_RANKS": ["", ",", "0,", "-1", "x", "0;1", "alle", "1.5", "٣"],
    "GRADWATCH_FILE_SD": ["", "  ", "/tmp/targets/", "a\0b"],
    "OTEL_METRICS_EXPORTER": ["", "otel", "otlp,zipkin", "none,otlp", "prom"],
    "GRADWATCH_UPDATE_EVERY": BAD_VALUES + ["1.5", "-3", "ten"],
    "GRADWATCH_MICRO_BATCH_SIZE": BAD_VALUES + ["0", "1.5", "2000000000"],
    "GRADWATCH_LOSS_ACCUMULATION": ["", "avg", "1", "sµm"],
    "GRADWATCH_NOISE_EMA": BAD_VALUES + ["1", "1.5", "-0.1", "inf"],
    "LOCAL_RANK": ["x", "-1"],
}


def test_every_documented_setting_has_bad_value_cases():
    assert {s.var for s in SETTINGS} <= set(BAD)


@pytest.mark.parametrize("name,raw", [(n, v) for n, vs in BAD.items() for v in vs])
def test_bad_value_names_variable_value_and_accepted(name, raw):
    with pytest.raises(SettingError) as info:
        from_env({name: raw})
    msg = str(info.value)
    assert name in msg and "accepted:" in msg and "\n" not in msg
    assert (repr(raw) if len(repr(raw)) <= 80 else repr(raw)[:60]) in msg
    assert len(msg) < 400  # a long value is cut, not echoed in full


def test_defaults_and_good_values():
    assert from_env({}) == Config()
    cfg = from_env(
        {
            "GRADWATCH": " Yes ",
            "GRADWATCH_PORT": "9500",
            "GRADWATCH_HOST": "0.0.0.0",
            "GRADWATCH_EVERY": "10",
            "GRADWATCH_GROUPS": "host=host.,seed=seed.|stem.",
            "GRADWATCH_PER_PARAM": "on",
            "GRADWATCH_MAX_PARAMS": "20",
            "GRADWATCH_VANISHING_THRESHOLD": "0",
            "GRADWATCH_EXPLODING_THRESHOLD": "1e4",
            "GRADWATCH_BACKEND": "TORCH",
            "GRADWATCH_DISTRIBUTED": "Off",
            "GRADWATCH_PER_PARAM_RANKS": "3, 0,3",
            "GRADWATCH_FILE_SD": "/tmp/gradwatch.json",
            "OTEL_METRICS_EXPORTER": "otlp, prometheus",
            "GRADWATCH_UPDATE_EVERY": "0",
            "GRADWATCH_MICRO_BATCH_SIZE": "8",
            "GRADWATCH_LOSS_ACCUMULATION": " Sum",
            "GRADWATCH_NOISE_EMA": "0",
            "LOCAL_RANK": "3",
            "RANK": "11",
            "WORLD_SIZE": "16",
        }
    )
    assert cfg.enabled is True and cfg.port == 9500 and cfg.serve_port == 9503
    assert cfg.groups == (("host", ("host.",)), ("seed", ("seed.", "stem.")))
    assert (cfg.every, cfg.per_param, cfg.max_params, cfg.backend) == (10, True, 20, "torch")
    assert (cfg.rank, cfg.world_size) == (11, 16)
    assert (cfg.distributed, cfg.per_param_ranks) == ("off", (0, 3))
    assert cfg.file_sd == "/tmp/gradwatch.json" and cfg.exporters == ("otlp", "prometheus")
    assert not cfg.per_param_here  # rank 11 is not in 0,3
    assert from_env({"GRADWATCH_PER_PARAM_RANKS": "all"}).per_param_ranks is None
    assert from_env({"OTEL_METRICS_EXPORTER": "none"}).exporters == ()
    assert cfg.update_every == 0 and Config().update_every == 0
    assert (cfg.micro_batch_size, cfg.loss_accumulation, cfg.noise_ema) == (8, "sum", 0.0)
    assert (Config().micro_batch_size, Config().loss_accumulation) == (None, "mean")
    for off in ("0", "false", "No", "OFF"):
        assert from_env({"GRADWATCH": off}).enabled is False


def test_port_plus_local_rank_must_fit():
    with pytest.raises(SettingError, match="GRADWATCH_PORT"):
        from_env({"GRADWATCH_PORT": "65535", "LOCAL_RANK": "1"})


def test_watch_arguments_are_validated_like_env():
    cfg = Config()
    for kw in (
        {"every": 0},
        {"port": 70000},
        {"backend": "gpu"},
        {"max_params": 0},
        {"update_every": -1},
        {"micro_batch_size": 0},
        {"micro_batch_size": 2.5},
        {"loss_accumulation": "avg"},
        {"noise_ema": 1.0},
        {"exploding_threshold": float("inf")},
        {"host": "no such host!"},
    ):
        with pytest.raises(SettingError):
            cfg.with_overrides(**kw)
    assert cfg.with_overrides(groups={"a": "x.", "b": ["y.", "z."]}).groups == parse_groups(
        "g", "a=x.,b=y.|z."
    )


def test_watch_documents_every_argument_from_the_settings_table():
    """watch()'s docstring is made from the same table as the README: every keyword argument,
    its variable and its accepted values (no argument can be undocumented)."""
    import gradwatch

    doc = gradwatch.watch.__doc__
    rows = {s.var: s for s in SETTINGS}
    for arg, field in FIELDS.items():
        if arg == "enabled" or field.var not in rows:
            continue
        assert f"``{arg}`` ({field.var}; default {rows[field.var].shown_default})" in doc, arg
        assert rows[field.var].accepted in doc, arg


def test_watch_signature_is_the_settings_table():
    """watch()'s keywords, written out for type checkers and help(), are the table's rows: same
    names in the same order (the documented settings, then GRADWATCH's and the launcher's
    stand-ins), the row's annotation, and None (keep the variable's value) as default."""
    import inspect
    import typing

    import gradwatch

    params = list(inspect.signature(gradwatch.watch).parameters.values())
    assert [p.name for p in params[:2]] == ["model", "optimizer"]
    keywords = params[2:]
    assert [p.name for p in keywords] == [s.name for s in KEYWORDS]
    assert {s.name for s in KEYWORDS} == {s.name for s in TABLE}
    assert all(p.kind is p.KEYWORD_ONLY and p.default is None for p in keywords)
    hints = typing.get_type_hints(gradwatch.watch, localns={"Handle": object})
    for s in KEYWORDS:
        assert hints[s.name] == s.argument | None, s.name


def test_settings_table_is_config():
    """Config's fields and defaults are the table's rows; README shows every non-launcher row."""
    import dataclasses

    assert [f.name for f in dataclasses.fields(Config)] == [s.name for s in TABLE] == list(FIELDS)
    assert all(getattr(Config(), s.name) == s.default for s in TABLE)
    assert [s.var for s in TABLE if s.launcher] == ["LOCAL_RANK", "RANK", "WORLD_SIZE"]
    assert all(s.accepted and s.meaning for s in SETTINGS)


GOOD = {
    "GRADWATCH_PORT": ["0", "9500", " 65535 "],
    "GRADWATCH_HOST": ["0.0.0.0", "[::1]", "localhost"],
    "GRADWATCH_EVERY": ["1", "+10", "1000000000"],
    "GRADWATCH_GROUPS": ["host=host.,seed=seed.|stem.", " a = x. "],
    "GRADWATCH_PER_PARAM": ["on", " Yes ", "0"],
    "GRADWATCH_MAX_PARAMS": ["1", "20"],
    "GRADWATCH_MAX_GROUPS": ["2", "100000"],
    "GRADWATCH_VANISHING_THRESHOLD": ["0", "1e-9", ".5"],
    "GRADWATCH_EXPLODING_THRESHOLD": ["1e4", "0.001"],
    "GRADWATCH_UPDATE_EVERY": ["0", "7"],
    "GRADWATCH_MICRO_BATCH_SIZE": ["1", "8"],
    "GRADWATCH_LOSS_ACCUMULATION": [" Sum", "mean"],
    "GRADWATCH_NOISE_EMA": ["0", "0.99"],
    "GRADWATCH_BACKEND": ["TORCH", "native"],
    "GRADWATCH_DISTRIBUTED": ["Off", "auto"],
    "GRADWATCH_PER_PARAM_RANKS": ["all", "3, 0,3"],
    "GRADWATCH_FILE_SD": ["/tmp/gradwatch.json"],
    "OTEL_METRICS_EXPORTER": ["otlp, prometheus", "none"],
    "GRADWATCH": ["1", " Yes ", "off"],
    "LOCAL_RANK": ["0", "3"],
    "RANK": ["11"],
    "WORLD_SIZE": ["16"],
}


def _env_value(name: str, text: str) -> object:
    try:  # port 0: no PORT + LOCAL_RANK limit
        return getattr(from_env({"GRADWATCH_PORT": "0", FIELDS[name].var: text}), name)
    except SettingError:
        return "refused"


def _watch_value(name: str, text: str) -> object:
    try:
        return getattr(Config(port=0).with_overrides(**{name: text}), name)
    except SettingError:
        return "refused"


@pytest.mark.parametrize("name", [s.name for s in KEYWORDS])
def test_environment_and_watch_read_every_text_alike(name):
    """Each watch() keyword given as text is read like its variable: same value, or refused by
    both (one parser per row of the table)."""
    good, bad = GOOD.get(FIELDS[name].var, []), BAD.get(FIELDS[name].var, [])
    for text in good + bad:
        assert _env_value(name, text) == _watch_value(name, text), (name, text)
    assert all(_env_value(name, text) != "refused" for text in good), name


def test_watch_docstring_example_runs(monkeypatch, capsys):
    """The example in watch()'s docstring is real code: it runs and prints step 3's norm."""
    import os
    import textwrap

    import gradwatch

    for k in list(os.environ):
        if k.startswith(("GRADWATCH", "OTEL_")):
            monkeypatch.delenv(k)
    doc = gradwatch.watch.__doc__
    block = doc.split("Example::\n", 1)[1].split("\n    Settings:", 1)[0]
    exec(compile(textwrap.dedent(block), "watch-example", "exec"), {})
    step, norm = capsys.readouterr().out.split()
    assert step == "3" and float(norm) > 0
