"""The mixer registry: a mixer's arguments are read from its constructors; a wrong one is named in one line."""

from __future__ import annotations

import inspect

import pytest

from ttt.layers import MIXERS, Bidirectional, check_mixer_kwargs, make_mixer, mixer_parameters

from .mixer_cases import DIM, HEADS


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_every_listed_argument_is_accepted_with_its_default(name):
    params = mixer_parameters(name)
    assert params and not {"dim", "num_heads", "self", "kwargs"} & set(params)
    defaults = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    assert set(defaults) == set(params)  # every argument of a registered mixer has a default
    make_mixer(name, DIM, HEADS, defaults)


def test_arguments_come_from_the_whole_class_chain():
    ttt = mixer_parameters("ttt_linear")
    assert {"base_lr", "mini_batch_size", "share_qk", "impl"} <= set(ttt) and ttt["base_lr"].default == 1.0
    assert mixer_parameters("ttt_mlp")["base_lr"].default == 0.1  # the most derived default wins
    assert {"window", "num_kv_heads", "rope_theta"} <= set(mixer_parameters("swa"))
    assert {"correction_factor", "expand_v", "chunk_size"} <= set(mixer_parameters("comba"))


def test_an_unknown_argument_names_the_mixer_the_key_and_the_accepted_ones():
    with pytest.raises(TypeError) as e:
        make_mixer("ttt_linear", DIM, HEADS, {"bogus": 1})
    msg = str(e.value)
    assert "\n" not in msg and "_TTTLayer" not in msg
    assert msg.startswith("unknown argument 'bogus' for mixer 'ttt_linear'; it accepts: ")
    assert all(key in msg for key in mixer_parameters("ttt_linear"))
    with pytest.raises(TypeError, match=r"'share_q' for mixer 'ttt_linear' \(did you mean 'share_qk'\?\)"):
        make_mixer("ttt_linear", DIM, HEADS, {"share_q": True})
    with pytest.raises(TypeError, match=r"unknown arguments 'a', 'dim' for mixer 'swa'.*set by the model"):
        make_mixer("swa", DIM, HEADS, {"dim": 8, "a": 1})
    with pytest.raises(ValueError, match="unknown mixer 'mamba9'"):
        mixer_parameters("mamba9")
    with pytest.raises(TypeError, match="'nope' for mixer 'gla'"):
        Bidirectional.from_name("gla", dim=DIM, num_heads=HEADS, nope=1)


def test_argument_values_of_the_wrong_type_or_not_finite_are_refused_in_one_line():
    """--mixer-kwargs '{"ttt_linear": {"mini_batch_size": "8"}}' failed deep inside with "'<' not supported
    between instances of 'str' and 'int'", and a NaN base_lr only at the first training step (review)."""
    for name, kwargs, match in [
        (
            "ttt_linear",
            {"mini_batch_size": "8"},
            r"'mini_batch_size' of mixer 'ttt_linear' must be int, got '8'",
        ),
        ("ttt_linear", {"mini_batch_size": True}, "must be int, got True"),
        ("ttt_linear", {"share_qk": 1}, "'share_qk' of mixer 'ttt_linear' must be bool, got 1"),
        ("ttt_linear", {"base_lr": float("nan")}, "'base_lr' of mixer 'ttt_linear' must be finite, got nan"),
        ("attention", {"window": 1.5}, "must be int or None, got 1.5"),
        ("ttt_linear", {"token_eta_base": 3}, "must be str, got 3"),
    ]:
        with pytest.raises((TypeError, ValueError), match=match) as e:
            check_mixer_kwargs(name, kwargs)
        assert "\n" not in str(e.value)
    # what the annotations allow passes: an int for a float, None where None is allowed, any string impl
    for name, kwargs in [("ttt_linear", {"base_lr": 1, "impl": "chunk"}), ("swa", {"num_kv_heads": None})]:
        check_mixer_kwargs(name, kwargs)


def test_rope_theta_must_be_a_positive_finite_number():
    for theta in (-1.0, 0.0):
        with pytest.raises(ValueError, match="rope_theta must be a finite number > 0"):
            make_mixer("attention", DIM, HEADS, {"rope_theta": theta})
