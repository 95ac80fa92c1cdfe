"""gridllm.common.cli_args: flags generated from the config dataclasses, and back."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from gridllm.common.cli_args import (
    add_arguments,
    cli_fields,
    flag_of,
    format_size,
    from_args,
    option,
    parse_size,
    to_argv,
)
from gridllm.common.config import CacheConfig, ModelConfig, SchedulerConfig, engine_configs
from router.server import RouterOptions
from scheduler_svc.server import SchedulerServiceConfig
from worker_svc.server import WorkerOptions

CONFIG_CLASSES = (ModelConfig, CacheConfig, SchedulerConfig, SchedulerServiceConfig,
                  WorkerOptions, RouterOptions)


@pytest.mark.parametrize("text, expected", [
    ("1073741824", 1 << 30), ("1GiB", 1 << 30), ("1gib", 1 << 30), ("512MiB", 512 << 20),
    ("1.5GiB", 3 << 29), ("2GB", 2 * 10**9), ("64 KiB", 64 << 10), ("100B", 100),
    ("3TB", 3 * 10**12), (4096, 4096),
])
def test_parse_size_accepts_units(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "1 gigs", "-1GiB", "1e9", "1,5GiB"])
def test_parse_size_refuses_other_spellings_naming_the_field(text):
    with pytest.raises(ValueError, match="kv_cache_memory must be a byte count"):
        parse_size(text, "kv_cache_memory")


@pytest.mark.parametrize("num_bytes", [1 << 30, 512 << 20, 3 << 29, 10**9, 1, 4096, 1000])
def test_format_size_parses_back(num_bytes):
    assert parse_size(format_size(num_bytes)) == num_bytes


def test_size_flag_takes_units_and_a_bad_one_is_a_usage_error(capsys):
    parser = argparse.ArgumentParser(prog="p")
    add_arguments(parser, CacheConfig)
    assert from_args(CacheConfig, parser.parse_args(["--kv-cache-memory", "2GiB"])
                     ).kv_cache_memory == 2 << 30
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--kv-cache-memory", "lots"])
    assert exit_info.value.code == 2
    assert "kv_cache_memory must be a byte count" in capsys.readouterr().err


def test_cache_config_takes_a_size_string():
    assert CacheConfig(kv_cache_memory="256MiB").kv_cache_memory == 256 << 20


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_help_shows_every_option_with_its_default(cls):
    parser = argparse.ArgumentParser(prog="p")
    add_arguments(parser, cls)
    actions = {a.dest: a for a in parser._actions}
    for f in cli_fields(cls):
        action = actions[f.name]
        assert flag_of(f) in action.option_strings
        assert f.metadata["cli"]["help"].split(";")[0] in action.help.replace("%%", "%")
        has_default = (f.default is not dataclasses.MISSING
                       or f.default_factory is not dataclasses.MISSING)
        assert ("(default: " in action.help) == has_default, (f.name, action.help)
        assert action.required == (not has_default)


def _non_default(f: dataclasses.Field, value):
    """A valid value of field ``f`` other than its default ``value``."""
    choices = f.metadata["cli"]["choices"]
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, list):
        return ["127.0.0.1:1", "127.0.0.1:2"]
    overrides = {"block_size": 64, "port": 4321, "gpu_memory_utilization": 0.5,
                 "kv_cache_memory": 3 << 29, "sparse_attention": "strided:8"}
    if f.name in overrides:
        return overrides[f.name]
    if isinstance(value, float):
        return value + 1.5
    if isinstance(value, int):
        return value + 3
    return f"custom-{f.name}"  # str, or None for an optional str/int field


def _sample(cls):
    kwargs = {}
    for f in cli_fields(cls):
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else None)
        value = _non_default(f, default)
        if default is None and f.name in ("num_kv_blocks", "max_model_len", "metrics_port",
                                          "http_port", "max_workers"):
            value = 48
        kwargs[f.name] = value
    return cls(**kwargs)


@pytest.mark.parametrize("cls", CONFIG_CLASSES)
def test_every_field_round_trips_through_its_flags(cls):
    sample = _sample(cls)
    parser = argparse.ArgumentParser(prog="p")
    add_arguments(parser, cls)
    argv = to_argv(sample)
    # Every option field differs from its default, so each one is on the command line.
    assert len([a for a in argv if a.startswith("--")]) >= len(cli_fields(cls))
    rebuilt = from_args(cls, parser.parse_args(argv))
    assert rebuilt == sample


def test_defaults_render_no_flags_and_parse_back_to_the_defaults():
    for cls in (CacheConfig, SchedulerConfig, SchedulerServiceConfig, WorkerOptions):
        assert to_argv(cls()) == []
        parser = argparse.ArgumentParser(prog="p")
        add_arguments(parser, cls)
        assert from_args(cls, parser.parse_args([])) == cls()


def test_bool_options_have_both_spellings():
    parser = argparse.ArgumentParser(prog="p")
    add_arguments(parser, SchedulerConfig)
    assert not parser.parse_args(["--no-enable-prefix-caching"]).enable_prefix_caching
    assert parser.parse_args(["--enable-prefix-caching"]).enable_prefix_caching


def test_repeatable_option_does_not_share_its_default_list():
    parser = argparse.ArgumentParser(prog="p")
    add_arguments(parser, SchedulerServiceConfig)
    first = from_args(SchedulerServiceConfig, parser.parse_args(["--worker", "a:1"]))
    second = from_args(SchedulerServiceConfig, parser.parse_args([]))
    assert first.worker_addresses == ["a:1"] and second.worker_addresses == []


def test_only_exclude_and_defaults_shape_the_flags():
    parser = argparse.ArgumentParser(prog="p")
    add_arguments(parser, ModelConfig, only=("model", "dtype"), defaults={"model": "m"})
    args = parser.parse_args([])
    assert (args.model, args.dtype) == ("m", "auto")
    assert not hasattr(args, "device")
    with pytest.raises(SystemExit):
        parser.parse_args(["--device", "cpu"])


def test_bad_value_names_the_field():
    parser = argparse.ArgumentParser(prog="p")
    add_arguments(parser, SchedulerConfig)
    with pytest.raises(ValueError, match="max_num_seqs must be at least 1"):
        from_args(SchedulerConfig, parser.parse_args(["--max-num-seqs", "0"]))


def test_option_without_default_is_required():
    @dataclasses.dataclass
    class Example:
        name: str = option(help="a name")
        size: int = option(1 << 20, is_size=True, help="bytes")

    parser = argparse.ArgumentParser(prog="p")
    add_arguments(parser, Example)
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert "(default: 1MiB)" in parser.format_help()
    assert from_args(Example, parser.parse_args(["--name", "x", "--size", "2KiB"])) == \
        Example("x", 2048)


def test_engine_configs_split_keyword_arguments_by_field():
    model, cache, scheduler = engine_configs("m", dtype="float32", block_size=4,
                                             max_num_seqs=8, enable_prefix_caching=False,
                                             scheduling_policy="priority", kv_cache_memory="1MiB")
    assert (model.model, model.dtype) == ("m", "float32")
    assert (cache.block_size, cache.kv_cache_memory) == (4, 1 << 20)
    assert (scheduler.max_num_seqs, scheduler.enable_prefix_caching,
            scheduler.scheduling_policy) == (8, False, "priority")


def test_engine_configs_name_an_unknown_argument():
    with pytest.raises(ValueError, match="max_num_seq\\b.*accepted: .*max_num_seqs"):
        engine_configs("m", max_num_seq=8)
    with pytest.raises(ValueError, match="model"):
        engine_configs("m", model="other")
