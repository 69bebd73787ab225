"""The mixer registry: a mixer's arguments are read from its constructors; a wrong one is named in one line."""

from __future__ import annotations

import inspect

import pytest

from ttt.layers import MIXERS, Bidirectional, make_mixer, mixer_parameters

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
