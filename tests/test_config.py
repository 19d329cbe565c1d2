"""Every setting: good values parse, bad ones give one clear line and leave training running."""

from __future__ import annotations

import pytest

from gradwatch.config import SETTINGS, Config, SettingError, from_env, parse_groups

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
    from gradwatch.config import FIELDS, SETTINGS

    doc = gradwatch.watch.__doc__
    rows = {s.var: s for s in SETTINGS}
    for arg, field in FIELDS.items():
        if arg == "enabled" or field.var not in rows:
            continue
        assert f"``{arg}`` ({field.var}; default {rows[field.var].shown_default})" in doc, arg
        assert rows[field.var].accepted in doc, arg
